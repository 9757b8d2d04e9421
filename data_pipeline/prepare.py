"""Corpus preparation: documents -> tokenised, packed Arrow IPC shards + manifest.json.

Layout of a prepared directory::

    manifest.json          what follows, with counts and a sha256 per shard
    tokenizer.json         only for Hugging Face tokenizers (tokenizer.model for SentencePiece)
    train-00000.arrow ...  Arrow IPC *file* format, uncompressed
    val-00000.arrow ...

Every shard has three columns (`shard_schema`):
- ``tokens``: fixed_size_list<uint16|int32>[seq_len + 1]; one row is one training sample (the
  extra token lets causal LM inputs and their shifted labels both have seq_len tokens).
- ``doc_offsets``: list<int32>; the positions inside the row where a document begins.
- ``sent_offsets``: list<int32>; the positions inside the row where a sentence begins. A
  document start is also a sentence start; a sentence continued from the previous row has no
  entry. The <eos> after a document belongs to its last sentence.

Documents are cut into sentences by `split_sentences`, tokenised sentence by sentence and
concatenated (so sentence starts are exact token positions), each document followed by <eos>,
concatenated per split and cut into rows; the last partial row of each split is dropped (counted
in the manifest). Every record batch except a shard's last holds exactly ``rows_per_batch`` rows,
so row -> (batch, offset) is arithmetic, and every shard except a split's last holds exactly
``max_rows_per_shard`` rows.

Whether a document is held out for validation is a pure function of (seed, its index in the
input), so the split does not depend on how many documents follow it. Tokenisation may run in
worker processes; they encode fixed chunks of documents and the results are consumed in input
order, so the output is byte-identical for every worker count.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import time
import uuid
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple, TextIO

import numpy as np
import pyarrow as pa

from data_pipeline.tokenizers import Tokenizer, build_tokenizer, needs_training

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 2
SPLITS = ("train", "val")
DEFAULT_ROWS_PER_BATCH = 1024
TARGET_SHARD_BYTES = 256 * 1024 * 1024
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
TOKEN_DTYPES = ("auto", "uint16", "int32")
BAD_UTF8_POLICIES = ("error", "skip")
# Names the rule of `split_sentences` in the manifest; bump when the rule changes.
SENTENCE_SPLITTER = "punct-newline-v1"
_CHUNK_DOCS = 512  # documents per encoding task
_CHUNK_CHARS = 4 << 20  # ... or fewer, when they are long (bounds a task's memory)
_TASKS_PER_WORKER = 2  # encoding tasks in flight per worker process
_UINT16_IDS = 65536


class CorpusExistsError(FileExistsError):
    """The output directory already holds a corpus (or other files)."""


# ---------------------------------------------------------------------------------------------
# Reading input files


def read_documents(
    paths: str | Path | Sequence[str | Path],
    *,
    text_key: str = "text",
    split_lines: bool = False,
    on_bad_utf8: str = "error",
) -> DocumentReader:
    """Documents from text files, globs and directories, in a fixed order (see DocumentReader).

    Missing inputs are reported here, before any document is read.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = resolve_input_files(paths)
    return DocumentReader(
        files, text_key=text_key, split_lines=split_lines, on_bad_utf8=on_bad_utf8
    )


