"""The DP-sharded, resumable training loader over one prepared corpus or a weighted blend.

Global batch t is the blended samples [t*GB, (t+1)*GB); DP rank r takes the contiguous slice
[r*GB/dp, (r+1)*GB/dp) and splits it into micro-batches. Which rows those samples are, and
every objective's randomness, depend only on (seed, global sample index), so the whole loader
state is `consumed_samples` plus identity hashes: a run resumes at another DP size, micro-batch
size or worker count with nothing skipped and nothing repeated.

With workers, a torch DataLoader reads a map-style dataset whose item k is this rank's k-th
micro-batch: items are disjoint by construction, come back in order, and the objective runs in
the workers, so the batches equal the single-process ones exactly. Without workers, the samples
of the next few steps are planned in one call (placement, integrity checks and boundary masks
for about a thousand rows at once, so numpy's per-call overhead is spread over them); each
micro-batch is then one copy of its rows, a cast and a mask scatter (see MicroBatchPlan).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset, Sampler

from common.cpu_math import settle_cpu_math
from common.errors import CheckpointError, ConfigError
from data_pipeline.blend import DEFAULT_BLOCK_SIZE, BlendedSamples
from data_pipeline.dataset import PackedDataset
from data_pipeline.micro_batch import MicroBatchPlan
from data_pipeline.rows import Batch
from data_pipeline.tokenizers import Tokenizer

Transform = Callable[[Batch], Batch]
_PREFETCH_PER_WORKER = 2
# Without workers, this rank's samples for the next few steps are planned in one call of about
# this many samples: the per-call numpy overhead then costs little per sample.
READ_AHEAD_SAMPLES = 1024


class LoaderStateError(CheckpointError, ValueError):
    """A saved data loader state that this loader cannot resume from (other data, blend or
    seed, or a state without the fields `Loader.state_dict` writes)."""


class RankMicroBatches(Dataset):
    """One DP rank's micro-batches from global sample `start` on: item k is micro-batch
    k % accumulation of step k // accumulation (counted from `start`)."""

    def __init__(
        self,
        samples: BlendedSamples,
        *,
        start: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        transform: Transform | None = None,
    ) -> None:
        self.samples, self.start, self.transform = samples, start, transform
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.per_rank = global_batch_size // dp_size
        self.accumulation = self.per_rank // micro_batch_size
        self.rank_offset = dp_rank * self.per_rank

    def sample_ids(self, k: int) -> np.ndarray:
        """Global sample indices of item k."""
        step, micro = divmod(k, self.accumulation)
        first = (
            self.start
            + step * self.global_batch_size
            + self.rank_offset
            + micro * self.micro_batch_size
        )
        return np.arange(first, first + self.micro_batch_size, dtype=np.int64)

    def __getitem__(self, k: int) -> Batch:
        batch = self.samples.read(self.sample_ids(int(k)))
        return self.transform(batch) if self.transform is not None else batch


def _settle_worker(worker_id: int) -> None:
    """A worker runs the objectives' CPU math: settled as in the main process, whatever
    way the worker was started (common.cpu_math)."""
    settle_cpu_math()


class _Forever(Sampler[int]):
    """0, 1, 2, ...: the loader is an endless stream that the trainer stops."""

    def __init__(self) -> None:
        pass

    def __iter__(self) -> Iterator[int]:
        return itertools.count()


