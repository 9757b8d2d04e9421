"""Corpus preparation: documents -> tokenised, packed Arrow IPC shards + manifest.json.

Layout of a prepared directory::

    manifest.json          what follows, with counts and a sha256 per shard
    tokenizer.json         only for Hugging Face tokenizers
    train-00000.arrow ...  Arrow IPC *file* format, uncompressed
    val-00000.arrow ...

Every shard has two columns:
- ``tokens``: fixed_size_list<uint16|int32>[seq_len + 1]; one row is one training sample (the
  extra token lets causal LM inputs and their shifted labels both have seq_len tokens).
- ``doc_offsets``: list<int32>; the positions inside the row where a document begins.

Documents are tokenised, each followed by <eos>, concatenated per split and cut into rows; the
last partial row of each split is dropped (counted in the manifest). Every record batch except a
shard's last holds exactly ``rows_per_batch`` rows, so row -> (batch, offset) is arithmetic, and
every shard except a split's last holds exactly ``max_rows_per_shard`` rows.

Whether a document is held out for validation is a pure function of (seed, its index in the
input), so the split does not depend on how many documents follow it.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa

from data_pipeline.tokenizers import Tokenizer, build_tokenizer, needs_training

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 1
SPLITS = ("train", "val")
DEFAULT_ROWS_PER_BATCH = 1024
TARGET_SHARD_BYTES = 256 * 1024 * 1024
SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
_ENCODE_CHUNK = 512  # documents per encode_batch call


class CorpusExistsError(FileExistsError):
    """The output directory already holds a corpus (or other files)."""


# ---------------------------------------------------------------------------------------------
# Reading input files


def read_documents(
    paths: str | Path | Sequence[str | Path],
    *,
    text_key: str = "text",
    split_lines: bool = False,
) -> Iterator[str]:
    """Documents from text files, globs and directories, in a fixed order.

    - ``.txt``: the whole file is one document; with ``split_lines`` every non-blank line is one.
    - ``.jsonl``: one JSON object per line, the document is its string field ``text_key``.
    - ``.parquet``: the document is the string column ``text_key`` of each row.

    A directory contributes every supported file below it (sorted, hidden files skipped); a glob
    its matches (sorted). Missing inputs are reported here, before any document is read; bad
    content raises ValueError naming the file and line/row as it is reached.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files = resolve_input_files(paths)
    return _iter_documents(files, text_key=text_key, split_lines=split_lines)


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


def _iter_documents(files: list[Path], *, text_key: str, split_lines: bool) -> Iterator[str]:
    for path in files:
        if path.suffix == ".txt":
            yield from _read_txt(path, split_lines=split_lines)
        elif path.suffix == ".jsonl":
            yield from _read_jsonl(path, text_key=text_key)
        else:
            yield from _read_parquet(path, text_key=text_key)


def _read_txt(path: Path, *, split_lines: bool) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 (byte offset {err.start})") from None
    if not split_lines:
        yield text
        return
    for line in text.splitlines():
        if line.strip():
            yield line


