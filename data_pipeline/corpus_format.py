"""The on-disk format of a prepared corpus: its files, shard schema and manifest.

Layout of a prepared directory::

    manifest.json          what follows, with counts and a sha256 per shard
    tokenizer.json         only for Hugging Face tokenizers (tokenizer.model for SentencePiece)
    train-00000.arrow ...  Arrow IPC *file* format, uncompressed
    val-00000.arrow ...    absent when the corpus was prepared with --val-fraction 0

Every shard has three columns (`shard_schema`):
- ``tokens``: fixed_size_list<uint16|int32>[seq_len + 1]; one row is one training sample (the
  extra token lets causal LM inputs and their shifted labels both have seq_len tokens).
- ``doc_offsets``: list<int32>; the positions inside the row where a document begins.
- ``sent_offsets``: list<int32>; the positions inside the row where a sentence begins. A
  document start is also a sentence start; a sentence continued from the previous row has no
  entry. The <eos> after a document belongs to its last sentence.

A corpus prepared with knowledge spans (``prepare_data.py --spans``, schema_version 3) has three
more list<int32> columns of positions inside the row, as ``sent_offsets``: ``phrase_offsets``
and ``entity_offsets`` where a phrase or entity span begins, ``span_end_offsets`` where one
ends (the first token after it). A span's tokens run from its start to its end or the next
span start; a span continued from the previous row has no start in this row and is not one.

Every record batch except a shard's last holds exactly ``rows_per_batch`` rows, so row ->
(batch, offset) is arithmetic, and every shard except a split's last holds exactly
``max_rows_per_shard`` rows.

The manifest lists each split under ``splits`` with its shards. A corpus prepared with
``--val-fraction 0`` lists no "val" split: it trains with ``trainer.eval_every=0``.
`has_split` tells a reader whether a split is there before it opens it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from common.errors import ConfigError, DataError

MANIFEST_FILE = "manifest.json"
SCHEMA_VERSION = 2
# Written instead of SCHEMA_VERSION when the corpus carries knowledge spans.
SPANS_SCHEMA_VERSION = 3
# Manifest schema versions the reader understands: 1 has document offsets only, 2 adds the
# `sent_offsets` column (sentence starts), 3 the span columns. With version 1, document
# starts are the only sentence starts.
SCHEMA_VERSIONS = (1, 2, 3)
SPLITS = ("train", "val")
TOKEN_DTYPES = ("auto", "uint16", "int32")
TOKENS_COLUMN, DOC_COLUMN, SENT_COLUMN = "tokens", "doc_offsets", "sent_offsets"
# Span starts by kind (documents.SPAN_CODES 1, 2), then span ends (schema_version 3).
SPAN_COLUMNS = ("phrase_offsets", "entity_offsets", "span_end_offsets")
_UINT16_IDS = 65536
_REQUIRED_FIELDS = (
    "tokenizer", "vocab_size", "seq_len", "sample_len", "dtype", "rows_per_batch", "splits"
)  # fmt: skip
_SHARD_FIELDS = (("file", str), ("rows", int), ("bytes", int), ("sha256", str))
# What a user who points the trainer at something that is not a corpus must change.
_PATH_FIELDS = "data.path (or data.sources)"


class MissingCorpusFileError(DataError, FileNotFoundError):
    """A corpus directory, manifest, shard or tokenizer file that is not there."""


# ---------------------------------------------------------------------------------------------
# Shards


def token_dtype(vocab_size: int) -> np.dtype:
    """Narrowest integer type holding every id of the vocabulary."""
    return np.dtype(np.uint16) if vocab_size <= _UINT16_IDS else np.dtype(np.int32)


def check_token_dtype_name(name: str) -> None:
    """ConfigError unless `name` is one of TOKEN_DTYPES."""
    if name not in TOKEN_DTYPES:
        raise ConfigError(f"dtype (--dtype) = {name!r} is unknown; choose one of {TOKEN_DTYPES}")


def resolve_token_dtype(name: str, vocab_size: int) -> np.dtype:
    """The token dtype for --dtype `name` (auto | uint16 | int32), checked against the vocab."""
    check_token_dtype_name(name)
    if name == "auto":
        return token_dtype(vocab_size)
    if name == "uint16" and vocab_size > _UINT16_IDS:
        raise ValueError(
            f"dtype (--dtype) uint16 holds ids 0..65535, but the tokenizer's vocab_size is "
            f"{vocab_size}; use --dtype int32 or auto"
        )
    return np.dtype(name)


def shard_schema(dtype: np.dtype, sample_len: int, *, spans: bool = False) -> pa.Schema:
    """The one definition of a shard's columns (see the module docstring)."""
    tokens = pa.list_(pa.from_numpy_dtype(dtype), sample_len)
    lists = [DOC_COLUMN, SENT_COLUMN, *(SPAN_COLUMNS if spans else ())]
    return pa.schema(
        [
            pa.field(TOKENS_COLUMN, tokens, nullable=False),
            *(pa.field(name, pa.list_(pa.int32()), nullable=False) for name in lists),
        ]
    )


