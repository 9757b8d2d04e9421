"""Corpus preparation: documents -> tokenised, packed Arrow IPC shards + manifest.json.

Documents are cut into sentences by `documents.split_sentences`, tokenised sentence by sentence
and concatenated (so sentence starts are exact token positions), each document followed by
<eos>, concatenated per split and cut into rows (shard_writer.py); the last partial row of each
split is dropped (counted in the manifest). The format of the result is corpus_format.py's.

Whether a document is held out for validation is a pure function of (seed, its index in the
input), so the split does not depend on how many documents follow it; with val_fraction 0 every
document is trained on and the manifest lists no "val" split. Tokenisation may run in worker
processes (encoding.py); the output is byte-identical for every worker count.

With `spans` (a JSONL file of knowledge spans per input document, documents.read_spans, or
a lexicon of phrases and entities found in every document, documents.read_lexicon) the spans
are cut into the token stream as sentences are and written as the span columns
(schema_version 3); documents without any have none. Without it the output is exactly what
it was before spans existed.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TextIO

import numpy as np

from common.errors import ConfigError
from data_pipeline.corpus_format import (
    SCHEMA_VERSION,
    SPANS_SCHEMA_VERSION,
    SPLITS,
    check_token_dtype_name,
    resolve_token_dtype,
    write_manifest,
)
from data_pipeline.documents import (
    SENTENCE_SPLITTER,
    DocSpans,
    DocumentReader,
    Lexicon,
    load_spans,
)
from data_pipeline.encoding import DocumentChunk, EncodedChunk, chunk_documents, encode_chunks
from data_pipeline.shard_writer import SplitWriter
from data_pipeline.tokenizers import Tokenizer, build_tokenizer, needs_training

DEFAULT_ROWS_PER_BATCH = 1024
TARGET_SHARD_BYTES = 256 * 1024 * 1024


class CorpusExistsError(FileExistsError):
    """The output directory already holds a corpus (or other files)."""


# ---------------------------------------------------------------------------------------------
# Progress


class ProgressPrinter:
    """A one-line progress report: documents/s, tokens/s and, when the total is known, ETA.

    On a terminal the line is rewritten in place (carriage return); elsewhere (a log file) a new
    line is written every `interval` seconds. `clock` is injectable for tests.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        total_bytes: int | None = None,
        total_documents: int | None = None,
        interval: float | None = None,
        clock=time.monotonic,
    ) -> None:
        self.stream, self.clock = stream, clock
        self.total_bytes, self.total_documents = total_bytes or None, total_documents or None
        isatty = getattr(stream, "isatty", None)
        self.tty = bool(isatty and isatty())
        self.interval = interval if interval is not None else (0.5 if self.tty else 10.0)
        self.start = self.last = clock()
        self._width = 0

    def update(
        self, *, documents: int, tokens: int, bytes_read: int | None = None, final: bool = False
    ) -> None:
        now = self.clock()
        if not final and now - self.last < self.interval:
            return
        self.last = now
        line = self.format(documents=documents, tokens=tokens, bytes_read=bytes_read, now=now)
        if self.tty:
            self.stream.write("\r" + line.ljust(self._width) + ("\n" if final else ""))
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def format(self, *, documents: int, tokens: int, bytes_read: int | None, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        line = (
            f"tokenised {documents:,} documents ({documents / elapsed:,.0f}/s), "
            f"{tokens:,} tokens ({tokens / elapsed:,.0f}/s), {_clock(elapsed)} elapsed"
        )
        done = None
        if self.total_bytes and bytes_read is not None:
            done = min(bytes_read / self.total_bytes, 1.0)
        elif self.total_documents:
            done = min(documents / self.total_documents, 1.0)
        if done is not None:
            eta = _clock(elapsed * (1 - done) / done) if done > 0 else "?"
            line += f", {100 * done:.1f}% ETA {eta}"
        return line


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ---------------------------------------------------------------------------------------------
# Split assignment


def validation_score(index: int, seed: int) -> float:
    """Uniform number in [0, 1) for document `index`; the document is held out if < val_fraction."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / 2.0**53  # 53 bits: exact in a float


def _assign_splits(docs: Iterable[tuple[int, object]], *, seed: int, val_fraction: float):
    """(split, payload) per document, in input order.

    Guarantees a document in each split once there are two: documents are held back only while
    all of them fell into the same split, and if that lasts to the end, the one whose score is
    closest to the other side moves (a single document always goes to train). With
    val_fraction 0 there is no validation split and every document goes to train.
    """
    if val_fraction == 0:
        for _, payload in docs:
            yield "train", payload
        return
    pending: list[tuple[float, str, object]] = []
    first_split = None
    for index, payload in docs:
        score = validation_score(index, seed)
        split = "val" if score < val_fraction else "train"
        if first_split is None or (pending and split == first_split):
            first_split = first_split or split
            pending.append((score, split, payload))
            continue
        if pending:
            yield from ((s, t) for _, s, t in pending)
            pending.clear()
        yield split, payload
    if not pending:
        return
    if first_split == "val":
        move, target = max(range(len(pending)), key=lambda j: pending[j][0]), "train"
    elif len(pending) >= 2:
        move, target = min(range(len(pending)), key=lambda j: pending[j][0]), "val"
    else:
        move, target = 0, "train"
    for j, (_, split, payload) in enumerate(pending):
        yield (target if j == move else split), payload


# ---------------------------------------------------------------------------------------------
# The whole preparation


def prepare_corpus(
    documents: Iterable[str],
    output_dir: str | Path,
    *,
    tokenizer_spec: str,
    seq_len: int,
    val_fraction: float = 0.05,
    seed: int = 1234,
    overwrite: bool = False,
    source_desc: str = "",
    rows_per_batch: int = DEFAULT_ROWS_PER_BATCH,
    max_rows_per_shard: int | None = None,
    dtype: str = "auto",
    workers: int = 1,
    progress: TextIO | None = None,
    spans: str | Path | None = None,
) -> dict:
    """Tokenise, split, pack and write `documents` into `output_dir`; return the manifest.

    The corpus is written into a temporary directory beside `output_dir` and renamed into place
    when complete, so an interrupted run never leaves a half-written corpus. Empty (whitespace
    only) documents are skipped. A tokenizer that must be trained (bpe/wordpiece/unigram) is
    trained on all documents first, which needs a second pass: a one-shot iterator is then held
    in memory (a DocumentReader is simply read twice). `max_rows_per_shard` (a multiple of
    `rows_per_batch`) defaults to about 256 MiB per shard. `dtype` is the token type: auto (the
    narrowest holding the vocabulary), uint16 or int32. `workers` processes tokenise; the output
    does not depend on their number. `progress`, a stream such as sys.stderr, gets a progress
    line; documents from `read_documents` also report their bad-UTF-8 skips into the manifest.
    `spans` is a JSONL file of knowledge spans by input document, or a lexicon (see the
    module docstring).
    """
    _check_args(seq_len, val_fraction, rows_per_batch, max_rows_per_shard, dtype, workers)
    doc_spans = load_spans(spans) if spans is not None else None
    output_dir = Path(output_dir).expanduser()
    _refuse_existing(output_dir, overwrite=overwrite)
    if needs_training(tokenizer_spec) and iter(documents) is documents:
        documents = list(documents)
    tokenizer = _make_tokenizer(tokenizer_spec, documents, progress=progress)
    layout = _layout(
        resolve_token_dtype(dtype, tokenizer.vocab_size),
        seq_len=seq_len,
        rows_per_batch=rows_per_batch,
        max_rows_per_shard=max_rows_per_shard,
        seed=seed,
        val_fraction=val_fraction,
    )
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    writers = {
        split: SplitWriter(
            tmp,
            split,
            sample_len=layout["sample_len"],
            dtype=layout["dtype"],
            eos_id=tokenizer.eos_id,
            rows_per_batch=rows_per_batch,
            max_rows_per_shard=layout["max_rows_per_shard"],
            spans=doc_spans is not None,
        )
        for split in (SPLITS if val_fraction > 0 else ("train",))
    }
    try:
        stats = _write_documents(
            documents,
            tokenizer,
            writers,
            dtype=np.dtype(layout["dtype"]),
            seed=seed,
            val_fraction=val_fraction,
            workers=workers,
            progress=progress,
            spans=doc_spans,
        )
        splits = _close_writers(
            writers, stats, source_desc=source_desc, sample_len=layout["sample_len"]
        )
        manifest = _manifest(tokenizer.save(tmp), tokenizer, layout, splits, stats, source_desc)
        if doc_spans is not None:
            manifest["schema_version"] = SPANS_SCHEMA_VERSION
            manifest["spans"] = {
                "source": str(spans),
                "spans": sum(split["spans"] for split in splits.values()),
            }
        write_manifest(tmp, manifest)
        _publish(tmp, output_dir, overwrite=overwrite)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _layout(
    token_type: np.dtype,
    *,
    seq_len: int,
    rows_per_batch: int,
    max_rows_per_shard: int | None,
    seed: int,
    val_fraction: float,
) -> dict:
    """The manifest fields that fix how rows are cut and stored."""
    sample_len = seq_len + 1
    if max_rows_per_shard is None:
        fit = TARGET_SHARD_BYTES // (sample_len * token_type.itemsize)
        max_rows_per_shard = max(1, fit // rows_per_batch) * rows_per_batch
    return {
        "seq_len": seq_len,
        "sample_len": sample_len,
        "dtype": token_type.name,
        "rows_per_batch": rows_per_batch,
        "max_rows_per_shard": max_rows_per_shard,
        "seed": seed,
        "val_fraction": val_fraction,
    }


def _manifest(
    saved_tokenizer: dict,
    tokenizer: Tokenizer,
    layout: dict,
    splits: dict,
    stats: dict,
    source_desc: str,
) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "created_by": "loom",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source_desc,
        "tokenizer": saved_tokenizer,
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        **layout,
        "sentence_splitter": SENTENCE_SPLITTER,
        **_totals(splits, stats),
        "splits": splits,
    }


def _totals(splits: dict, stats: dict) -> dict:
    return {
        "documents": sum(s["documents"] for s in splits.values()),
        "sentences": sum(s["sentences"] for s in splits.values()),
        "skipped_empty_documents": stats["skipped"],
        "skipped_bad_utf8": stats["bad_utf8"],
        "dropped_tokens": sum(s["dropped_tokens"] for s in splits.values()),
    }


def _make_tokenizer(spec: str, documents: Iterable[str], *, progress: TextIO | None) -> Tokenizer:
    if not needs_training(spec):
        return build_tokenizer(spec)
    if progress is not None:
        progress.write(f"training the {spec} tokenizer on the corpus...\n")
        progress.flush()
    start = time.perf_counter()
    tokenizer = build_tokenizer(
        spec, train_texts=(d for d in documents if isinstance(d, str) and d.strip())
    )
    if progress is not None:
        progress.write(
            f"trained {spec}: vocab_size {tokenizer.vocab_size} "
            f"in {time.perf_counter() - start:.1f} s\n"
        )
    return tokenizer


def _write_documents(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    writers: dict[str, SplitWriter],
    *,
    dtype: np.dtype,
    seed: int,
    val_fraction: float,
    workers: int,
    progress: TextIO | None,
    spans: dict[int, DocSpans] | Lexicon | None = None,
) -> dict:
    """Encode, split and hand every document to its split's writer; return skip counts."""
    reader = documents if isinstance(documents, DocumentReader) else None
    printer = None
    if progress is not None:
        printer = ProgressPrinter(
            progress,
            total_bytes=reader.total_bytes if reader else None,
            total_documents=len(documents) if isinstance(documents, Sequence) else None,
        )
    counts = {"documents": 0, "tokens": 0, "skipped": 0}
    encoded = encode_chunks(
        chunk_documents(documents), tokenizer, dtype=dtype, workers=workers, spans=spans
    )
    with contextlib.closing(encoded):  # on an error, stops the worker pool at once
        numbered = _numbered_documents(encoded, counts, printer)
        for split, document in _assign_splits(numbered, seed=seed, val_fraction=val_fraction):
            writers[split].add(*document)
    listed = spans if isinstance(spans, dict) else {}
    beyond = sorted(doc for doc in listed if doc >= counts["documents"])
    if beyond:
        where = listed[beyond[0]][0]
        raise ValueError(
            f"{where}: doc={beyond[0]} but the input has {counts['documents']} documents"
        )
    if printer is not None:
        final_bytes = reader.total_bytes if reader else None
        printer.update(**_printer_counts(counts), bytes_read=final_bytes, final=True)
    return {"skipped": counts["skipped"], "bad_utf8": dict(reader.bad_utf8) if reader else {}}


def _printer_counts(counts: dict) -> dict:
    return {"documents": counts["documents"], "tokens": counts["tokens"]}


def _numbered_documents(
    encoded: Iterable[tuple[DocumentChunk, EncodedChunk]],
    counts: dict,
    printer: ProgressPrinter | None,
) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """(input index, (tokens, sentence starts, spans)) per non-empty document; updates
    `counts`."""
    for chunk, enc in encoded:
        tok_end, sent_end = np.cumsum(enc.doc_tokens), np.cumsum(enc.doc_sentences)
        span_end = np.cumsum(enc.doc_spans)
        for d, index in enumerate(enc.indices.tolist()):
            t0, s0 = tok_end[d] - enc.doc_tokens[d], sent_end[d] - enc.doc_sentences[d]
            p0 = span_end[d] - enc.doc_spans[d]
            yield (
                index,
                (
                    enc.tokens[t0 : tok_end[d]],
                    enc.sent_starts[s0 : sent_end[d]],
                    enc.spans[p0 : span_end[d]],
                ),
            )
        counts["documents"] += len(chunk.texts)
        counts["tokens"] += len(enc.tokens)
        counts["skipped"] += enc.skipped
        if printer is not None:
            printer.update(**_printer_counts(counts), bytes_read=chunk.bytes_read)


def _close_writers(
    writers: dict[str, SplitWriter], stats: dict, *, source_desc: str, sample_len: int
) -> dict:
    if sum(writer.documents for writer in writers.values()) == 0:
        bad = sum(stats["bad_utf8"].values())
        raise ValueError(
            f"empty corpus: no non-empty documents in {source_desc or 'the input'}"
            f" ({stats['skipped']} empty" + (f", {bad} skipped as not UTF-8" if bad else "") + ")"
        )
    splits = {split: writer.close() for split, writer in writers.items()}
    if splits["train"]["rows"] == 0:
        raise ValueError(
            f"corpus too small: the train split has {splits['train']['dropped_tokens']} tokens, "
            f"fewer than one row of seq_len + 1 = {sample_len}"
        )
    return splits


def _check_args(seq_len, val_fraction, rows_per_batch, max_rows_per_shard, dtype, workers) -> None:
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ConfigError(f"seq_len (--seq-len) = {seq_len!r} must be a positive integer")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(
            f"val_fraction (--val-fraction) = {val_fraction!r} must be in [0, 1) "
            "(0: no validation split)"
        )
    if not isinstance(rows_per_batch, int) or rows_per_batch < 1:
        raise ConfigError(f"rows_per_batch = {rows_per_batch!r} must be a positive integer")
    if max_rows_per_shard is not None and (
        max_rows_per_shard < rows_per_batch or max_rows_per_shard % rows_per_batch
    ):
        raise ConfigError(
            f"max_rows_per_shard = {max_rows_per_shard!r} must be a positive multiple of "
            f"rows_per_batch = {rows_per_batch}"
        )
    check_token_dtype_name(dtype)
    if not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers (--workers) = {workers!r} must be a positive integer")


def _refuse_existing(output_dir: Path, *, overwrite: bool) -> None:
    if output_dir.exists() and not output_dir.is_dir():
        raise CorpusExistsError(f"output {output_dir} exists and is not a directory")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise CorpusExistsError(
            f"output directory {output_dir} already exists and is not empty; "
            "pass overwrite=True (--overwrite) to replace it"
        )


def _publish(tmp: Path, output_dir: Path, *, overwrite: bool) -> None:
    """Move the finished corpus into place (a rename: readers never see a partial corpus)."""
    old = None
    if overwrite and output_dir.exists():
        old = output_dir.parent / f".{output_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(output_dir, old)
    try:
        os.rename(tmp, output_dir)  # replaces an empty directory, fails on a non-empty one
    except OSError as err:
        if err.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise CorpusExistsError(
                f"output directory {output_dir} was filled by another process while preparing"
            ) from None
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
