"""Reading one split of a prepared corpus: random access to packed rows, integrity checks.

Legend: n = rows gathered, S = sample_len (seq_len + 1 tokens per row), R = rows of one
record batch.

Shards are memory-mapped Arrow IPC files. Every record batch but a shard's last holds
`rows_per_batch` rows and every shard but a split's last holds a multiple of it, so row ->
(record batch, offset) is arithmetic. The first time a record batch is touched, the positions of
its buffers inside the mapped file are recorded, and so is where each of its rows lies (shard,
and the token element where the row starts). From then on reading n rows costs what a flat
memmap reader pays: one lookup of where they lie, one fancy-indexed copy of whole rows (a
memcpy each) out of the mapped bytes and one cast to int64; no Arrow objects, and no per-row
Python unless the rows come from several shards (see rows.read_rows). `Table.take` is avoided
on purpose: on a multi-batch memory-mapped column it copies every chunk on every call. For
training, `micro_batch.MicroBatchPlan` does the rest of the per-row work (placement, first-touch
checks, document and sentence starts as mask keys) for many samples in one vectorised pass,
through `PackedDataset.place` and `PackedDataset.shard_views`.

Integrity is checked in layers: at open, the manifest against each shard's size, schema and
record-batch count (and, with `verify_checksums`, sha256 plus everything below for every
record batch); the first time a record batch is touched in a process, its row count, all of
its token ids and all of its offsets, in one vectorised pass, before any of its rows is used.
So a bad row is reported (by shard and row) whichever sample is drawn first. Every problem
with the data raises `common.errors.DataError` naming the file (and shard and row).

The order in which one corpus is visited is a pure function of (seed, epoch): see
`sample_order`. Blending and the DP-sharded loader live in blend.py and loader.py.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch

from common.errors import DataError
from data_pipeline.corpus_format import (
    DOC_COLUMN,
    MANIFEST_FILE,
    SENT_COLUMN,
    SPAN_COLUMNS,
    TOKENS_COLUMN,
    MissingCorpusFileError,
    expected_schema,
    read_manifest,
    sha256_file,
    split_entry,
)
from data_pipeline.rows import RowArrays, ShardViews, flat_view, list_keys, map_shard, read_rows
from data_pipeline.tokenizers import Tokenizer, load_tokenizer

# Columns of PackedDataset._at: where a record batch's buffers start in its shard's mapped
# file, in elements of the shard's token view (_TOK) or int32 view (the list columns; the
# span lists' pairs follow the sentence list's in a corpus with spans).
_TOK, _DOC_OFF, _DOC_VAL, _SENT_OFF, _SENT_VAL = range(5)
_LIST_PAIRS = 5  # document, sentence and the three span lists
_INT64 = np.dtype(np.int64)


class RowPlaces(NamedTuple):
    """Where some rows of a split lie in its shards (see `PackedDataset.place`)."""

    shard: np.ndarray  # [n]: index into PackedDataset.shard_views
    element: np.ndarray  # int64 [n]: token element of that shard's views where the row starts
    lists: np.ndarray  # int64 [4 or 10, n]: where its boundary lists lie in the shard's int32
    # view (10 with `spans`: the span lists' pairs after the sentence list's)


class PackedDataset:
    """The rows of one split of a prepared corpus (its format: corpus_format.py)."""

    def __init__(self, path: str | Path, split: str = "train", *, verify_checksums: bool = False):
        """Open `split` of the corpus in `path`. With `verify_checksums`, also check every
        shard's sha256 and every record batch's rows, token ids and offsets now (reads the
        whole split once); otherwise each record batch is checked when first touched."""
        self.path = Path(path)
        self._manifest = read_manifest(self.path)
        where = self.path / MANIFEST_FILE
        self.split = split
        self._entry = split_entry(self._manifest, split, directory=self.path)
        self._dtype = np.dtype(self._manifest["dtype"])
        # Viewed as this type, n opaque rows (see rows.row_windows) are [n, S] tokens at once.
        self._row_type = np.dtype((self._dtype, (self.sample_len,)))
        self._rpb = int(self._manifest["rows_per_batch"])
        self._schema = expected_schema(
            self._dtype, self.sample_len, schema_version=self._manifest["schema_version"]
        )
        self._tokenizer: Tokenizer | None = None
        shards = self._entry["shards"]
        self._names = [shard["file"] for shard in shards]
        self._readers, self._arrow_base, self._whole = [], [], []
        self._views: list[ShardViews] = []
        for shard in shards:
            self._open_shard(shard, verify_checksums)
        self._index_batches(shards, where=f"{where}, split {split!r}")
        self._checked = np.zeros(len(self._batch_shard), dtype=bool)
        self._unchecked = len(self._batch_shard)  # record batches not yet touched
        self._at = np.zeros((1 + 2 * _LIST_PAIRS, len(self._batch_shard)), dtype=np.int64)
        # Where each row lies: its shard, and the element of that shard's token view where it
        # starts; written when its record batch is first touched, so placing rows is then one
        # lookup. Twelve bytes a row (an epoch's visiting order takes eight); np.empty leaves
        # untouched pages unallocated.
        self._row_start = np.empty(len(self), dtype=np.int64)
        self._row_shard = np.empty(len(self), dtype=np.int32)
        if verify_checksums:
            self.verify()

    def __reduce__(self):
        # Memory maps cannot be pickled; a copy sent to another process reopens the files
        # (the checksums were verified here already).
        return (PackedDataset, (self.path, self.split))

    def _open_shard(self, shard: dict, verify_checksums: bool) -> None:
        file = self.path / shard["file"]
        if not file.is_file():
            raise MissingCorpusFileError(f"shard {file} listed in the manifest is missing")
        size = os.path.getsize(file)
        if size != shard["bytes"]:
            raise DataError(
                f"shard {file} has {size} bytes, the manifest says {shard['bytes']} "
                "(truncated or replaced?)"
            )
        if verify_checksums and sha256_file(file) != shard["sha256"]:
            raise DataError(f"shard {file}: sha256 does not match the manifest (corrupted?)")
        try:
            whole, arrow_base, reader = map_shard(file)
        except (pa.ArrowException, OSError, ValueError) as err:
            raise DataError(f"shard {file} is not a readable Arrow IPC file: {err}") from None
        if not reader.schema.equals(self._schema):
            raise DataError(
                f"shard {file}: schema ({_describe(reader.schema)}) does not match the manifest "
                f"(schema_version {self._manifest['schema_version']} expects "
                f"{_describe(self._schema)})"
            )
        self._check_layout(reader, shard, file)
        self._readers.append(reader)
        self._arrow_base.append(arrow_base)
        self._whole.append(whole)
        self._views.append(ShardViews.of(whole, self._dtype, self.sample_len))

    def _check_layout(self, reader, shard: dict, file: Path) -> None:
        # Only the footer here: reading each record batch's header would make Arrow advise
        # the kernel to read its body too (the whole corpus, at open). Rows per record batch
        # are checked when a batch is first touched, before any of its rows is used.
        nbatches, want_batches = reader.num_record_batches, -(-shard["rows"] // self._rpb)
        if nbatches != want_batches:
            raise DataError(
                f"shard {file}: {nbatches} record batches, but {shard['rows']} rows at "
                f"{self._rpb} rows per batch need {want_batches}"
            )

    def _index_batches(self, shards: list[dict], *, where: str) -> None:
        """Map global record batch -> (shard, batch in shard): row // rows_per_batch."""
        rows = [shard["rows"] for shard in shards]
        for i, r in enumerate(rows[:-1]):
            if r % self._rpb:
                raise DataError(
                    f"{where}: shard {shards[i]['file']} has {r} rows, not a multiple of "
                    f"rows_per_batch={self._rpb}, but it is not the split's last shard"
                )
        if sum(rows) != self._entry["rows"]:
            raise DataError(
                f"{where}: lists {self._entry['rows']} rows but its shards add up to {sum(rows)}"
            )
        per_shard = [-(-r // self._rpb) for r in rows]
        self._batch_shard = np.repeat(np.arange(len(rows)), per_shard)
        local = [np.arange(k, dtype=np.int64) for k in per_shard]
        self._batch_local = np.concatenate(local) if local else np.zeros(0, dtype=np.int64)
        self._shard_start = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])

    # -- metadata ----------------------------------------------------------------------------

    @property
    def manifest(self) -> dict:
        return self._manifest

    @property
    def seq_len(self) -> int:
        return int(self._manifest["seq_len"])

    @property
    def sample_len(self) -> int:
        return int(self._manifest["sample_len"])

    @property
    def vocab_size(self) -> int:
        return int(self._manifest["vocab_size"])

    @property
    def token_dtype(self) -> np.dtype:
        """How tokens are stored (uint16 or int32)."""
        return self._dtype

    @property
    def has_sentences(self) -> bool:
        """Whether the shards carry sentence starts (schema_version 2)."""
        return self._schema.get_field_index(SENT_COLUMN) >= 0

    @property
    def has_spans(self) -> bool:
        """Whether the shards carry knowledge spans (schema_version 3)."""
        return self._schema.get_field_index(SPAN_COLUMNS[0]) >= 0

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._manifest["tokenizer"], self.path)
        return self._tokenizer

    @property
    def fingerprint(self) -> str:
        """Identity of this split's data (shard checksums, row layout, tokenizer)."""
        ident = {
            "split": self.split,
            "sample_len": self.sample_len,
            "tokenizer": self._manifest["tokenizer"].get("sha256"),
            "shards": [(s["rows"], s["sha256"]) for s in self._entry["shards"]],
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]

    def __len__(self) -> int:
        return int(self._shard_start[-1])

    # -- record batches: first touch ---------------------------------------------------------

    def _first_touch(self, batch: int) -> None:
        """Check record batch `batch` in full and record where its buffers lie."""
        shard, local = int(self._batch_shard[batch]), int(self._batch_local[batch])
        tokens, lists = self._read_batch(shard, local)
        self._check_tokens(tokens.reshape(-1, self.sample_len), batch)
        for column, (offsets, values) in lists.items():
            self._check_offsets(column, offsets, values, batch)
        arrays = [tokens, *(a for pair in lists.values() for a in pair)]
        self._at[: len(arrays), batch] = [self._element_at(a, shard, local) for a in arrays]
        # Shards before the last hold whole record batches: global batch b starts at row b * R.
        first, count = batch * self._rpb, len(tokens) // self.sample_len
        element = self._at[_TOK, batch] + self.sample_len * np.arange(count, dtype=np.int64)
        self._row_start[first : first + count] = element
        self._row_shard[first : first + count] = shard
        self._checked[batch] = True
        self._unchecked -= 1

    def _read_batch(self, shard: int, local: int) -> tuple[np.ndarray, dict]:
        """Zero-copy views of a record batch: flat tokens, {column: (offsets, values)}."""
        file = self.path / self._names[shard]
        try:
            record = self._readers[shard].get_batch(local)
            tokens = record.column(TOKENS_COLUMN).flatten().to_numpy(zero_copy_only=True)
            lists = {DOC_COLUMN: _list_views(record.column(DOC_COLUMN))}
            if self.has_sentences:
                lists[SENT_COLUMN] = _list_views(record.column(SENT_COLUMN))
            for column in SPAN_COLUMNS if self.has_spans else ():
                lists[column] = _list_views(record.column(column))
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"shard {file}: record batch {local} is unreadable: {err}") from None
        shard_rows = int(self._shard_start[shard + 1] - self._shard_start[shard])
        want = min(self._rpb, shard_rows - local * self._rpb)
        if record.num_rows != want:
            raise DataError(
                f"shard {file}: record batch {local} has {record.num_rows} rows, expected "
                f"{want} (the shard does not match the manifest)"
            )
        return tokens, lists

    def _element_at(self, array: np.ndarray, shard: int, local: int) -> int:
        """Index of `array`'s first element in the shard's mapped file, viewed as its dtype."""
        if array.size == 0:
            return 0  # never read
        # Arrow's buffers live in its own mapping of the file; their offset in the file is the
        # same in ours.
        delta = array.ctypes.data - self._arrow_base[shard]
        if delta % array.itemsize or not 0 <= delta <= self._whole[shard].nbytes - array.nbytes:
            raise DataError(
                f"shard {self.path / self._names[shard]}: record batch {local} is not a "
                "zero-copy, aligned view of the file (compressed or foreign shard?)"
            )
        return delta // array.itemsize

    def _check_tokens(self, tokens_RS: np.ndarray, batch: int) -> None:
        if tokens_RS.size and (int(tokens_RS.max()) >= self.vocab_size or int(tokens_RS.min()) < 0):
            bad = (tokens_RS >= self.vocab_size) | (tokens_RS < 0)
            row = int(np.argmax(bad.any(axis=1)))
            value = int(tokens_RS[row][bad[row]][0])
            self._raise_bad_row(
                batch, row, f"token id {value} is outside the vocabulary (size {self.vocab_size})"
            )

    def _check_offsets(self, column: str, offsets, values, batch: int) -> None:
        steps = np.diff(offsets)
        if len(steps) and steps.min() < 0:
            self._raise_bad_row(batch, int(np.argmax(steps < 0)), f"{column} list is malformed")
        if offsets[0] < 0 or offsets[-1] > len(values):
            self._raise_bad_row(batch, 0, f"{column} offsets point outside its values")
        used = values[offsets[0] : offsets[-1]]
        bad = (used < 0) | (used >= self.sample_len)
        if bad.any():
            at = int(np.argmax(bad))
            row = int(np.searchsorted(offsets, offsets[0] + at, side="right")) - 1
            self._raise_bad_row(
                batch,
                row,
                f"{column} holds position {int(used[at])}, outside [0, {self.sample_len})",
            )

    def _raise_bad_row(self, batch: int, row_in_batch: int, problem: str) -> None:
        shard = int(self._batch_shard[batch])
        local = int(self._batch_local[batch]) * self._rpb + row_in_batch
        global_row = int(self._shard_start[shard]) + local
        raise DataError(
            f"shard {self.path / self._names[shard]}, row {local} (row {global_row} of split "
            f"{self.split!r}): {problem}"
        )

    def verify(self) -> None:
        """Check every token id and offset of the split now (reads all of it once)."""
        for batch in np.flatnonzero(~self._checked).tolist():
            self._first_touch(batch)

    # -- rows --------------------------------------------------------------------------------

    def _rows(self, indices) -> np.ndarray:
        """Row indices as int64 [n] in [0, len(self)) (negative ones count from the end),
        every record batch among them checked."""
        rows = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self._row_start)
        # Negative indices read as huge unsigned numbers: one test finds both kinds.
        if len(rows) and _max(rows.view(np.uint64)) >= n:
            rows = np.where(rows < 0, rows + n, rows)
            bad = (rows < 0) | (rows >= n)
            if bad.any():
                raise IndexError(
                    f"row {int(rows[bad][0])} out of range for {n} rows in split {self.split!r} "
                    f"of {self.path}"
                )
        if self._unchecked:
            batches = rows // self._rpb
            checked = self._checked[batches]
            if not _all(checked):
                for batch in np.unique(batches[~checked]).tolist():
                    self._first_touch(batch)
        return rows

    def _lookup(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(rows, where they start in their shards' token views) of row indices (negative
        ones count from the end); `rows` index _row_shard like the indices given."""
        rows = indices
        # The common case, a 1-D int64 array once every record batch is checked, goes straight
        # to the lookup; anything else is normalised and checked first.
        plain = type(rows) is np.ndarray and rows.dtype == _INT64 and rows.ndim == 1
        if self._unchecked or not plain:
            rows = self._rows(indices)
        try:
            # Once every record batch is checked this lookup is the whole placement: numpy
            # wraps negative indices and refuses out-of-range ones itself.
            return rows, self._row_start[rows]
        except IndexError:
            self._rows(rows)  # raises the error that names the split
            raise

    def _by_shard(self, shards: np.ndarray, *, as_indices: bool = False) -> list[tuple]:
        """(shard, selection) groups of gathered rows: one group, selecting all, when they
        come from a single shard (the common case, kept cheap); else index arrays."""
        if len(self._views) == 1:
            distinct = [0]
        elif len(shards) <= 64:
            distinct = sorted(set(shards.tolist()))
        else:
            distinct = np.unique(shards).tolist()
        if len(distinct) == 1:
            return [(distinct[0], np.arange(len(shards)) if as_indices else slice(None))]
        return [(s, np.flatnonzero(shards == s)) for s in distinct]

    def _copy_rows(self, rows: np.ndarray) -> np.ndarray:
        """Checked `rows` as [n] opaque items of S stored tokens: one fancy-indexed copy (a
        memcpy per row) for each shard among them."""
        starts = self._row_start[rows]
        if len(self._views) == 1:
            return self._views[0].rows[starts]
        groups = self._by_shard(self._row_shard[rows])
        if len(groups) == 1:
            return self._views[groups[0][0]].rows[starts]
        got = np.empty(len(rows), dtype=self._views[0].rows.dtype)
        for shard, sel in groups:
            got[sel] = self._views[shard].rows[starts[sel]]
        return got

    def _lists(self, rows: np.ndarray, *, spans: bool = False) -> np.ndarray:
        """[4, n]: where the boundary lists of checked `rows` lie in their shard's int32 view:
        the element of each document list's first offset, the element its values count from,
        and the same two for the sentence list (see rows.list_keys). A corpus without sentence
        lists gives its document lists again: document starts are sentence starts too. With
        `spans` (a corpus that has them), [10, n]: the three span lists' pairs follow."""
        batches, offsets = np.divmod(rows, self._rpb)
        at = self._at[:, batches]
        at[_DOC_OFF] += offsets
        if not self.has_sentences:
            return at[[_DOC_OFF, _DOC_VAL, _DOC_OFF, _DOC_VAL]]
        pairs = _LIST_PAIRS if spans else 2
        at[_SENT_OFF : 1 + 2 * pairs : 2] += offsets
        return at[_DOC_OFF : 1 + 2 * pairs]

    @property
    def shard_views(self) -> tuple[ShardViews, ...]:
        """Read-only views of every shard, in manifest order (`RowPlaces.shard` indexes them)."""
        return tuple(self._views)

    def place(self, indices: Sequence[int] | np.ndarray, *, spans: bool = False) -> RowPlaces:
        """Where rows `indices` lie (negative ones count from the end), every record batch
        among them checked first: for readers that copy rows out of `shard_views` themselves.
        `spans` (only for a corpus that has them) adds the span lists."""
        rows = self._rows(indices)
        lists = self._lists(rows, spans=spans)
        return RowPlaces(self._row_shard[rows], self._row_start[rows], lists)

    def gather_into(self, rows: Sequence[int] | np.ndarray, out: RowArrays, at: np.ndarray) -> None:
        """Write rows `rows` into positions `at` of `out`: their tokens, and their document
        and sentence starts marked True (out's masks must be clear at those positions)."""
        rows = self._rows(rows)
        got = self._copy_rows(rows)
        if out.tokens.dtype == self._dtype:
            flat_view(out.tokens).view(got.dtype)[at] = got
        else:  # a blend of uint16 and int32 corpora: widen on the way
            out.tokens[at] = got.view(self._row_type)
        doc_start, sent_start = flat_view(out.doc_start), flat_view(out.sent_start)
        spans = len(out.starts) > 2 and self.has_spans
        lists = self._lists(rows, spans=spans)
        base = np.asarray(at, dtype=np.int64) * self.sample_len
        for shard, sel in self._by_shard(self._batch_shard[rows // self._rpb]):
            flat = self._views[shard].int32
            doc, _ = list_keys(flat, lists[0, sel], lists[1, sel], base[sel])
            sent, _ = list_keys(flat, lists[2, sel], lists[3, sel], base[sel])
            # A document start is a sentence start too.
            doc_start[doc] = sent_start[doc] = sent_start[sent] = True
            for plane in range(2, 5) if spans else ():
                keys, _ = list_keys(
                    flat, lists[2 * plane, sel], lists[2 * plane + 1, sel], base[sel]
                )
                flat_view(out.starts[plane])[keys] = True

    def __getitem__(self, index: int) -> np.ndarray:
        """Row `index` as a read-only numpy view into the memory-mapped shard."""
        rows, starts = self._lookup([index])
        start, shard = int(starts[0]), int(self._row_shard[rows[0]])
        return self._views[shard].tokens[start : start + self.sample_len]

    def gather(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Rows `indices` stacked into an int64 tensor [len(indices), sample_len]."""
        rows, starts = self._lookup(indices)
        if len(self._views) == 1:
            shard = self._views[0]
            return torch.from_numpy(shard.rows[starts].view(shard.row_type).astype(np.int64))
        return torch.from_numpy(read_rows(self._views, self._row_shard[rows], starts))

    def gather_arrays(self, rows: Sequence[int] | np.ndarray) -> RowArrays:
        """Rows and their boundaries as numpy arrays (tokens in the stored dtype), with the
        span planes when the corpus has spans."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = RowArrays.empty(len(rows), self.sample_len, self._dtype, spans=self.has_spans)
        self.gather_into(rows, out, np.arange(len(rows)))
        return out

    def gather_batch(self, rows: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Rows with their boundaries: {"tokens": int64 [n, S], "doc_start": bool [n, S],
        "sent_start": bool [n, S]}; True where a document (sentence) begins inside the row.
        A document start is always a sentence start; corpora without sentence offsets
        (schema_version 1) mark document starts only. A corpus with spans adds "span_start"
        bool and "span_kind" int8 [n, S] (see rows.span_marks)."""
        return self.gather_arrays(rows).batch()


# A numpy reduction costs microseconds; for a handful of rows Python is faster.
def _all(flags: np.ndarray) -> bool:
    return all(flags.tolist()) if len(flags) <= 64 else bool(flags.all())


def _max(values: np.ndarray) -> int:
    return max(values.tolist()) if len(values) <= 64 else int(values.max())


def _list_views(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [rows + 1], values) of a list<int32> column, zero-copy."""
    offsets = column.offsets.to_numpy(zero_copy_only=True)
    return offsets, column.values.to_numpy(zero_copy_only=True)


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{field.name}: {field.type}" for field in schema)


def sample_order(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The order rows are visited in during `epoch`: a permutation of range(n), a pure
    function of (seed, epoch)."""
    if n < 0 or seed < 0 or epoch < 0:
        raise ValueError(f"sample_order needs n, seed, epoch >= 0 (got {n}, {seed}, {epoch})")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(n)