def expected_schema(dtype: np.dtype, sample_len: int, *, schema_version: int) -> pa.Schema:
    """The shard schema a manifest of `schema_version` promises (version 1 shards lack the
    sentence column)."""
    schema = shard_schema(dtype, sample_len, spans=schema_version == SPANS_SCHEMA_VERSION)
    if schema_version == 1:
        schema = schema.remove(schema.get_field_index(SENT_COLUMN))
    return schema


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 8 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# The manifest


def write_manifest(directory: str | Path, manifest: dict) -> None:
    """Write `manifest` as `directory`/manifest.json."""
    text = json.dumps(manifest, indent=2) + "\n"
    (Path(directory) / MANIFEST_FILE).write_text(text, encoding="utf-8")


def read_manifest(directory: str | Path) -> dict:
    """`directory`/manifest.json, checked; any schema version in SCHEMA_VERSIONS.

    Raises MissingCorpusFileError (a DataError and a FileNotFoundError) when `directory` holds
    no manifest, and DataError when the manifest cannot be used.
    """
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        why = "does not exist" if not Path(directory).exists() else "holds no corpus"
        raise MissingCorpusFileError(
            f"{path} not found: {directory} {why} (a corpus is written by "
            f"launch/prepare_data.py); set {_PATH_FIELDS} to a prepared corpus"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object")
    _check_manifest_fields(manifest, path)
    return manifest


def _check_manifest_fields(manifest: dict, path: Path) -> None:
    version = manifest.get("schema_version")
    if isinstance(version, bool) or version not in SCHEMA_VERSIONS:
        raise DataError(
            f"{path}: schema_version={version!r}, this reader understands "
            f"{' or '.join(map(str, SCHEMA_VERSIONS))}; prepare the corpus again"
        )
    for key in _REQUIRED_FIELDS:
        if key not in manifest:
            raise DataError(f"{path}: missing field {key!r}")
    for key in ("vocab_size", "seq_len", "rows_per_batch"):
        value = manifest.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{path}: field {key!r}={value!r} must be a positive integer")
    if not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{path}: field 'splits' is missing or not an object")
    if manifest["dtype"] not in ("uint16", "int32"):
        raise DataError(f"{path}: field 'dtype'={manifest['dtype']!r} must be uint16 or int32")
    if manifest["sample_len"] != manifest["seq_len"] + 1:
        raise DataError(f"{path}: sample_len must equal seq_len + 1")


def split_entry(manifest: dict, split: str, *, directory: str | Path) -> dict:
    """The checked manifest entry of `split`; DataError if the corpus has no such split."""
    where = Path(directory) / MANIFEST_FILE
    splits = manifest["splits"]
    if split not in splits:
        if split == "val":
            raise DataError(
                f"{where}: the corpus has no validation split (prepared with --val-fraction 0); "
                "set trainer.eval_every=0, or prepare it again with --val-fraction > 0"
            )
        raise DataError(f"{where}: no split {split!r} (the manifest has {sorted(splits)})")
    entry = splits[split]
    check_split_entry(entry, where=f"{where}, split {split!r}")
    return entry


def check_split_entry(entry, *, where: str) -> None:
    """A split's manifest entry has a 'shards' list, a row count and typed shard fields."""
    if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
        raise DataError(f"{where}: expected an object with a 'shards' list")
    if not isinstance(entry.get("rows"), int):
        raise DataError(f"{where}: field 'rows' is missing or not an integer")
    for i, shard in enumerate(entry["shards"]):
        for key, kind in _SHARD_FIELDS:
            if not isinstance(shard, dict) or not isinstance(shard.get(key), kind):
                raise DataError(
                    f"{where}, shard {i}: field {key!r} is missing or not {kind.__name__}"
                )


def has_split(path: str | Path, split: str) -> bool:
    """Whether the corpus in `path` has rows in `split`.

    False for a split the manifest does not list (a corpus prepared with --val-fraction 0 has
    no "val") and for one that came out empty (too few held-out tokens for a single row).
    Raises like `read_manifest` when `path` holds no usable corpus.
    """
    manifest = read_manifest(path)
    if split not in manifest["splits"]:
        return False
    return split_entry(manifest, split, directory=path)["rows"] > 0
