"""Weighted blending of prepared corpora into one deterministic stream of samples.

Legend: n = samples read at once, S = sample_len, K = number of sources, B = block size.

A block of B slots is built once from the weights with Megatron's greedy rule -- each slot goes
to the source furthest behind its target share -- with every source capped at its quota (its
share of B, rounded by largest remainder). The block repeats, so global sample g maps to

    source(g)       = slot_source[g % B]
    stream index(g) = (g // B) * quota[source(g)] + slot_rank[g % B]

in O(1), and in every block each source's count differs from weight * B by less than one
sample. Source s serves stream index k from row sample_order(len_s, seed, epoch=k // len_s)
[k % len_s]: each source walks its own permuted epochs, independently of the other sources.

Segment streams (`segment_streams` = G, the global batch size; one source only): for a model
that carries memory from one segment to the next (Transformer-XL, XLNet), row j of every
global batch must continue row j of the batch before. The source's n rows are cut into G
contiguous streams of L = n // G rows, and sample k = t G + j of an epoch (t < L) reads row
(j L + t + r_e) mod n: stream j's segment t, with the whole layout rotated by a seeded
offset r_e per epoch (epochs of L G samples; the n - L G rows left over move with r_e), so
each epoch cuts the streams elsewhere. A row j of a batch reads stream j whatever the
data-parallel size.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common.errors import ConfigError, DataError
from data_pipeline.dataset import PackedDataset, sample_order
from data_pipeline.micro_batch import MicroBatchPlan
from data_pipeline.rows import RowArrays

DEFAULT_BLOCK_SIZE = 1000
# A block this long takes seconds to build; a weight needing more is almost certainly a typo.
MAX_BLOCK_SIZE = 1_000_000


class BlendSchedule:
    """Which source each global sample comes from, and its index in that source's stream."""

    def __init__(self, weights: Sequence[float], *, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        self.weights = _normalise(weights)
        self.block_size = _block_size_for(self.weights, block_size)
        self.quota = _quotas(self.weights, self.block_size)
        self.slot_source = _interleave(self.weights, self.quota)
        self._slots_of = [np.flatnonzero(self.slot_source == s) for s in range(len(self.quota))]
        self.slot_rank = np.empty(self.block_size, dtype=np.int64)
        for slots in self._slots_of:
            self.slot_rank[slots] = np.arange(len(slots))

    @property
    def num_sources(self) -> int:
        return len(self.quota)

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index in that source's stream) of each global sample index."""
        g = np.asarray(g, dtype=np.int64)
        if g.size and g.min() < 0:
            raise ValueError(f"global sample index {int(g.min())} must be >= 0")
        block, slot = np.divmod(g, self.block_size)
        source = self.slot_source[slot]
        return source, block * self.quota[source] + self.slot_rank[slot]

    def counts_before(self, g: int) -> np.ndarray:
        """How many of the global samples [0, g) each source served: int64 [K]."""
        block, slot = divmod(int(g), self.block_size)
        within = [int(np.searchsorted(slots, slot)) for slots in self._slots_of]
        return block * self.quota + np.asarray(within, dtype=np.int64)

    @property
    def identity(self) -> str:
        """Hash of everything that fixes the interleave (normalised weights, block size)."""
        ident = {"weights": [round(float(w), 12) for w in self.weights], "block": self.block_size}
        return hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:16]


def _normalise(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64).reshape(-1)
    if w.size == 0:
        raise ConfigError("a blend needs at least one source (data.sources is empty)")
    bad = ~np.isfinite(w) | (w <= 0)
    if bad.any():
        i = int(np.argmax(bad))
        raise ConfigError(f"blend weight {i} = {float(w[i])!r} must be a positive finite number")
    return w / w.sum()


def _quotas(weights: np.ndarray, block: int) -> np.ndarray:
    """Samples per block for each source: floor(w * B), the remainder handed out by largest
    fractional part (ties to the lower index), so each is within one sample of w * B."""
    exact = weights * block
    quota = np.floor(exact).astype(np.int64)
    short = block - int(quota.sum())
    order = np.argsort(-(exact - quota), kind="stable")
    quota[order[:short]] += 1
    return quota