def resolve_input_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand globs and directories into the sorted list of input files."""
    if not paths:
        raise ValueError("no input files given (--input)")
    files: list[Path] = []
    for raw in paths:
        text = str(raw)
        if glob.has_magic(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise FileNotFoundError(f"input pattern {text!r} matches no files")
            candidates = [Path(m) for m in matches]
        else:
            candidates = [Path(text).expanduser()]
        for path in candidates:
            files.extend(_files_of(path, explicit=not glob.has_magic(text)))
    if not files:
        raise FileNotFoundError(
            f"no {'/'.join(SUPPORTED_SUFFIXES)} files found in {[str(p) for p in paths]}"
        )
    return files


def _files_of(path: Path, *, explicit: bool) -> list[Path]:
    if path.is_dir():
        found = (
            p
            for p in sorted(path.rglob("*"))
            if p.is_file()
            and p.suffix in SUPPORTED_SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        return list(found)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.suffix not in SUPPORTED_SUFFIXES:
        if not explicit:
            return []
        raise ValueError(
            f"input {path}: unsupported file type {path.suffix!r} "
            f"(supported: {', '.join(SUPPORTED_SUFFIXES)})"
        )
    return [path]


# A lone surrogate can come from a JSON "\ud800" escape; it has no UTF-8 encoding.
_SURROGATE = re.compile("[\ud800-\udfff]")


class DocumentReader:
    """The documents of a list of input files; iterable any number of times.

    - ``.txt``: the whole file is one document; with ``split_lines`` every non-blank line is one.
    - ``.jsonl``: one JSON object per line, the document is its string field ``text_key``.
    - ``.parquet``: the document is the string column ``text_key`` of each row.

    Bad content raises ValueError naming the file and line/row as it is reached. Text that is
    not valid UTF-8 is an error too, unless ``on_bad_utf8="skip"``: then the document (a whole
    .txt file without ``split_lines``, else the line or row) is left out and counted per file
    in `bad_utf8`. `bytes_read` of `total_bytes` tells how far the current pass has got.
    """

    def __init__(
        self,
        files: Sequence[Path],
        *,
        text_key: str = "text",
        split_lines: bool = False,
        on_bad_utf8: str = "error",
    ) -> None:
        if on_bad_utf8 not in BAD_UTF8_POLICIES:
            raise ValueError(
                f"on_bad_utf8 (--on-bad-utf8) = {on_bad_utf8!r} must be one of {BAD_UTF8_POLICIES}"
            )
        self.files = [Path(f) for f in files]
        self.text_key, self.split_lines, self.on_bad_utf8 = text_key, split_lines, on_bad_utf8
        self._sizes = [_file_size(f) for f in self.files]
        self.total_bytes = sum(self._sizes)
        self.bytes_read = 0
        self.bad_utf8: dict[str, int] = {}

    def __iter__(self) -> Iterator[str]:
        self.bytes_read = 0
        self.bad_utf8 = {}
        for path, size in zip(self.files, self._sizes, strict=True):
            start = self.bytes_read
            try:
                if path.suffix == ".txt" and not self.split_lines:
                    yield from self._read_txt(path)
                elif path.suffix == ".txt":
                    yield from self._read_lines(path)
                elif path.suffix == ".jsonl":
                    yield from self._read_jsonl(path)
                else:
                    yield from self._read_parquet(path, size)
            except OSError as err:
                raise OSError(f"input {path} cannot be read: {err.strerror or err}") from err
            self.bytes_read = start + size

    def _bad_utf8(self, where: str, path: Path) -> None:
        """Count a document that is not valid UTF-8, or raise (policy "error")."""
        if self.on_bad_utf8 == "error":
            raise ValueError(
                f"{where}: not valid UTF-8; pass on_bad_utf8='skip' (--on-bad-utf8 skip) "
                "to leave such documents out"
            )
        self.bad_utf8[str(path)] = self.bad_utf8.get(str(path), 0) + 1

    def _read_txt(self, path: Path) -> Iterator[str]:
        data = path.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            self._bad_utf8(f"{path}, line {line} (byte offset {err.start})", path)
            return
        yield text

    def _read_lines(self, path: Path) -> Iterator[str]:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                self.bytes_read += len(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self._bad_utf8(f"{path}, line {lineno}", path)
                    continue
                # splitlines also breaks at \r, \v, \f, \u2028...: one document per line of text
                yield from (part for part in line.splitlines() if part.strip())

    def _read_jsonl(self, path: Path) -> Iterator[str]:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                self.bytes_read += len(raw)
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    self._bad_utf8(f"{path}, line {lineno}", path)
                    continue
                if not line.strip():
                    continue
                text = _jsonl_text(line, self.text_key, where=f"{path}, line {lineno}")
                if b"\\u" in raw and _SURROGATE.search(text):
                    self._bad_utf8(f"{path}, line {lineno} (a lone surrogate escape)", path)
                    continue
                yield text

    def _read_parquet(self, path: Path, size: int) -> Iterator[str]:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
        column = _parquet_text_column(pf, path, self.text_key)
        binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
        start, total_rows, row = self.bytes_read, max(pf.metadata.num_rows, 1), 0
        try:
            for batch in pf.iter_batches(columns=[self.text_key], batch_size=1024):
                # As bytes: pyarrow does not check UTF-8 when reading, and one bad value would
                # fail the whole batch's conversion without saying which row.
                for raw in batch.column(0).cast(binary).to_pylist():
                    if raw is None:
                        raise ValueError(f"{path}, row {row}: column {self.text_key!r} is null")
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        self._bad_utf8(f"{path}, row {row}", path)
                    else:
                        yield text
                    row += 1
                self.bytes_read = start + size * row // total_rows
        except pa.ArrowException as err:
            raise ValueError(f"{path}, near row {row}: unreadable Parquet data ({err})") from None


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as err:
        raise OSError(f"input {path} cannot be read: {err.strerror or err}") from err


def _jsonl_text(line: str, text_key: str, *, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_key not in record:
        keys = ", ".join(map(repr, list(record)[:10]))
        raise ValueError(
            f"{where}: no field {text_key!r} (fields: {keys}); choose the field with --text-key"
        )
    text = record[text_key]
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_key!r} is {type(text).__name__}, not a string")
    return text


def _parquet_text_column(pf, path: Path, text_key: str) -> pa.Field:
    schema = pf.schema_arrow
    if text_key not in schema.names:
        raise ValueError(
            f"{path}: no column {text_key!r} (columns: {schema.names}); choose one with --text-key"
        )
    field = schema.field(text_key)
    if not (pa.types.is_string(field.type) or pa.types.is_large_string(field.type)):
        raise ValueError(f"{path}: column {text_key!r} has type {field.type}, not string")
    return field


# ---------------------------------------------------------------------------------------------
# Sentences

# A sentence ends at . ! or ? (optionally followed by closing quotes or brackets) followed by
# whitespace, and at a line break. The whitespace between two sentences opens the second one:
# byte-level pre-tokenization never joins a non-space character to the space after it, so
# cutting there tokenises each sentence exactly as inside the whole document (and SentencePiece
# and WordPiece treat a leading space as a word boundary anyway). `(?<!\s)` lets only the first
# character of a whitespace run start the line-break match, which keeps the scan linear; the
# leading lookahead rejects most positions at once (about 40% faster).
_SENTENCE_BREAK = re.compile(r"(?=[.!?\s])(?:([.!?][\"')\]]*)\s+(?=\S)|(?<!\s)\s*\n\s*(?=\S))")


def split_sentences(text: str) -> list[str]:
    """`text` cut into sentences by a fixed rule; the pieces concatenate back to `text`.

    A sentence ends after end punctuation (. ! ?, optionally with closing quotes/brackets)
    followed by whitespace, and before any whitespace containing a newline (so a blank line
    too). The whitespace between two sentences starts the second; whitespace before the first
    non-space character stays in the first. Abbreviations ("e.g. this") also break: the rule is
    deliberately simple and deterministic, like the line-based input of BERT's data creation.
    """
    cuts = []
    for m in _SENTENCE_BREAK.finditer(text):
        cut = m.end(1) if m.group(1) is not None else m.start()
        if cut > 0:  # leading whitespace is not a sentence of its own
            cuts.append(cut)
    if not cuts:
        return [text]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


# ---------------------------------------------------------------------------------------------
# Encoding, in this process or in worker processes


class _EncodedChunk(NamedTuple):
    """Non-empty documents of one chunk, each as tokens and sentence starts, concatenated."""

    indices: np.ndarray  # int64 [docs]: input index of each kept document
    doc_tokens: np.ndarray  # int64 [docs]: its token count
    tokens: np.ndarray  # dtype [sum(doc_tokens)]
    doc_sentences: np.ndarray  # int64 [docs]: its number of sentences
    sent_starts: np.ndarray  # int32 [sum(doc_sentences)]: start of each, relative to its doc
    skipped: int  # empty (whitespace only) documents left out


def _encode_chunk(
    tokenizer: Tokenizer, texts: Sequence[str], *, first_index: int, dtype: np.dtype
) -> _EncodedChunk:
    """Tokenise documents first_index, first_index + 1, ... sentence by sentence."""
    kept, sentences, per_doc = [], [], []
    for k, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"document {first_index + k} is {type(text).__name__}, not str")
        if text.strip():
            parts = split_sentences(text)
            kept.append(first_index + k)
            sentences += parts
            per_doc.append(len(parts))
    if not kept:
        empty = np.zeros(0, dtype=np.int64)
        return _EncodedChunk(
            empty, empty, np.zeros(0, dtype), empty, empty.astype(np.int32), len(texts)
        )
    ids, lens = tokenizer.encode_concat(sentences)
    tokens = ids.astype(dtype)
    per_doc_n = np.asarray(per_doc, dtype=np.int64)
    sent_doc = np.repeat(np.arange(len(kept)), per_doc_n)
    first_of_doc = np.cumsum(per_doc_n) - per_doc_n
    sent_begin = np.cumsum(lens) - lens  # in the chunk's token stream
    doc_tokens = np.add.reduceat(lens, first_of_doc)
    # A sentence that encodes to nothing (e.g. only characters a normalizer drops) has no
    # start; a document with no tokens at all still starts one at 0 (its <eos>).
    is_first = np.zeros(len(lens), dtype=bool)
    is_first[first_of_doc] = True
    keep = (lens > 0) | (is_first & (doc_tokens[sent_doc] == 0))
    starts = sent_begin - sent_begin[first_of_doc][sent_doc]
    return _EncodedChunk(
        indices=np.asarray(kept, dtype=np.int64),
        doc_tokens=doc_tokens,
        tokens=tokens,
        doc_sentences=np.bincount(sent_doc[keep], minlength=len(kept)).astype(np.int64),
        sent_starts=starts[keep].astype(np.int32),
        skipped=len(texts) - len(kept),
    )


class _Chunk(NamedTuple):
    first_index: int
    texts: list[str]
    bytes_read: int | None  # input position after its last document, when known


def _chunks(documents: Iterable[str]) -> Iterator[_Chunk]:
    reader = documents if isinstance(documents, DocumentReader) else None
    texts: list[str] = []
    chars, first = 0, 0
    for text in documents:
        texts.append(text)
        chars += len(text) if isinstance(text, str) else 0
        if len(texts) >= _CHUNK_DOCS or chars >= _CHUNK_CHARS:
            yield _Chunk(first, texts, reader.bytes_read if reader else None)
            first += len(texts)
            texts, chars = [], 0
    if texts:
        yield _Chunk(first, texts, reader.bytes_read if reader else None)


_WORKER_STATE: dict = {}


def _init_worker(tokenizer: Tokenizer, dtype: str) -> None:
    _WORKER_STATE["tokenizer"], _WORKER_STATE["dtype"] = tokenizer, np.dtype(dtype)


def _encode_in_worker(texts: list[str], first_index: int) -> _EncodedChunk:
    return _encode_chunk(
        _WORKER_STATE["tokenizer"],
        texts,
        first_index=first_index,
        dtype=_WORKER_STATE["dtype"],
    )


def _encoded_chunks(
    chunks: Iterator[_Chunk], tokenizer: Tokenizer, *, dtype: np.dtype, workers: int
) -> Iterator[tuple[_Chunk, _EncodedChunk]]:
    """Each chunk with its encoding, in input order, encoded by `workers` processes."""
    if workers == 1:
        for chunk in chunks:
            enc = _encode_chunk(tokenizer, chunk.texts, first_index=chunk.first_index, dtype=dtype)
            yield chunk, enc
        return
    # spawn, not fork: the parent may hold threads (torch, the tokenizers thread pool) whose
    # locks a forked child would inherit in a held state. An executor rather than
    # multiprocessing.Pool, which silently replaces a worker that dies and then waits forever.
    pool = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(tokenizer, dtype.name),
    )
    pending: deque = deque()
    try:
        for chunk in chunks:  # submitted lazily: at most a few tasks per worker in memory
            future = pool.submit(_encode_in_worker, chunk.texts, chunk.first_index)
            pending.append((chunk, future))
            if len(pending) >= _TASKS_PER_WORKER * workers:
                done, future = pending.popleft()
                yield done, _result(future)
        while pending:
            done, future = pending.popleft()
            yield done, _result(future)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _result(future) -> _EncodedChunk:
    try:
        return future.result()
    except BrokenProcessPool as err:
        raise RuntimeError(
            "a tokenizer worker process died: killed, out of memory, or started from a script "
            "without an `if __name__ == '__main__':` guard (spawned workers import the main "
            "module); run with workers=1 (--workers 1) to see any error in this process"
        ) from err


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
    closest to the other side moves (a single document always goes to train).
    """
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
# Writing shards


