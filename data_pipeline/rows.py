"""Rows of memory-mapped shards as numpy arrays: the views and kernels the readers share.

Legend: n = rows read, S = sample_len (seq_len + 1 tokens per row).

A shard file is mapped read-only once and viewed three ways (`ShardViews`): as opaque
S-token rows starting at any token element (`row_windows`: fancy indexing then copies each row
with a single memcpy), as tokens, and as int32 (the boundary lists). `read_rows` reads rows
that may lie in several shards; `list_keys` turns the document and sentence lists of many rows
into the flat positions of a boolean mask in one vectorised pass. `RowArrays` holds gathered
rows with their boundary masks.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch

Batch = dict[str, torch.Tensor]
_NO_ITEMS = np.zeros(0, dtype=np.int64)


class ShardViews(NamedTuple):
    """Read-only numpy views of one memory-mapped shard file."""

    rows: np.ndarray  # item i: the S tokens from token element i, opaque (see row_windows)
    row_type: np.dtype  # viewed as this, n opaque rows are [n, S] tokens
    tokens: np.ndarray  # the file as tokens (uint16 or int32)
    int32: np.ndarray  # the file as int32: the boundary lists

    @classmethod
    def of(cls, whole: np.ndarray, dtype: np.dtype, S: int) -> ShardViews:
        """The views of a mapped file (`whole`, uint8) that stores `dtype` tokens in rows of S."""
        size = len(whole)
        return cls(
            rows=row_windows(whole, dtype, S),
            row_type=np.dtype((dtype, (S,))),
            tokens=whole[: size - size % dtype.itemsize].view(dtype),
            int32=whole[: size - size % 4].view(np.int32),
        )


class RowArrays(NamedTuple):
    """Gathered rows as numpy arrays. Tokens keep the stored dtype, so a reader that reads
    many rows into a reused buffer widens each batch to int64 only when it hands it out
    (small, cache-warm allocations: large transient ones cost page faults on every call)."""

    tokens: np.ndarray  # [n, S], uint16 or int32
    # [2, n, S] bool: document starts, then sentence starts (a superset); [5, n, S] for
    # corpora with spans: then phrase starts, entity starts and span ends (see span_marks).
    starts: np.ndarray

    @property
    def doc_start(self) -> np.ndarray:
        return self.starts[0]

    @property
    def sent_start(self) -> np.ndarray:
        return self.starts[1]

    @classmethod
    def empty(cls, n: int, S: int, dtype: np.dtype, *, spans: bool = False) -> RowArrays:
        """Room for n rows, with clear masks (and the span planes with `spans`)."""
        planes = SPAN_PLANES if spans else 2
        return cls(np.empty((n, S), dtype=dtype), np.zeros((planes, n, S), dtype=bool))

    def head(self, n: int) -> RowArrays:
        """The first n rows, masks cleared, for reuse as a buffer."""
        starts = self.starts[:, :n]
        starts[...] = False
        return RowArrays(self.tokens[:n], starts)

    def batch(self, lo: int = 0, hi: int | None = None, *, copy: bool = False) -> Batch:
        """Rows [lo, hi) as {"tokens": int64, "doc_start", "sent_start"} tensors; with
        `copy` the masks are copies, so this buffer can be reused."""
        starts = self.starts[:, lo:hi]
        if copy:
            starts = starts.copy()
        return {
            "tokens": torch.from_numpy(self.tokens[lo:hi].astype(np.int64)),
            **boundary_batch(starts),
        }


# Mask planes of a corpus with spans: documents, sentences, phrase starts, entity starts, ends.
SPAN_PLANES = 5


def boundary_batch(starts: np.ndarray) -> Batch:
    """The batch keys of boundary masks [planes, n, S]: "doc_start", "sent_start" and, with
    the span planes, "span_start" and "span_kind" (see span_marks)."""
    out = {"doc_start": torch.from_numpy(starts[0]), "sent_start": torch.from_numpy(starts[1])}
    if len(starts) == SPAN_PLANES:
        span_start, span_kind = span_marks(starts[2], starts[3], starts[4])
        out["span_start"] = torch.from_numpy(span_start)
        out["span_kind"] = torch.from_numpy(span_kind)
    return out


def span_marks(
    phrase: np.ndarray, entity: np.ndarray, end: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(span_start bool [n, S], span_kind int8 [n, S]) of rows' phrase starts, entity starts
    and span ends: a token's kind is that of the last start at or before it (1 phrase,
    2 entity) unless a span end lies after that start, else 0."""
    span_start = phrase | entity
    code = np.where(phrase, 1, np.where(entity, 2, 0)).astype(np.int8)
    event = span_start | end
    positions = np.arange(event.shape[-1])
    last = np.maximum.accumulate(np.where(event, positions, -1), axis=-1)
    kind = np.take_along_axis(code, np.maximum(last, 0), axis=-1)
    return span_start, np.where(last >= 0, kind, 0).astype(np.int8)


