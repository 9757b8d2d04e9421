"""Data parallelism where DDP does not reach: tensor-parallel parameters and pipeline stages.

DDP wraps one module and hooks its forward; a pipeline's stages run inside a schedule,
and tensor-parallel parameters are DTensors, which DDP does not take. For those layouts
(ZeRO-0/1 beside TP or PP) `ReplicaSync` keeps the data-parallel replicas equal the way
Megatron's own DDP does: after the last backward of a step, every gradient is averaged
over the data-parallel ranks in a few flat buckets (a DTensor's local shard stands for
it, since all replicas shard it alike).

ZeRO-1 (`parallel.zero=1`, under DDP or beside TP/PP): each rank owns
whole tensors, assigned greedily by size; the optimizer keeps state for its own only,
and after its step every owner broadcasts its tensors to the other replicas. Whole
tensors keep LAMB's per-tensor trust ratio local, and each rank's checkpoint holds the
optimizer state of its own tensors, so the save is sharded like any other layout's.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor

# Elements per all-reduce bucket: large enough to amortise latency, small enough that the
# flat copy stays a fraction of the model (64 MiB of fp32).
BUCKET_NUMEL = 1 << 24


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _buckets(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive runs of same-dtype tensors of at most BUCKET_NUMEL elements each (a larger
    tensor makes a bucket of its own)."""
    runs: dict[tuple, list[list[torch.Tensor]]] = defaultdict(list)
    sizes: dict[tuple, int] = defaultdict(int)
    for t in tensors:
        key = (t.dtype, t.device)
        if not runs[key] or sizes[key] + t.numel() > BUCKET_NUMEL:
            runs[key].append([])
            sizes[key] = 0
        runs[key][-1].append(t)
        sizes[key] += t.numel()
    return [run for kind in runs.values() for run in kind]


def _copy_back(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    for t, value in zip(tensors, _unflatten_dense_tensors(flat, tensors), strict=True):
        t.copy_(value)


def owners_by_size(params: list[nn.Parameter], n_ranks: int) -> list[int]:
    """Owning rank of each parameter: largest first, each to the least-loaded rank.

    Uses full (global) sizes, so every rank, whatever its TP shard, computes the same map.
    """
    load = [0] * n_ranks
    owner = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        rank = min(range(n_ranks), key=lambda r: (load[r], r))
        owner[i] = rank
        load[rank] += params[i].numel()
    return owner


class ReplicaSync:
    """Gradient averaging and ZeRO-1 parameter broadcast over one data-parallel group.

    `reduce_gradients` (when `reduce` is set) runs after the last backward of a step;
    `broadcast_parameters` (ZeRO-1) after the optimizer step. Both are collectives over
    `group` and see the same parameters in the same order on every rank.
    """

    def __init__(
        self, params: list[nn.Parameter], *, group: dist.ProcessGroup, reduce: bool, zero1: bool
    ):
        self.params = list(params)
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.reduce = reduce
        self.owner = owners_by_size(self.params, self.size) if zero1 else None
        self._index = {id(p): i for i, p in enumerate(self.params)}

    def owns(self, p: nn.Parameter) -> bool:
        return self.owner is None or self.owner[self._index[id(p)]] == self.rank

    def shard_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Keep only this rank's parameters in `optimizer`'s groups (ZeRO-1). Groups stay,
        possibly empty, so their hyperparameters line up on every rank."""
        if self.owner is not None:
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if self.owns(p)]
        return optimizer

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        if not self.reduce or self.size == 1:
            return
        grads = [local(p.grad) for p in self.params if p.grad is not None]
        for bucket in _buckets(grads):
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=self.group)
            flat.div_(self.size)
            _copy_back(bucket, flat)

    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        if self.owner is None or self.size == 1:
            return
        for owner in range(self.size):
            tensors = [local(self.params[i].data) for i, o in enumerate(self.owner) if o == owner]
            src = dist.get_global_rank(self.group, owner)
            for bucket in _buckets(tensors):
                flat = _flatten_dense_tensors(bucket)
                dist.broadcast(flat, src=src, group=self.group)
                if owner != self.rank:
                    _copy_back(bucket, flat)
