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
from torch.distributed.tensor import DTensor, Partial

# Elements per all-reduce bucket: large enough to amortise latency, small enough that the
# flat copy stays a fraction of the model (64 MiB of fp32).
BUCKET_NUMEL = 1 << 24


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds: a DTensor's local shard, a plain tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Sum of squares of every gradient (float64), reduced over whichever mesh axes shard
    each DTensor: one collective per distinct (mesh, placements), not per tensor. Ranks
    sharing those axes hold the same parameters in the same order, so the collectives
    line up."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    by_layout: dict[tuple, list] = {}
    for g in grads:
        sq = local(g).double().pow(2).sum()
        if not isinstance(g, DTensor):
            total += sq
            continue
        entry = by_layout.setdefault((id(g.device_mesh), g.placements), [g.device_mesh, 0.0])
        entry[1] = entry[1] + sq
    for (_, placements), (mesh, sq) in by_layout.items():
        partial = [p if p.is_replicate() else Partial() for p in placements]
        total += DTensor.from_local(sq, mesh, partial, run_check=False).full_tensor()
    return total


def clip_grads_(params: list[nn.Parameter], max_norm: float, device: torch.device) -> torch.Tensor:
    """clip_grad_norm_ for gradients that are DTensors on different meshes (dense ones over
    data parallelism, experts over expert parallelism): the norm reduces each layout over
    the axes that shard it, so every element, every expert, counts once."""
    grads = [p.grad.detach() for p in params if p.grad is not None]
    total = squared_norm(grads, device).sqrt().float()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        local(g).mul_(coef.to(g.dtype))
    return total


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
    """Gradient averaging and ZeRO-1 parameter broadcast over the data-parallel replicas.

    `reduce_gradients` (when `reduce` is set) runs after the last backward of a step;
    `broadcast_parameters` (ZeRO-1) after the optimizer step. Both are collectives over
    `group` and see the same parameters in the same order on every rank. Expert weights
    (`experts`, under expert parallelism) differ between the ranks of an ep group: theirs
    are summed over `expert_group`, the ranks holding the same experts, but divided like
    every other gradient by the size of `group`, the whole data-parallel degree; under
    ZeRO-1 their owners are ranks of `expert_group`.
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        *,
        group: dist.ProcessGroup,
        reduce: bool,
        zero1: bool,
        experts: list[nn.Parameter] = (),
        expert_group: dist.ProcessGroup | None = None,
    ):
        expert_ids = {id(p) for p in experts}
        self.params = list(params)
        self.size = dist.get_world_size(group)
        self.reduce = reduce
        self.sets = [
            _Replicas([p for p in self.params if id(p) not in expert_ids], group, zero1=zero1)
        ]
        if expert_ids:
            members = [p for p in self.params if id(p) in expert_ids]
            self.sets.append(_Replicas(members, expert_group or group, zero1=zero1))
        self._set_of = {id(p): rs for rs in self.sets for p in rs.params}

    def owns(self, p: nn.Parameter) -> bool:
        return self._set_of[id(p)].owns(p)

    def shard_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Keep only this rank's parameters in `optimizer`'s groups (ZeRO-1). Groups stay,
        possibly empty, so their hyperparameters line up on every rank."""
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if self.owns(p)]
        return optimizer

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        if not self.reduce or self.size == 1:
            return
        for rs in self.sets:
            grads = [local(p.grad) for p in rs.params if p.grad is not None]
            for bucket in _buckets(grads):
                flat = _flatten_dense_tensors(bucket)
                if rs.size > 1:
                    dist.all_reduce(flat, group=rs.group)
                flat.div_(self.size)
                _copy_back(bucket, flat)

    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        for rs in self.sets:
            rs.broadcast()


class _Replicas:
    """Parameters replicated over one process group, with their ZeRO-1 owners there."""

    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup, *, zero1: bool):
        self.params = params
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.owner = owners_by_size(params, self.size) if zero1 else None
        self._index = {id(p): i for i, p in enumerate(params)}

    def owns(self, p: nn.Parameter) -> bool:
        return self.owner is None or self.owner[self._index[id(p)]] == self.rank

    def broadcast(self) -> None:
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
