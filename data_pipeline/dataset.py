"""Reading prepared corpora: random access to packed rows and the DP-sharded batch loader.

Rows are read through memory-mapped Arrow IPC files as zero-copy numpy views of whole record
batches; a row's place is found arithmetically (shard, batch = row // rows_per_batch, offset).
`Table.take` is avoided on purpose: on a multi-batch memory-mapped column it copies every chunk
on every call.

The order in which samples are visited is a pure function of (seed, epoch): global sample g is
row `sample_order(n, seed, epoch=g // n)[g % n]`. Global batch t is samples [t*GB, (t+1)*GB) and
DP rank r takes the contiguous slice [r*GB/dp, (r+1)*GB/dp), so the only loader state is the
number of samples consumed, and a run can resume at any DP size.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from data_pipeline.prepare import load_manifest, sha256_file, shard_schema
from data_pipeline.tokenizers import Tokenizer, load_tokenizer

_MAX_CACHED_BATCHES = 4096


class PackedDataset:
    """The rows of one split of a prepared corpus (see data_pipeline/prepare.py)."""

    def __init__(self, path: str | Path, split: str = "train", *, verify_checksums: bool = False):
        self.path = Path(path)
        self._manifest = load_manifest(self.path)
        splits = self._manifest["splits"]
        if split not in splits:
            raise ValueError(f"{self.path}: no split {split!r} (the manifest has {sorted(splits)})")
        self.split = split
        self._entry = splits[split]
        _check_split_entry(self._entry, where=f"{self.path / 'manifest.json'}, split {split!r}")
        self._dtype = np.dtype(self._manifest["dtype"])
        self._rpb = int(self._manifest["rows_per_batch"])
        self._tokenizer: Tokenizer | None = None
        self._readers = []
        self._names = []
        for shard in self._entry["shards"]:
            self._readers.append(self._open_shard(shard, verify_checksums))
            self._names.append(shard["file"])
        rows = [shard["rows"] for shard in self._entry["shards"]]
        self._shard_start = np.concatenate([[0], np.cumsum(rows, dtype=np.int64)])
        if self._shard_start[-1] != self._entry["rows"]:
            raise ValueError(
                f"{self.path / 'manifest.json'}: split {split!r} lists {self._entry['rows']} rows "
                f"but its shards add up to {self._shard_start[-1]}"
            )
        # Bounded: a view keeps its record batch's metadata alive, and a large corpus has
        # hundreds of thousands of batches.
        self._views: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def __reduce__(self):
        # Memory maps cannot be pickled; a copy sent to another process reopens the files.
        return (PackedDataset, (self.path, self.split))

    def _open_shard(self, shard: dict, verify_checksums: bool):
        file = self.path / shard["file"]
        if not file.is_file():
            raise FileNotFoundError(f"shard {file} listed in the manifest is missing")
        size = os.path.getsize(file)
        if size != shard["bytes"]:
            raise ValueError(
                f"shard {file} has {size} bytes, the manifest says {shard['bytes']} "
                "(truncated or replaced?)"
            )
        if verify_checksums and sha256_file(file) != shard["sha256"]:
            raise ValueError(f"shard {file}: sha256 does not match the manifest (corrupted?)")
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(file), "r"))
        except (pa.ArrowException, OSError) as err:
            raise ValueError(f"shard {file} is not a readable Arrow IPC file: {err}") from None
        expected = shard_schema(self._dtype, self.sample_len)
        if not reader.schema.equals(expected):
            raise ValueError(
                f"shard {file}: schema {reader.schema} does not match the manifest "
                f"(expected {expected})"
            )
        nbatches = reader.num_record_batches
        if nbatches != -(-shard["rows"] // self._rpb):
            raise ValueError(
                f"shard {file}: {nbatches} record batches, but {shard['rows']} rows at "
                f"{self._rpb} rows per batch need {-(-shard['rows'] // self._rpb)}"
            )
        for b in range(nbatches):
            try:
                rows = reader.get_batch(b).num_rows  # metadata only on a memory map
            except (pa.ArrowException, OSError) as err:
                raise ValueError(f"shard {file}: record batch {b} is unreadable: {err}") from None
            want = min(self._rpb, shard["rows"] - b * self._rpb)
            if rows != want:
                raise ValueError(
                    f"shard {file}: record batch {b} has {rows} rows, expected {want} "
                    "(the shard does not match the manifest)"
                )
        return reader

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

    # -- rows --------------------------------------------------------------------------------

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, batch, offset in batch) of each row index (already in range)."""
        shard = np.searchsorted(self._shard_start, rows, side="right") - 1
        local = rows - self._shard_start[shard]
        return shard, local // self._rpb, local % self._rpb

    def _batch_view(self, shard: int, batch: int) -> np.ndarray:
        key = (shard, batch)
        view = self._views.get(key)
        if view is not None:
            self._views.move_to_end(key)
            return view
        column = self._readers[shard].get_batch(batch).column(0)
        view = column.flatten().to_numpy(zero_copy_only=True).reshape(-1, self.sample_len)
        self._views[key] = view
        if len(self._views) > _MAX_CACHED_BATCHES:
            self._views.popitem(last=False)
        return view

    def _check_range(self, rows: np.ndarray) -> np.ndarray:
        n = len(self)
        rows = np.where(rows < 0, rows + n, rows)
        bad = (rows < 0) | (rows >= n)
        if bad.any():
            raise IndexError(
                f"row {int(rows[bad][0])} out of range for {n} rows in split {self.split!r}"
            )
        return rows

    def __getitem__(self, index: int) -> np.ndarray:
        """Row `index` as a read-only numpy view into the memory-mapped shard."""
        rows = self._check_range(np.asarray([int(index)], dtype=np.int64))
        shard, batch, offset = (int(a[0]) for a in self._locate(rows))
        row = self._batch_view(shard, batch)[offset]
        if row.size and (int(row.max()) >= self.vocab_size or int(row.min()) < 0):
            self._raise_bad_token(row[None, :], rows)
        return row

    def gather(self, indices: Sequence[int] | np.ndarray) -> torch.Tensor:
        """Rows `indices` stacked into an int64 tensor [len(indices), sample_len]."""
        rows = self._check_range(np.asarray(indices, dtype=np.int64).reshape(-1))
        out = np.empty((len(rows), self.sample_len), dtype=np.int64)
        shard, batch, offset = self._locate(rows)
        for j in range(len(rows)):  # a loop over rows, each a single memcpy
            out[j] = self._batch_view(int(shard[j]), int(batch[j]))[offset[j]]
        if out.size and (int(out.max()) >= self.vocab_size or int(out.min()) < 0):
            self._raise_bad_token(out, rows)
        return torch.from_numpy(out)

    def _raise_bad_token(self, block: np.ndarray, rows: np.ndarray) -> None:
        bad = (block >= self.vocab_size) | (block < 0)
        j = int(np.argmax(bad.any(axis=1)))
        shard, _, _ = self._locate(rows[j : j + 1])
        s = int(shard[0])
        local = int(rows[j] - self._shard_start[s])
        value = int(block[j][bad[j]][0])
        raise ValueError(
            f"shard {self.path / self._names[s]}, row {local} (row {int(rows[j])} of split "
            f"{self.split!r}): token id {value} is outside the vocabulary (size {self.vocab_size})"
        )


