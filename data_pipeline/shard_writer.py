"""Writing one split of a corpus: its token stream packed into rows, written as Arrow shards.

Documents arrive as token arrays (with their sentence starts); each is followed by <eos> and the
stream is cut into rows of sample_len tokens. Rows are written in record batches of
rows_per_batch rows, at most max_rows_per_shard rows per shard file; the last partial row is
dropped and counted. With `spans`, each document's knowledge spans are written as the span
columns (phrase starts, entity starts, span ends). The format is defined in corpus_format.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from data_pipeline.corpus_format import sha256_file, shard_schema


def _offsets_column(starts: np.ndarray, rows: int, sample_len: int) -> pa.ListArray:
    """list<int32> column: for each of `rows` rows, the `starts` (sorted, relative to the first
    row's first token) that fall inside it, as positions within the row."""
    row_of_start = starts // sample_len
    list_offsets = np.searchsorted(row_of_start, np.arange(rows + 1)).astype(np.int32)
    return pa.ListArray.from_arrays(
        pa.array(list_offsets), pa.array((starts % sample_len).astype(np.int32))
    )


class SplitWriter:
    """Packs one split's token stream into rows and writes them as shards."""

    def __init__(
        self,
        directory: Path,
        split: str,
        *,
        sample_len: int,
        dtype: str,
        eos_id: int,
        rows_per_batch: int,
        max_rows_per_shard: int,
        spans: bool = False,
    ) -> None:
        self.directory, self.split = directory, split
        self.sample_len, self.dtype = sample_len, np.dtype(dtype)
        self.rows_per_batch, self.max_rows_per_shard = rows_per_batch, max_rows_per_shard
        self.schema = shard_schema(self.dtype, sample_len, spans=spans)
        self.with_spans = spans
        # Span boundaries, same origin: phrase starts, entity starts, ends (see _span_lists).
        self._span_parts: list[list[np.ndarray]] = [[], [], []]
        self.spans = 0
        self._eos = np.array([eos_id], dtype=self.dtype)
        self._chunks: list[np.ndarray] = []
        self._starts: list[int] = []  # document starts, relative to the first held token
        self._sent_parts: list[np.ndarray] = []  # sentence starts, same origin
        self._held = 0  # tokens received but not yet written
        self.documents = 0
        self.sentences = 0
        self.shards: list[dict] = []
        self._writer = None
        self._shard = {"rows": 0, "documents": 0, "sentences": 0}

    def add(
        self, tokens: np.ndarray, sent_starts: np.ndarray, spans: np.ndarray | None = None
    ) -> None:
        """Append one document (its tokens, sentence starts and, for a writer with spans,
        its spans as (start, end, kind) rows, all relative to it) and <eos>."""
        self._starts.append(self._held)
        self._sent_parts.append(sent_starts.astype(np.int64) + self._held)
        if self.with_spans:
            spans = np.zeros((0, 3), dtype=np.int64) if spans is None else spans.astype(np.int64)
            for j, kind in enumerate((1, 2)):
                self._span_parts[j].append(spans[spans[:, 2] == kind, 0] + self._held)
            self._span_parts[2].append(spans[:, 1] + self._held)
            self.spans += len(spans)
        self._chunks += (tokens.astype(self.dtype, copy=False), self._eos)
        self._held += len(tokens) + 1
        self.documents += 1
        self.sentences += len(sent_starts)
        if self._held >= self.rows_per_batch * self.sample_len:
            self._write_rows(final=False)

    def close(self) -> dict:
        """Write the remaining whole rows; return the split's manifest entry."""
        self._write_rows(final=True)
        self._close_shard()
        rows = sum(s["rows"] for s in self.shards)
        extra = {"spans": self.spans} if self.with_spans else {}
        return {
            **extra,
            "shards": self.shards,
            "rows": rows,
            "tokens": rows * self.sample_len,
            "documents": self.documents,
            "sentences": self.sentences,
            "dropped_tokens": self._held,
        }

    def _write_rows(self, *, final: bool) -> None:
        L, rpb = self.sample_len, self.rows_per_batch
        rows = self._held // L if final else (self._held // (rpb * L)) * rpb
        if rows == 0:
            return
        buf = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        starts = np.asarray(self._starts, dtype=np.int64)
        sents = np.concatenate(self._sent_parts)
        # Ends are sorted too: spans do not overlap.
        span_lists = [
            np.concatenate(parts or [np.zeros(0, np.int64)]) for parts in self._span_parts
        ]
        for r0 in range(0, rows, rpb):
            r1 = min(r0 + rpb, rows)
            lists = [
                part[slice(*np.searchsorted(part, [r0 * L, r1 * L]))] - r0 * L
                for part in (starts, sents, *(span_lists if self.with_spans else ()))
            ]
            self._write_batch(buf[r0 * L : r1 * L], lists, r1 - r0)
        used = rows * L
        self._chunks = [buf[used:].copy()] if used < len(buf) else []
        self._starts = (starts[starts >= used] - used).tolist()
        self._sent_parts = [sents[sents >= used] - used]
        self._span_parts = [[part[part >= used] - used] for part in span_lists]
        self._held -= used

    def _write_batch(self, tokens: np.ndarray, lists: list[np.ndarray], rows: int) -> None:
        """Write `rows` rows: their tokens and the positions of each list column (document
        starts, sentence starts, then the span lists), relative to the first row."""
        if self._writer is None or self._shard["rows"] >= self.max_rows_per_shard:
            self._close_shard()
            self._open_shard()
        L = self.sample_len
        starts, sents = lists[:2]
        batch = pa.record_batch(
            [
                pa.FixedSizeListArray.from_arrays(pa.array(tokens), L),
                *(_offsets_column(part, rows, L) for part in lists),
            ],
            schema=self.schema,
        )
        self._writer.write_batch(batch)
        self._shard["rows"] += rows
        self._shard["documents"] += len(starts)
        self._shard["sentences"] += len(sents)

    def abort(self) -> None:
        """Close an open shard without recording it (the directory is being discarded)."""
        if self._writer is not None:
            self._sink.close()
            self._writer = None

    def _open_shard(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.arrow"
        self._path = self.directory / name
        self._sink = pa.OSFile(str(self._path), "wb")
        options = pa.ipc.IpcWriteOptions(compression=None)
        self._writer = pa.ipc.new_file(self._sink, self.schema, options=options)
        self._shard = {"rows": 0, "documents": 0, "sentences": 0}

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        self._writer = None
        self.shards.append(
            {
                "file": self._path.name,
                "rows": self._shard["rows"],
                "tokens": self._shard["rows"] * self.sample_len,
                "documents": self._shard["documents"],
                "sentences": self._shard["sentences"],
                "sha256": sha256_file(self._path),
                "bytes": self._path.stat().st_size,
            }
        )