class Loader:
    """This DP rank's micro-batches for each optimizer step; resumable at any DP size.

    Build it with `build_loader`. `next_batch()` returns the step's micro-batches, each
    {"tokens" int64 [micro, S], "sample_ids" int64 [micro] (global sample indices, unique over
    the run), "doc_start", "sent_start" bool [micro, S]} passed through `transform` if given.
    """

    def __init__(
        self,
        samples: BlendedSamples,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        num_workers: int = 0,
        transform: Transform | None = None,
        consumed_samples: int = 0,
    ) -> None:
        _check_sizes(global_batch_size, micro_batch_size, dp_rank=dp_rank, dp_size=dp_size)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"data.num_workers={num_workers!r} must be a non-negative integer")
        self.samples = samples
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.num_workers, self.transform = num_workers, transform
        self._consumed = _check_consumed(consumed_samples)
        self._stream: Iterator[Batch] | None = None
        # Steps planned ahead: (the plan, the step's first micro-batch in it).
        self._ahead: deque[tuple[MicroBatchPlan, int]] = deque()

    # -- what is being read ------------------------------------------------------------------

    @property
    def datasets(self) -> list[PackedDataset]:
        return self.samples.datasets

    @property
    def seed(self) -> int:
        return self.samples.seed

    @property
    def seq_len(self) -> int:
        return self.datasets[0].seq_len

    @property
    def sample_len(self) -> int:
        return self.datasets[0].sample_len

    @property
    def vocab_size(self) -> int:
        return self.datasets[0].vocab_size

    @property
    def tokenizer(self) -> Tokenizer:
        return self.datasets[0].tokenizer

    @property
    def samples_per_rank(self) -> int:
        return self.global_batch_size // self.dp_size

    @property
    def accumulation(self) -> int:
        """Micro-batches per optimizer step on this rank."""
        return self.samples_per_rank // self.micro_batch_size

    @property
    def consumed_samples(self) -> int:
        """Samples consumed by all DP ranks together (global count)."""
        return self._consumed

    def epochs(self) -> dict[str, int]:
        """Per source path: the epoch of that source's next sample."""
        counts = self.samples.epochs(self._consumed)
        return {str(ds.path): e for ds, e in zip(self.datasets, counts, strict=True)}

    @property
    def epoch(self) -> int:
        """The furthest epoch any source has reached."""
        return max(self.epochs().values())

    # -- reading -----------------------------------------------------------------------------

    def _micro_batches(self) -> RankMicroBatches:
        return RankMicroBatches(
            self.samples,
            start=self._consumed,
            global_batch_size=self.global_batch_size,
            micro_batch_size=self.micro_batch_size,
            dp_rank=self.dp_rank,
            dp_size=self.dp_size,
            transform=self.transform,
        )

    def _worker_stream(self) -> Iterator[Batch]:
        if self._stream is None:
            loader = DataLoader(
                self._micro_batches(),
                batch_size=None,  # items are whole micro-batches already
                sampler=_Forever(),
                num_workers=self.num_workers,
                prefetch_factor=_PREFETCH_PER_WORKER,
                worker_init_fn=_settle_worker,
            )
            self._stream = iter(loader)
        return self._stream

    def _read_ahead(self) -> None:
        """Plan this rank's samples for the next few steps in one call."""
        steps = max(1, READ_AHEAD_SAMPLES // self.samples_per_rank)
        first = self._consumed + self.dp_rank * self.samples_per_rank
        starts = first + self.global_batch_size * np.arange(steps, dtype=np.int64)
        ids = (starts[:, None] + np.arange(self.samples_per_rank)).reshape(-1)
        plan = self.samples.plan(ids, micro_batch_size=self.micro_batch_size)
        self._ahead.extend((plan, t * self.accumulation) for t in range(steps))

    def _next_read_ahead(self) -> list[Batch]:
        if not self._ahead:
            self._read_ahead()
        plan, first = self._ahead.popleft()
        return [plan.micro_batch(m) for m in range(first, first + self.accumulation)]

    def next_batch(self) -> list[Batch]:
        """This rank's micro-batches for the next optimizer step (each {"tokens",
        "sample_ids", "doc_start", "sent_start"} or the transform's output); advances
        consumed_samples by the global batch size."""
        if self.num_workers == 0:
            batches = self._next_read_ahead()
            if self.transform is not None:
                batches = [self.transform(b) for b in batches]
        else:
            stream = self._worker_stream()
            batches = [next(stream) for _ in range(self.accumulation)]
        self._consumed += self.global_batch_size
        return batches

    def __iter__(self) -> Iterator[list[Batch]]:
        while True:
            yield self.next_batch()

    def close(self) -> None:
        """Stop the worker processes and drop samples read ahead (a later next_batch starts
        again from consumed_samples)."""
        self._stream = None  # the DataLoader iterator shuts its workers down when dropped
        self._ahead.clear()

    # -- resume ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Independent of DP size, micro-batch size and workers."""
        return {
            "consumed_samples": self._consumed,
            "seed": self.seed,
            "fingerprint": self.samples.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("consumed_samples", "seed", "fingerprint"):
            if key not in state:
                raise LoaderStateError(f"data loader state has no {key!r} (keys: {sorted(state)})")
        if state["fingerprint"] != self.samples.fingerprint:
            raise LoaderStateError(_fingerprint_change(state["fingerprint"], self.samples))
        if state["seed"] != self.seed:
            raise LoaderStateError(
                f"the data loader state was saved with seed={state['seed']}, this loader uses "
                f"seed={self.seed}; resuming would visit samples in a different order"
            )
        self._consumed = _check_consumed(state["consumed_samples"])
        self.close()  # prefetched batches belong to the old position


def _fingerprint_change(saved, samples: BlendedSamples) -> str:
    current = samples.fingerprint
    old = str(saved).split("-")
    new = current.split("-")
    sources = ", ".join(str(ds.path) for ds in samples.datasets)
    changed = []
    if len(old) != 2 or old[0] != new[0]:
        changed.append(f"the data changed (sources {sources})")
    if len(old) != 2 or old[1] != new[1]:
        weights = ", ".join(f"{w:.4g}" for w in samples.schedule.weights)
        changed.append(f"the blend weights changed (now {weights})")
    return (
        f"{' and '.join(changed)} since this data loader state was saved: fingerprint "
        f"{current}, the state has {saved}"
    )


def _check_sizes(global_batch_size: int, micro_batch_size: int, *, dp_rank: int, dp_size: int):
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if global_batch_size < 1 or micro_batch_size < 1:
        raise ConfigError(
            f"global_batch_size={global_batch_size} and micro_batch_size={micro_batch_size} "
            "must be positive"
        )
    if global_batch_size % (micro_batch_size * dp_size):
        raise ConfigError(
            f"global_batch_size={global_batch_size} must be divisible by micro_batch_size * "
            f"dp_size = {micro_batch_size} * {dp_size} = {micro_batch_size * dp_size}"
        )


def _check_consumed(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"consumed_samples={value!r} must be a non-negative integer")
    return int(value)


def _source_pairs(sources) -> list[tuple[str, float]]:
    """(path, weight) pairs from tuples, {path, weight} mappings or SourceConfig objects."""
    pairs = []
    for i, src in enumerate(sources):
        if isinstance(src, (str, Path)):
            path, weight = src, 1.0
        elif isinstance(src, dict):
            if "path" not in src:
                raise ConfigError(f"data.sources[{i}] has no 'path' (keys: {sorted(src)})")
            path, weight = src["path"], src.get("weight", 1.0)
        elif hasattr(src, "path"):
            path, weight = src.path, getattr(src, "weight", 1.0)
        elif isinstance(src, Sequence) and len(src) == 2:
            path, weight = src
        else:
            raise ConfigError(f"data.sources[{i}]={src!r}: expected (path, weight)")
        try:
            pairs.append((str(path), float(weight)))
        except (TypeError, ValueError):
            raise ConfigError(f"data.sources[{i}].weight={weight!r} is not a number") from None
    return pairs


def build_loader(
    sources: list[tuple[str, float]],
    *,
    split: str = "train",
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    seed: int,
    num_workers: int = 0,
    transform: Transform | None = None,
    verify_checksums: bool = False,
    blend_block_size: int = DEFAULT_BLOCK_SIZE,
    segment_streams: bool = False,
) -> Loader:
    """The loader over `sources` ((path, weight) pairs; weights are relative shares).
    `transform` (a picklable objective) runs on each micro-batch, in the workers if any.
    `segment_streams`: row j of every global batch continues row j of the one before
    (data_pipeline/blend.py; one source)."""
    pairs = _source_pairs(sources)
    if not pairs:
        raise ConfigError("data.sources is empty: the loader needs at least one corpus")
    datasets = [PackedDataset(p, split, verify_checksums=verify_checksums) for p, _ in pairs]
    samples = BlendedSamples(
        datasets,
        [w for _, w in pairs],
        seed=seed,
        block_size=blend_block_size,
        segment_streams=global_batch_size if segment_streams else None,
    )
    return Loader(
        samples,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=num_workers,
        transform=transform,
    )