def _check_split_entry(entry, *, where: str) -> None:
    if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list):
        raise ValueError(f"{where}: expected an object with a 'shards' list")
    if not isinstance(entry.get("rows"), int):
        raise ValueError(f"{where}: field 'rows' is missing or not an integer")
    for i, shard in enumerate(entry["shards"]):
        for key, kind in (("file", str), ("rows", int), ("bytes", int), ("sha256", str)):
            if not isinstance(shard, dict) or not isinstance(shard.get(key), kind):
                raise ValueError(
                    f"{where}, shard {i}: field {key!r} is missing or not {kind.__name__}"
                )


def sample_order(n: int, *, seed: int, epoch: int) -> np.ndarray:
    """The order rows are visited in during `epoch`: a permutation of range(n), a pure
    function of (seed, epoch)."""
    if n < 0 or seed < 0 or epoch < 0:
        raise ValueError(f"sample_order needs n, seed, epoch >= 0 (got {n}, {seed}, {epoch})")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(n)


class DistributedBatchIterator:
    """This DP rank's micro-batches for each optimizer step, resumable at any DP size."""

    def __init__(
        self,
        dataset: PackedDataset,
        *,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        consumed_samples: int = 0,
    ) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if global_batch_size < 1 or micro_batch_size < 1:
            raise ValueError(
                f"global_batch_size={global_batch_size} and micro_batch_size={micro_batch_size} "
                "must be positive"
            )
        if global_batch_size % (micro_batch_size * dp_size):
            raise ValueError(
                f"global_batch_size={global_batch_size} must be divisible by micro_batch_size * "
                f"dp_size = {micro_batch_size} * {dp_size} = {micro_batch_size * dp_size}"
            )
        if len(dataset) == 0:
            raise ValueError(f"split {dataset.split!r} of {dataset.path} has no rows")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.dataset = dataset
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self._consumed = _check_consumed(consumed_samples)
        self._orders: dict[int, np.ndarray] = {}

    @property
    def consumed_samples(self) -> int:
        """Samples consumed by all DP ranks together (global count)."""
        return self._consumed

    @property
    def epoch(self) -> int:
        """Epoch of the next sample to be read."""
        return self._consumed // len(self.dataset)

    @property
    def samples_per_rank(self) -> int:
        return self.global_batch_size // self.dp_size

    def _order(self, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            # A step spans at most a few epochs; keep only the newest orders.
            for old in [e for e in self._orders if e < epoch - 1]:
                del self._orders[old]
            order = sample_order(len(self.dataset), seed=self.seed, epoch=epoch)
            self._orders[epoch] = order
        return order

    def rows_for_step(self, consumed_samples: int) -> np.ndarray:
        """Dataset rows this rank reads for the step that starts at `consumed_samples`."""
        n = len(self.dataset)
        start = consumed_samples + self.dp_rank * self.samples_per_rank
        g = np.arange(start, start + self.samples_per_rank, dtype=np.int64)
        epochs, within = np.divmod(g, n)
        rows = np.empty_like(g)
        for e in np.unique(epochs):
            sel = epochs == e
            rows[sel] = self._order(int(e))[within[sel]]
        return rows

    def next_batch(self) -> list[torch.Tensor]:
        """This rank's micro-batches (each [micro_batch_size, sample_len], int64) for the next
        optimizer step; advances consumed_samples by the global batch size."""
        tokens = self.dataset.gather(self.rows_for_step(self._consumed))
        self._consumed += self.global_batch_size
        return list(tokens.split(self.micro_batch_size))

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "consumed_samples": self._consumed,
            "seed": self.seed,
            "dataset_fingerprint": self.dataset.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("consumed_samples", "seed", "dataset_fingerprint"):
            if key not in state:
                raise ValueError(f"data loader state has no {key!r} (keys: {sorted(state)})")
        if state["dataset_fingerprint"] != self.dataset.fingerprint:
            raise ValueError(
                f"the data changed since this state was saved: split {self.dataset.split!r} of "
                f"{self.dataset.path} has fingerprint {self.dataset.fingerprint}, the state was "
                f"saved with {state['dataset_fingerprint']}"
            )
        if state["seed"] != self.seed:
            raise ValueError(
                f"the data loader state was saved with seed={state['seed']}, this loader uses "
                f"seed={self.seed}; resuming would visit samples in a different order"
            )
        self._consumed = _check_consumed(state["consumed_samples"])


def _check_consumed(value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"consumed_samples={value!r} must be a non-negative integer")
    return int(value)