def token_dtype(vocab_size: int) -> np.dtype:
    """Narrowest integer type holding every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= _UINT16_IDS else np.dtype(np.int32)


def resolve_token_dtype(name: str, vocab_size: int) -> np.dtype:
    """The token dtype for --dtype `name` (auto | uint16 | int32), checked against the vocab."""
    if name not in TOKEN_DTYPES:
        raise ValueError(f"dtype (--dtype) = {name!r} is unknown; choose one of {TOKEN_DTYPES}")
    if name == "auto":
        return token_dtype(vocab_size)
    if name == "uint16" and vocab_size > _UINT16_IDS:
        raise ValueError(
            f"dtype (--dtype) uint16 holds ids 0..65535, but the tokenizer's vocab_size is "
            f"{vocab_size}; use --dtype int32 or auto"
        )
    return np.dtype(name)


def shard_schema(dtype: np.dtype, sample_len: int) -> pa.Schema:
    """The one definition of a shard's columns (see the module docstring)."""
    return pa.schema(
        [
            pa.field("tokens", pa.list_(pa.from_numpy_dtype(dtype), sample_len), nullable=False),
            pa.field("doc_offsets", pa.list_(pa.int32()), nullable=False),
            pa.field("sent_offsets", pa.list_(pa.int32()), nullable=False),
        ]
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _offsets_column(starts: np.ndarray, rows: int, sample_len: int) -> pa.ListArray:
    """list<int32> column: for each of `rows` rows, the `starts` (sorted, relative to the first
    row's first token) that fall inside it, as positions within the row."""
    row_of_start = starts // sample_len
    list_offsets = np.searchsorted(row_of_start, np.arange(rows + 1)).astype(np.int32)
    return pa.ListArray.from_arrays(
        pa.array(list_offsets), pa.array((starts % sample_len).astype(np.int32))
    )


class _SplitWriter:
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
    ) -> None:
        self.directory, self.split = directory, split
        self.sample_len, self.dtype = sample_len, np.dtype(dtype)
        self.rows_per_batch, self.max_rows_per_shard = rows_per_batch, max_rows_per_shard
        self.schema = shard_schema(self.dtype, sample_len)
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

    def add(self, tokens: np.ndarray, sent_starts: np.ndarray) -> None:
        self._starts.append(self._held)
        self._sent_parts.append(sent_starts.astype(np.int64) + self._held)
        self._chunks += (tokens.astype(self.dtype, copy=False), self._eos)
        self._held += len(tokens) + 1
        self.documents += 1
        self.sentences += len(sent_starts)
        if self._held >= self.rows_per_batch * self.sample_len:
            self._write_rows(final=False)

    def close(self) -> dict:
        self._write_rows(final=True)
        self._close_shard()
        rows = sum(s["rows"] for s in self.shards)
        return {
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
        for r0 in range(0, rows, rpb):
            r1 = min(r0 + rpb, rows)
            lo, hi = np.searchsorted(starts, [r0 * L, r1 * L])
            s_lo, s_hi = np.searchsorted(sents, [r0 * L, r1 * L])
            self._write_batch(
                buf[r0 * L : r1 * L], starts[lo:hi] - r0 * L, sents[s_lo:s_hi] - r0 * L, r1 - r0
            )
        used = rows * L
        self._chunks = [buf[used:].copy()] if used < len(buf) else []
        self._starts = (starts[starts >= used] - used).tolist()
        self._sent_parts = [sents[sents >= used] - used]
        self._held -= used

    def _write_batch(
        self, tokens: np.ndarray, starts: np.ndarray, sents: np.ndarray, rows: int
    ) -> None:
        if self._writer is None or self._shard["rows"] >= self.max_rows_per_shard:
            self._close_shard()
            self._open_shard()
        L = self.sample_len
        batch = pa.record_batch(
            [
                pa.FixedSizeListArray.from_arrays(pa.array(tokens), L),
                _offsets_column(starts, rows, L),
                _offsets_column(sents, rows, L),
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
    """
    _check_args(seq_len, val_fraction, rows_per_batch, max_rows_per_shard, dtype, workers)
    output_dir = Path(output_dir).expanduser()
    _refuse_existing(output_dir, overwrite=overwrite)
    if needs_training(tokenizer_spec) and iter(documents) is documents:
        documents = list(documents)
    tokenizer = _make_tokenizer(tokenizer_spec, documents, progress=progress)
    token_type = resolve_token_dtype(dtype, tokenizer.vocab_size)
    sample_len = seq_len + 1
    if max_rows_per_shard is None:
        fit = TARGET_SHARD_BYTES // (sample_len * token_type.itemsize)
        max_rows_per_shard = max(1, fit // rows_per_batch) * rows_per_batch

    layout = {
        "seq_len": seq_len,
        "sample_len": sample_len,
        "dtype": token_type.name,
        "rows_per_batch": rows_per_batch,
        "max_rows_per_shard": max_rows_per_shard,
        "seed": seed,
        "val_fraction": val_fraction,
    }
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    writers = {
        split: _SplitWriter(
            tmp,
            split,
            sample_len=sample_len,
            dtype=token_type.name,
            eos_id=tokenizer.eos_id,
            rows_per_batch=rows_per_batch,
            max_rows_per_shard=max_rows_per_shard,
        )
        for split in SPLITS
    }
    try:
        stats = _write_documents(
            documents,
            tokenizer,
            writers,
            dtype=token_type,
            seed=seed,
            val_fraction=val_fraction,
            workers=workers,
            progress=progress,
        )
        splits = _close_writers(writers, stats, source_desc=source_desc, sample_len=sample_len)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created_by": "loom",
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": source_desc,
            "tokenizer": tokenizer.save(tmp),
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
            **layout,
            "sentence_splitter": SENTENCE_SPLITTER,
            **_totals(splits, stats),
            "splits": splits,
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, output_dir, overwrite=overwrite)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


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
    writers: dict[str, _SplitWriter],
    *,
    dtype: np.dtype,
    seed: int,
    val_fraction: float,
    workers: int,
    progress: TextIO | None,
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
    encoded = _encoded_chunks(_chunks(documents), tokenizer, dtype=dtype, workers=workers)
    with contextlib.closing(encoded):  # on an error, stops the worker pool at once
        numbered = _numbered_documents(encoded, counts, printer)
        for split, (tokens, sent_starts) in _assign_splits(
            numbered, seed=seed, val_fraction=val_fraction
        ):
            writers[split].add(tokens, sent_starts)
    if printer is not None:
        final_bytes = reader.total_bytes if reader else None
        printer.update(**_printer_counts(counts), bytes_read=final_bytes, final=True)
    return {"skipped": counts["skipped"], "bad_utf8": dict(reader.bad_utf8) if reader else {}}


def _printer_counts(counts: dict) -> dict:
    return {"documents": counts["documents"], "tokens": counts["tokens"]}


def _numbered_documents(
    encoded: Iterable[tuple[_Chunk, _EncodedChunk]], counts: dict, printer: ProgressPrinter | None
) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray]]]:
    """(input index, (tokens, sentence starts)) per non-empty document; updates `counts`."""
    for chunk, enc in encoded:
        tok_end, sent_end = np.cumsum(enc.doc_tokens), np.cumsum(enc.doc_sentences)
        for d, index in enumerate(enc.indices.tolist()):
            t0, s0 = tok_end[d] - enc.doc_tokens[d], sent_end[d] - enc.doc_sentences[d]
            yield index, (enc.tokens[t0 : tok_end[d]], enc.sent_starts[s0 : sent_end[d]])
        counts["documents"] += len(chunk.texts)
        counts["tokens"] += len(enc.tokens)
        counts["skipped"] += enc.skipped
        if printer is not None:
            printer.update(**_printer_counts(counts), bytes_read=chunk.bytes_read)


def _close_writers(
    writers: dict[str, _SplitWriter], stats: dict, *, source_desc: str, sample_len: int
) -> dict:
    if writers["train"].documents + writers["val"].documents == 0:
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
        raise ValueError(f"seq_len (--seq-len) = {seq_len!r} must be a positive integer")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction (--val-fraction) = {val_fraction!r} must be in (0, 1)")
    if not isinstance(rows_per_batch, int) or rows_per_batch < 1:
        raise ValueError(f"rows_per_batch = {rows_per_batch!r} must be a positive integer")
    if max_rows_per_shard is not None and (
        max_rows_per_shard < rows_per_batch or max_rows_per_shard % rows_per_batch
    ):
        raise ValueError(
            f"max_rows_per_shard = {max_rows_per_shard!r} must be a positive multiple of "
            f"rows_per_batch = {rows_per_batch}"
        )
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"dtype (--dtype) = {dtype!r} is unknown; choose one of {TOKEN_DTYPES}")
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers (--workers) = {workers!r} must be a positive integer")


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