def map_shard(file: Path) -> tuple[np.ndarray, int, pa.ipc.RecordBatchFileReader]:
    """(the file as a read-only uint8 array, where Arrow's mapping of it starts, its reader).

    Rows are read through a mapping of our own: Arrow advises the kernel to read ahead
    whatever it hands out (the whole file, for a buffer of all of it), while training reads
    rows at random. Arrow's reader serves the metadata and the first-touch checks.
    """
    with open(file, "rb") as f:
        ours = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(ours, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        ours.madvise(mmap.MADV_RANDOM)  # read-ahead would fetch neighbours never used
    arrow_map = pa.memory_map(str(file), "r")
    arrow_base = arrow_map.read_buffer(1).address  # position 0: where the mapping starts
    reader = pa.ipc.open_file(arrow_map)
    return np.frombuffer(ours, dtype=np.uint8), arrow_base, reader


def row_windows(whole: np.ndarray, dtype: np.dtype, S: int) -> np.ndarray:
    """Read-only view of a mapped file in which item i is the S tokens that start at element
    i, as one opaque S * itemsize-byte item: any row of any record batch is one item, and
    fancy indexing copies each with a single memcpy (a [positions, S] strided view would copy
    token by token)."""
    count = max(len(whole) // dtype.itemsize - S + 1, 0)
    row = np.dtype((np.void, S * dtype.itemsize))
    return np.ndarray((count,), dtype=row, buffer=whole, strides=(dtype.itemsize,))


def read_rows(shards: Sequence[ShardViews], source, element: np.ndarray, *, mixed=False):
    """int64 [n, S] tokens of the rows at token elements `element` of shards `source`;
    `mixed`: the shards may differ in token type (a blend of uint16 and int32 corpora)."""
    which = source.tolist()
    distinct = set(which)
    first = shards[which[0]] if which else shards[0]
    if len(distinct) <= 1:
        return first.rows[element].view(first.row_type).astype(np.int64)
    width = first.row_type.shape[0]
    if 4 * len(distinct) <= len(which):
        # Many rows of a few shards: each shard's rows are read with one fancy index and
        # widened straight into their places in the output (no staging copy).
        out = np.empty((len(which), width), dtype=np.int64)
        for s in distinct:
            sel = np.flatnonzero(source == s)
            out[sel] = shards[s].rows[element[sel]].view(shards[s].row_type)
        return out
    if mixed and len({shards[s].row_type for s in distinct}) > 1:
        out = np.empty((len(which), width), dtype=np.int64)
        for i, (s, e) in enumerate(zip(which, element.tolist(), strict=True)):
            out[i] = shards[s].rows[e : e + 1].view(shards[s].row_type)
        return out
    # Random rows of a corpus of many shards mostly come from distinct shards: joining a
    # slice per row costs less than grouping them.
    pairs = zip(which, element.tolist(), strict=True)
    rows = np.concatenate([shards[s].rows[e : e + 1] for s, e in pairs])
    return rows.view(first.row_type).astype(np.int64)


def flat_view(array: np.ndarray) -> np.ndarray:
    """`array` as 1-D, a view (writes through)."""
    if not array.flags.c_contiguous:
        raise ValueError(f"expected a C-contiguous buffer, got strides {array.strides}")
    return array.reshape(-1)


def list_keys(flat: np.ndarray, first: np.ndarray, values: np.ndarray, base: np.ndarray):
    """(base[j] + value for every value of list j, in list order; how many values lists
    0..j hold) of several int32 lists stored in `flat`: list j's offsets are flat[first[j]]
    and flat[first[j] + 1], counted from element values[j]."""
    lo = flat[first]
    counts = flat[first + 1] - lo
    ends = np.cumsum(counts)
    total = int(ends[-1]) if len(ends) else 0
    if total == 0:
        return _NO_ITEMS, ends
    at = np.repeat(values + lo - (ends - counts), counts) + np.arange(total)
    return np.repeat(base, counts) + flat[at], ends