def _read_jsonl(path: Path, *, text_key: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError(f"{path}, line {lineno}: not valid UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {lineno}: invalid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}"
                )
            if text_key not in record:
                keys = ", ".join(map(repr, list(record)[:10]))
                raise ValueError(
                    f"{path}, line {lineno}: no field {text_key!r} (fields: {keys}); "
                    "choose the field with --text-key"
                )
            text = record[text_key]
            if not isinstance(text, str):
                raise ValueError(
                    f"{path}, line {lineno}: field {text_key!r} is "
                    f"{type(text).__name__}, not a string"
                )
            yield text


def _read_parquet(path: Path, *, text_key: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    schema = pf.schema_arrow
    if text_key not in schema.names:
        raise ValueError(
            f"{path}: no column {text_key!r} (columns: {schema.names}); choose one with --text-key"
        )
    kind = schema.field(text_key).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ValueError(f"{path}: column {text_key!r} has type {kind}, not string")
    row = 0
    for batch in pf.iter_batches(columns=[text_key], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is None:
                raise ValueError(f"{path}, row {row}: column {text_key!r} is null")
            row += 1
            yield text


# ---------------------------------------------------------------------------------------------
# Split assignment


def validation_score(index: int, seed: int) -> float:
    """Uniform number in [0, 1) for document `index`; the document is held out if < val_fraction."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 11) / 2.0**53  # 53 bits: exact in a float


def _assign_splits(
    docs: Iterable[tuple[int, np.ndarray]], *, seed: int, val_fraction: float
) -> Iterator[tuple[str, np.ndarray]]:
    """(split, tokens) per document, in input order.

    Guarantees a document in each split once there are two: documents are held back only while
    all of them fell into the same split, and if that lasts to the end, the one whose score is
    closest to the other side moves (a single document always goes to train).
    """
    pending: list[tuple[float, str, np.ndarray]] = []
    first_split = None
    for index, tokens in docs:
        score = validation_score(index, seed)
        split = "val" if score < val_fraction else "train"
        if first_split is None or (pending and split == first_split):
            first_split = first_split or split
            pending.append((score, split, tokens))
            continue
        if pending:
            yield from ((s, t) for _, s, t in pending)
            pending.clear()
        yield split, tokens
    if not pending:
        return
    if first_split == "val":
        move, target = max(range(len(pending)), key=lambda j: pending[j][0]), "train"
    elif len(pending) >= 2:
        move, target = min(range(len(pending)), key=lambda j: pending[j][0]), "val"
    else:
        move, target = 0, "train"
    for j, (_, split, tokens) in enumerate(pending):
        yield (target if j == move else split), tokens


# ---------------------------------------------------------------------------------------------
# Writing shards


def token_dtype(vocab_size: int) -> np.dtype:
    """Narrowest integer type holding every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.int32)


def shard_schema(dtype: np.dtype, sample_len: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("tokens", pa.list_(pa.from_numpy_dtype(dtype), sample_len), nullable=False),
            pa.field("doc_offsets", pa.list_(pa.int32()), nullable=False),
        ]
    )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


class _SplitWriter:
    """Packs one split's token stream into rows and writes them as shards."""

    def __init__(
        self,
        directory: Path,
        split: str,
        *,
        sample_len: int,
        dtype: np.dtype,
        eos_id: int,
        rows_per_batch: int,
        max_rows_per_shard: int,
    ) -> None:
        self.directory, self.split = directory, split
        self.sample_len, self.dtype = sample_len, dtype
        self.rows_per_batch, self.max_rows_per_shard = rows_per_batch, max_rows_per_shard
        self.schema = shard_schema(dtype, sample_len)
        self._eos = np.array([eos_id], dtype=dtype)
        self._chunks: list[np.ndarray] = []
        self._starts: list[int] = []  # document starts, relative to the first held token
        self._held = 0  # tokens received but not yet written
        self.documents = 0
        self.shards: list[dict] = []
        self._writer = None
        self._shard_rows = 0
        self._shard_docs = 0

    def add(self, tokens: np.ndarray) -> None:
        self._starts.append(self._held)
        self._chunks += (tokens.astype(self.dtype, copy=False), self._eos)
        self._held += len(tokens) + 1
        self.documents += 1
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
            "dropped_tokens": self._held,
        }

    def _write_rows(self, *, final: bool) -> None:
        L, rpb = self.sample_len, self.rows_per_batch
        rows = self._held // L if final else (self._held // (rpb * L)) * rpb
        if rows == 0:
            return
        buf = np.concatenate(self._chunks) if len(self._chunks) > 1 else self._chunks[0]
        starts = np.asarray(self._starts, dtype=np.int64)
        for r0 in range(0, rows, rpb):
            r1 = min(r0 + rpb, rows)
            lo, hi = np.searchsorted(starts, [r0 * L, r1 * L])
            self._write_batch(buf[r0 * L : r1 * L], starts[lo:hi] - r0 * L, r1 - r0)
        used = rows * L
        self._chunks = [buf[used:].copy()] if used < len(buf) else []
        self._starts = (starts[starts >= used] - used).tolist()
        self._held -= used

    def _write_batch(self, tokens: np.ndarray, starts: np.ndarray, rows: int) -> None:
        if self._writer is None or self._shard_rows >= self.max_rows_per_shard:
            self._close_shard()
            self._open_shard()
        L = self.sample_len
        row_of_start = starts // L
        list_offsets = np.searchsorted(row_of_start, np.arange(rows + 1)).astype(np.int32)
        doc_offsets = pa.ListArray.from_arrays(
            pa.array(list_offsets), pa.array((starts % L).astype(np.int32))
        )
        batch = pa.record_batch(
            [pa.FixedSizeListArray.from_arrays(pa.array(tokens), L), doc_offsets],
            schema=self.schema,
        )
        self._writer.write_batch(batch)
        self._shard_rows += rows
        self._shard_docs += len(starts)

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
        self._shard_rows = self._shard_docs = 0

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._sink.close()
        self._writer = None
        self.shards.append(
            {
                "file": self._path.name,
                "rows": self._shard_rows,
                "tokens": self._shard_rows * self.sample_len,
                "documents": self._shard_docs,
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
) -> dict:
    """Tokenise, split, pack and write `documents` into `output_dir`; return the manifest.

    The corpus is written into a temporary directory beside `output_dir` and renamed into place
    when complete, so an interrupted run never leaves a half-written corpus. Empty (whitespace
    only) documents are skipped. A tokenizer that must be trained (bpe/wordpiece) is trained on
    all documents first, which needs a second pass: a one-shot iterator is then held in memory.
    `max_rows_per_shard` (a multiple of `rows_per_batch`) defaults to about 256 MiB per shard.
    """
    _check_args(seq_len, val_fraction, rows_per_batch, max_rows_per_shard)
    output_dir = Path(output_dir).expanduser()
    _refuse_existing(output_dir, overwrite=overwrite)
    if needs_training(tokenizer_spec):
        if iter(documents) is documents:
            documents = list(documents)
        tokenizer = build_tokenizer(tokenizer_spec, train_texts=(d for d in documents if d.strip()))
    else:
        tokenizer = build_tokenizer(tokenizer_spec)

    sample_len = seq_len + 1
    dtype = token_dtype(tokenizer.vocab_size)
    if max_rows_per_shard is None:
        fit = TARGET_SHARD_BYTES // (sample_len * dtype.itemsize)
        max_rows_per_shard = max(1, fit // rows_per_batch) * rows_per_batch

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    writers: dict[str, _SplitWriter] = {}
    try:
        writers = {
            split: _SplitWriter(
                tmp,
                split,
                sample_len=sample_len,
                dtype=dtype,
                eos_id=tokenizer.eos_id,
                rows_per_batch=rows_per_batch,
                max_rows_per_shard=max_rows_per_shard,
            )
            for split in SPLITS
        }
        counter = {"skipped": 0}
        tokenized = _tokenize(documents, tokenizer, counter)
        for split, tokens in _assign_splits(tokenized, seed=seed, val_fraction=val_fraction):
            writers[split].add(tokens)
        if writers["train"].documents + writers["val"].documents == 0:
            raise ValueError(
                f"empty corpus: no non-empty documents in {source_desc or 'the input'}"
            )
        splits = {split: writer.close() for split, writer in writers.items()}
        if splits["train"]["rows"] == 0:
            raise ValueError(
                f"corpus too small: the train split has "
                f"{splits['train']['dropped_tokens']} tokens, "
                f"fewer than one row of seq_len + 1 = {sample_len}"
            )
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created_by": "loom",
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "source": source_desc,
            "tokenizer": tokenizer.save(tmp),
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "pad_id": tokenizer.pad_id,
            "seq_len": seq_len,
            "sample_len": sample_len,
            "dtype": dtype.name,
            "rows_per_batch": rows_per_batch,
            "max_rows_per_shard": max_rows_per_shard,
            "seed": seed,
            "val_fraction": val_fraction,
            "documents": sum(s["documents"] for s in splits.values()),
            "skipped_empty_documents": counter["skipped"],
            "dropped_tokens": sum(s["dropped_tokens"] for s in splits.values()),
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


def _check_args(seq_len, val_fraction, rows_per_batch, max_rows_per_shard) -> None:
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


def _tokenize(
    documents: Iterable[str], tokenizer: Tokenizer, counter: dict
) -> Iterator[tuple[int, np.ndarray]]:
    """(input index, token ids) of every non-empty document, encoded in chunks."""
    numbered = enumerate(documents)
    while chunk := list(islice(numbered, _ENCODE_CHUNK)):
        kept = []
        for index, text in chunk:
            if not isinstance(text, str):
                raise TypeError(f"document {index} is {type(text).__name__}, not str")
            if text.strip():
                kept.append((index, text))
            else:
                counter["skipped"] += 1
        if kept:
            encoded = tokenizer.encode_batch([text for _, text in kept])
            yield from zip((index for index, _ in kept), encoded, strict=True)


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


def load_manifest(directory: str | Path) -> dict:
    """Read and sanity-check `directory`/manifest.json."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {directory} is not a corpus written by launch/prepare_data.py"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version={manifest.get('schema_version')!r}, this reader "
            f"understands {SCHEMA_VERSION}; prepare the corpus again"
        )
    required = (
        "tokenizer",
        "vocab_size",
        "seq_len",
        "sample_len",
        "dtype",
        "rows_per_batch",
        "splits",
    )
    for key in required:
        if key not in manifest:
            raise ValueError(f"{path}: missing field {key!r}")
    if manifest["dtype"] not in ("uint16", "int32"):
        raise ValueError(f"{path}: field 'dtype'={manifest['dtype']!r} must be uint16 or int32")
    if manifest["sample_len"] != manifest["seq_len"] + 1:
        raise ValueError(f"{path}: sample_len must equal seq_len + 1")
    return manifest