def _block_size_for(weights: np.ndarray, block_size: int) -> int:
    """`block_size`, or its smallest multiple in which every source gets a slot."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"blend block_size={block_size!r} must be a positive integer")
    times = max(1, math.ceil(1.0 / (float(weights.min()) * block_size)))
    while _quotas(weights, block_size * times).min() < 1:
        times += 1
    if block_size * times > MAX_BLOCK_SIZE:
        raise ConfigError(
            f"blend weight share {float(weights.min()):.3g} is too small: every source must get "
            f"a sample within {MAX_BLOCK_SIZE} samples"
        )
    return block_size * times


def _interleave(weights: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Source of each slot: the one furthest behind its share, among those under quota."""
    block = int(quota.sum())
    taken = np.zeros(len(quota), dtype=np.int64)
    slot_source = np.empty(block, dtype=np.int64)
    for i in range(block):
        deficit = weights * (i + 1) - taken
        deficit[taken >= quota] = -np.inf
        s = int(np.argmax(deficit))
        slot_source[i] = s
        taken[s] += 1
    return slot_source


def check_blendable(datasets: Sequence[PackedDataset]) -> None:
    """Sources must be non-empty, distinct, and share seq_len and tokenizer identity."""
    if not datasets:
        raise ConfigError("a blend needs at least one source (data.sources is empty)")
    first = datasets[0]
    seen: dict[tuple[Path, str], int] = {}
    for i, ds in enumerate(datasets):
        if len(ds) == 0:
            raise DataError(f"split {ds.split!r} of {ds.path} has no rows")
        key = (ds.path.resolve(), ds.split)
        if key in seen:
            raise ConfigError(f"source {ds.path} appears twice in the blend ({seen[key]} and {i})")
        seen[key] = i
        if ds.seq_len != first.seq_len:
            raise DataError(
                f"sources {first.path} and {ds.path} were prepared with different seq_len "
                f"({first.seq_len} and {ds.seq_len}); blended sources must share it"
            )
        if _tokenizer_identity(ds) != _tokenizer_identity(first):
            raise DataError(
                f"sources {first.path} and {ds.path} use different tokenizers "
                f"({_tokenizer_identity(first)} and {_tokenizer_identity(ds)}); "
                "blended sources must share one"
            )


def _tokenizer_identity(ds: PackedDataset) -> tuple:
    entry = ds.manifest["tokenizer"]
    return (entry.get("kind"), entry.get("vocab_size", ds.vocab_size), entry.get("sha256"))


