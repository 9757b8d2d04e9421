"""Micro-batch planning: the per-row work of many training samples done in one pass.

Legend: S = sample_len (seq_len + 1 tokens per row).

A plan takes rows of one or more corpora (a blend), asks each `PackedDataset` where they lie
(`PackedDataset.place`, which checks every record batch they touch) and turns their document
and sentence starts into mask keys grouped by micro-batch, so that each micro-batch is then a
fancy-indexed copy of its rows out of the mapped shards, one cast to int64 and one scatter into
a fresh mask. When every corpus of the plan carries knowledge spans, three more planes (phrase
starts, entity starts, span ends) become the batch's "span_start" and "span_kind"
(rows.span_marks); a blend in which some corpus lacks them hands out no spans.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from data_pipeline.dataset import PackedDataset
from data_pipeline.rows import SPAN_PLANES, Batch, ShardViews, boundary_batch, list_keys, read_rows


class MicroBatchPlan:
    """Rows planned for reading as micro-batches of `micro_batch_size` rows.

    Planning does the per-row work once for many micro-batches: it checks every record batch
    the rows touch, looks up where each row's tokens lie and turns their document and sentence
    starts into mask keys grouped by micro-batch. Each micro-batch is then a fancy-indexed copy
    of its rows, one cast to int64 and one scatter into a fresh mask.
    """

    def __init__(
        self,
        parts: Sequence[tuple[PackedDataset, np.ndarray, np.ndarray | None]],
        *,
        size: int,
        micro_batch_size: int,
        sample_ids: np.ndarray | None = None,
    ) -> None:
        """`parts`: (dataset, its rows, their positions among the `size` planned rows, or
        None for 0..len-1); every position is covered once. `sample_ids`, when given, are
        handed out with each micro-batch."""
        if not parts or size < 1 or micro_batch_size < 1 or size % micro_batch_size:
            raise ValueError(
                f"{size} planned rows do not split into micro-batches of {micro_batch_size}"
            )
        self.micro_batch_size, self.size = micro_batch_size, size
        self.sample_len = parts[0][0].sample_len
        self._ids = sample_ids
        self._sources: list[ShardViews] = []  # every shard of the corpora among the parts
        self._element = np.empty(size, dtype=np.int64)  # where each row's tokens start
        self._source = np.empty(size, dtype=np.int64)
        spans = all(ds.has_spans for ds, _, _ in parts)
        self._planes = SPAN_PLANES if spans else 2
        lists = np.empty((2 * self._planes, size), dtype=np.int64)  # see RowPlaces.lists
        for ds, rows, at in parts:
            placed = ds.place(rows, spans=spans)
            where = slice(None) if at is None else at
            self._element[where] = placed.element
            self._source[where] = len(self._sources) + placed.shard
            lists[:, where] = placed.lists
            self._sources += ds.shard_views
        # One source (a shard of a corpus) for all rows: the common case skips the grouping.
        first = int(self._source[0])
        one = len(self._sources) == 1 or bool((self._source == first).all())
        self._only = first if one else None
        self._mixed = len({shard.row_type for shard in self._sources}) > 1
        self._plan_masks(lists)

    def _plan_masks(self, lists: np.ndarray) -> None:
        """Keys of the True entries of each micro-batch's [2, micro, S] mask, grouped by
        micro-batch: micro-batch m's are keys[bounds[m]:bounds[m + 1]]."""
        mb, count = self.micro_batch_size, self.size // self.micro_batch_size
        # Document lists go to both planes, sentence lists to the second, span lists to one
        # plane each. The lists are taken in (micro-batch, plane, row) order, so that their
        # items come out grouped.
        order = [0, 1, 0, 1, *range(2, 2 * self._planes)]
        k = len(order) // 2  # plane lists
        lists = lists[order].reshape(k, 2, count, mb).transpose(1, 2, 0, 3)
        first, values = lists.reshape(2, -1)
        base = _mask_bases(count, mb, self.sample_len, self._planes)
        if self._only is not None:
            keys, ends = list_keys(self._sources[self._only].int32, first, values, base)
            self._bounds = [0, *ends[k * mb - 1 :: k * mb].tolist()]  # Python ints: cheap
            self._keys = keys
            return
        source = np.repeat(self._source.reshape(count, 1, mb), k, axis=1).reshape(-1)
        micro = np.repeat(np.arange(count), k * mb)
        pieces, micros = [], []
        for s in np.unique(source).tolist():
            sel = np.flatnonzero(source == s)
            got, ends = list_keys(self._sources[s].int32, first[sel], values[sel], base[sel])
            pieces.append(got)
            micros.append(np.repeat(micro[sel], np.diff(ends, prepend=0)))
        micro = np.concatenate(micros)
        self._keys = np.concatenate(pieces)[np.argsort(micro, kind="stable")]
        self._bounds = [0, *np.cumsum(np.bincount(micro, minlength=count)).tolist()]

    def __len__(self) -> int:
        """Number of micro-batches."""
        return self.size // self.micro_batch_size

    def _tokens(self, lo: int, hi: int) -> np.ndarray:
        """int64 [hi - lo, S] tokens of planned rows [lo, hi)."""
        if self._only is None:
            source, element = self._source[lo:hi], self._element[lo:hi]
            return read_rows(self._sources, source, element, mixed=self._mixed)
        shard = self._sources[self._only]
        return shard.rows[self._element[lo:hi]].view(shard.row_type).astype(np.int64)

    def micro_batch(self, m: int) -> Batch:
        """Micro-batch m: {"sample_ids" (if planned with them), "tokens" int64 [micro, S],
        "doc_start", "sent_start" bool [micro, S], and with spans "span_start" bool and
        "span_kind" int8 [micro, S]}; fresh arrays, owned by the caller."""
        if not 0 <= m < len(self._bounds) - 1:
            raise IndexError(f"micro-batch {m} of a plan of {len(self._bounds) - 1}")
        mb = self.micro_batch_size
        lo = m * mb
        flat = np.zeros(self._planes * mb * self.sample_len, dtype=bool)
        flat[self._keys[self._bounds[m] : self._bounds[m + 1]]] = True
        starts = flat.reshape(self._planes, mb, self.sample_len)
        batch = {}
        if self._ids is not None:
            batch["sample_ids"] = torch.from_numpy(self._ids[lo : lo + mb])
        batch["tokens"] = torch.from_numpy(self._tokens(lo, lo + mb))
        batch.update(boundary_batch(starts))
        return batch


@functools.lru_cache(maxsize=16)
def _mask_bases(count: int, micro: int, S: int, planes: int = 2) -> np.ndarray:
    """Where each list of MicroBatchPlan._plan_masks lands in its micro-batch's flat
    [planes, micro, S] mask, for lists in (micro-batch, plane list, row) order; the plane
    lists are documents (plane 0), documents and sentences (plane 1), then one span list per
    span plane. Read-only, shared."""
    plane = np.asarray([0, 1, *range(1, planes)], dtype=np.int64)[:, None] * (micro * S)
    bases = np.tile((plane + S * np.arange(micro)).reshape(-1), count)
    bases.flags.writeable = False
    return bases