class BlendedSamples:
    """Global blended sample index -> rows of the sources, and the read itself.

    Picklable (the datasets reopen their memory maps), so it can run in DataLoader workers.
    """

    def __init__(
        self,
        datasets: Sequence[PackedDataset],
        weights: Sequence[float],
        *,
        seed: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        segment_streams: int | None = None,
    ) -> None:
        check_blendable(datasets)
        if len(weights) != len(datasets):
            raise ValueError(f"{len(datasets)} sources but {len(weights)} blend weights")
        for ds, w in zip(datasets, weights, strict=True):
            if not (isinstance(w, numbers.Real) and math.isfinite(w) and w > 0):
                raise ConfigError(f"blend weight {w!r} of source {ds.path} must be positive")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} must be a non-negative integer")
        self.datasets = list(datasets)
        self.schedule = BlendSchedule(weights, block_size=block_size)
        self.seed = seed
        self._orders: dict[tuple[int, int], np.ndarray] = {}
        self.segment_streams = segment_streams
        if segment_streams is not None:
            _check_streams(self.datasets, segment_streams)

    def __getstate__(self) -> dict:
        # Visiting orders can be large and are cheap to recompute: not shipped to workers.
        return {**self.__dict__, "_orders": {}}

    @property
    def fingerprint(self) -> str:
        """'<data>-<blend>': a hash of every source's data, then one of the weights."""
        data = json.dumps([ds.fingerprint for ds in self.datasets])
        streams = "" if self.segment_streams is None else f"-streams{self.segment_streams}"
        return f"{hashlib.sha256(data.encode()).hexdigest()[:16]}-{self.schedule.identity}{streams}"

    def locate(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index in that source's stream) of each global sample index."""
        return self.schedule.locate(g)

    def _order(self, source: int, epoch: int) -> np.ndarray:
        order = self._orders.get((source, epoch))
        if order is None:
            # Reads move forward through the epochs; keep only each source's newest two.
            for key in [k for k in self._orders if k[0] == source and k[1] < epoch - 1]:
                del self._orders[key]
            n = len(self.datasets[source])
            order = sample_order(n, seed=self.seed, epoch=epoch)
            self._orders[(source, epoch)] = order
        return order

    def rows(self, source: int, k: np.ndarray) -> np.ndarray:
        """Rows of `source` that its stream indices `k` read."""
        if self.segment_streams is not None:
            return stream_rows(
                k, n=len(self.datasets[source]), streams=self.segment_streams, seed=self.seed
            )
        epochs, within = np.divmod(np.asarray(k, dtype=np.int64), len(self.datasets[source]))
        if len(epochs) and epochs.min() == epochs.max():
            return self._order(source, int(epochs[0]))[within]
        rows = np.empty_like(within)
        for e in np.unique(epochs).tolist():
            sel = epochs == e
            rows[sel] = self._order(source, e)[within[sel]]
        return rows

    def read(self, g: np.ndarray) -> dict[str, torch.Tensor]:
        """{"sample_ids", "tokens", "doc_start", "sent_start"} of global samples `g`."""
        g = np.array(g, dtype=np.int64).reshape(-1)  # a copy: handed out as sample_ids
        if len(g) == 0:
            empty = RowArrays.empty(0, self.datasets[0].sample_len, self.token_dtype)
            return {"sample_ids": torch.from_numpy(g), **empty.batch()}
        return self.plan(g, micro_batch_size=len(g)).micro_batch(0)

    def plan(self, g: np.ndarray, *, micro_batch_size: int) -> MicroBatchPlan:
        """Global samples `g` (a whole number of micro-batches) planned for reading; micro-batch
        m of the plan is samples g[m * micro : (m + 1) * micro] with their sample ids."""
        g = np.array(g, dtype=np.int64).reshape(-1)
        source, k = self.locate(g)
        if self.schedule.num_sources == 1:
            parts = [(self.datasets[0], self.rows(0, k), None)]
        else:
            parts = []
            for s in np.unique(source).tolist():
                at = np.flatnonzero(source == s)
                parts.append((self.datasets[s], self.rows(s, k[at]), at))
        return MicroBatchPlan(parts, size=len(g), micro_batch_size=micro_batch_size, sample_ids=g)

    def read_arrays(self, g: np.ndarray, *, out: RowArrays | None = None) -> RowArrays:
        """The rows of global samples `g` as numpy arrays (see RowArrays), written into
        `out` (a buffer of at least len(g) rows, reused) when given."""
        source, k = self.locate(np.asarray(g, dtype=np.int64).reshape(-1))
        n = len(source)
        if out is None:
            spans = all(ds.has_spans for ds in self.datasets)
            out = RowArrays.empty(n, self.datasets[0].sample_len, self.token_dtype, spans=spans)
        else:
            out = out.head(n)
        if self.schedule.num_sources == 1:
            self.datasets[0].gather_into(self.rows(0, k), out, np.arange(n))
            return out
        for s in np.unique(source).tolist():
            at = np.flatnonzero(source == s)
            self.datasets[s].gather_into(self.rows(s, k[at]), out, at)
        return out

    @property
    def token_dtype(self) -> np.dtype:
        """The narrowest type that holds every source's tokens."""
        return np.result_type(*(ds.token_dtype for ds in self.datasets))

    def epochs(self, consumed_samples: int) -> list[int]:
        """Epoch of each source's next sample once `consumed_samples` were read."""
        counts = self.schedule.counts_before(consumed_samples)
        if self.segment_streams is not None:
            g = self.segment_streams
            return [
                int(c) // (len(ds) // g * g) for c, ds in zip(counts, self.datasets, strict=True)
            ]
        return [int(c) // len(ds) for c, ds in zip(counts, self.datasets, strict=True)]


def _check_streams(datasets: Sequence[PackedDataset], streams: int) -> None:
    if len(datasets) != 1:
        raise ConfigError(
            f"segment streams (model.mem_len > 0) read one corpus in order; data.sources blends "
            f"{len(datasets)}: prepare them as one corpus"
        )
    n = len(datasets[0])
    if not 1 <= streams <= n:
        raise ConfigError(
            f"{datasets[0].path}: {n} rows cannot hold {streams} segment streams (one per row of "
            "the global batch); lower trainer.global_batch_size or use a larger corpus"
        )


def stream_rows(k: np.ndarray, *, n: int, streams: int, seed: int) -> np.ndarray:
    """Rows that stream indices `k` read under segment streams (module docstring): sample
    t G + j of an epoch reads row (j L + t + r_e) mod n, L = n // G."""
    k = np.asarray(k, dtype=np.int64)
    per_epoch = n // streams * streams
    epochs, within = np.divmod(k, per_epoch)
    t, j = np.divmod(within, streams)
    rows = j * (n // streams) + t
    for e in np.unique(epochs).tolist():
        sel = epochs == e
        offset = np.random.Generator(np.random.PCG64([seed, e, 0x5E6])).integers(n)
        rows[sel] = (rows[sel] + offset) % n
    return rows
