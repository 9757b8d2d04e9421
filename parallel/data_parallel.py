"""Data parallelism where DDP does not reach: tensor-parallel parameters and pipeline stages.

DDP wraps one module and hooks its forward; a pipeline's stages run inside a schedule,
and tensor-parallel parameters are DTensors, which DDP does not take. For those layouts
(ZeRO-0/1 beside TP or PP) `ReplicaSync` keeps the data-parallel replicas equal the way
Megatron's own DDP does: every gradient is averaged over the data-parallel ranks in a few
flat buckets (a DTensor's local shard stands for it, since all replicas shard it alike).

Overlap: during the last backward of a step (`begin_overlap`), a post-accumulate-grad
hook counts each parameter's accumulations, and a bucket's all-reduce starts
(asynchronously) once all of its gradients are final, while backward goes on with the
earlier layers. Buckets start in one fixed order on every rank (the plan: the last
layers' bucket first), so the collectives line up; `reduce_gradients` starts whatever
backward did not (a parameter without a gradient this step) and waits for all of them
before clipping. The buckets, and so the numerics, are those of the reduction after
backward (the same flat tensors, in the same order).

A pipeline arms the overlap before its schedule's step, which runs every microbatch's
backward interleaved with forwards: a gradient is final after one accumulation per
microbatch. A weight tied across stages gets its peer stage's gradient added after the
schedule, so its copies are `held`: bucketed apart, at the end of the plan, and started
by `reduce_gradients`.

ZeRO-1 (`parallel.zero=1`, under DDP or beside TP/PP): each rank owns
whole tensors, assigned greedily by size; the optimizer keeps state for its own only,
and after its step every owner broadcasts its tensors to the other replicas. Whole
tensors keep LAMB's per-tensor trust ratio local, and each rank's checkpoint holds the
optimizer state of its own tensors, so the save is sharded like any other layout's.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Callable

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


def _buckets(items: list, key: Callable = lambda t: t) -> list[list]:
    """Consecutive runs of items whose tensors (`key(item)`) share dtype and device, of at
    most BUCKET_NUMEL elements each (a larger tensor makes a bucket of its own)."""
    runs: dict[tuple, list[list]] = defaultdict(list)
    sizes: dict[tuple, int] = defaultdict(int)
    for item in items:
        t = key(item)
        kind = (t.dtype, t.device)
        if not runs[kind] or sizes[kind] + t.numel() > BUCKET_NUMEL:
            runs[kind].append([])
            sizes[kind] = 0
        runs[kind][-1].append(item)
        sizes[kind] += t.numel()
    return [run for group in runs.values() for run in group]


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

    `reduce_gradients` (when `reduce` is set) runs after the last backward of a step, and
    waits for the buckets that `begin_overlap` let backward start; `broadcast_parameters`
    (ZeRO-1) after the optimizer step. Both are collectives over `group` and see the same
    parameters in the same order on every rank. Expert weights (`experts`, under expert
    parallelism) differ between the ranks of an ep group: theirs are summed over
    `expert_group`, the ranks holding the same experts, but divided like every other
    gradient by the size of `group`, the whole data-parallel degree; under ZeRO-1 their
    owners are ranks of `expert_group`.
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
        held: list[nn.Parameter] = (),
    ):
        expert_ids = {id(p) for p in experts}
        held_ids = {id(p) for p in held}
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
        # Buckets in launch order, the same on every rank: each set's params bucketed in
        # model order, the last bucket (about the first that backward finishes) first;
        # the held parameters' buckets after all others.
        self._plan = [
            _Bucket(members, rs, divide_by=self.size)
            for hold in (False, True)
            for rs in self.sets
            for members in reversed(
                _buckets([p for p in rs.params if (id(p) in held_ids) == hold], key=local)
            )
        ]
        self._bucket_of = {id(p): b for b in self._plan for p in b.params}
        self._held = held_ids
        self._next = 0  # the first planned bucket not started this step
        self._overlapping = False
        self._accumulations = 1  # per parameter in the armed backward
        self._counts: dict[int, int] = defaultdict(int)
        self._hooks: list = []

    def owns(self, p: nn.Parameter) -> bool:
        return self._set_of[id(p)].owns(p)

    def shard_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Keep only this rank's parameters in `optimizer`'s groups (ZeRO-1). Groups stay,
        possibly empty, so their hyperparameters line up on every rank."""
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if self.owns(p)]
        return optimizer

    @property
    def buckets(self) -> tuple[int, int]:
        """(buckets started this step, buckets in the plan): what backward has started so
        far, for the tests of the overlap."""
        return self._next, len(self._plan)

    def begin_overlap(self, accumulations: int = 1) -> None:
        """Call right before the last backward of a step (a pipeline: before its schedule's
        step, `accumulations` = its microbatches): each bucket's all-reduce then starts as
        soon as every gradient in it has been accumulated `accumulations` times. Earlier
        micro-batches' backwards only accumulate."""
        if not self.reduce or self.size == 1:
            return
        self._wait_started()  # a step abandoned after its backward: finish what it began
        if not self._hooks:
            # The hook holds the sync weakly: parameters must not keep it (and its process
            # groups) alive after the engine is gone.
            this = weakref.ref(self)

            def accumulated(p: nn.Parameter) -> None:
                sync = this()
                if sync is not None:
                    sync._accumulated(p)

            self._hooks = [p.register_post_accumulate_grad_hook(accumulated) for p in self.params]
        self._accumulations = accumulations
        self._overlapping = True

    def _accumulated(self, p: nn.Parameter) -> None:
        if not self._overlapping or id(p) in self._held:
            return
        self._counts[id(p)] += 1
        if self._counts[id(p)] > self._accumulations:
            raise RuntimeError(
                f"a gradient was accumulated {self._counts[id(p)]} times in a backward armed "
                f"for {self._accumulations}, after its bucket's all-reduce started; "
                "ReplicaSync's overlap needs one accumulation per parameter and backward "
                "(reentrant checkpointing does two)"
            )
        if self._counts[id(p)] < self._accumulations:
            return
        self._bucket_of[id(p)].final.add(id(p))
        while self._next < len(self._plan) and self._plan[self._next].complete:
            self._plan[self._next].start()
            self._next += 1

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average every gradient over the replicas: start the buckets backward did not,
        in plan order, then wait for all of them."""
        if not self.reduce or self.size == 1:
            return
        self._overlapping = False
        for bucket in self._plan[self._next :]:
            bucket.start()
        self._next = len(self._plan)
        self._wait_started()

    def _wait_started(self) -> None:
        """Finish the started buckets and forget this step's progress."""
        for bucket in self._plan[: self._next]:
            bucket.finish()
        for bucket in self._plan[self._next :]:
            bucket.final.clear()
        self._next = 0
        self._overlapping = False
        self._counts.clear()

    @torch.no_grad()
    def broadcast_parameters(self) -> None:
        for rs in self.sets:
            rs.broadcast()


class _Bucket:
    """Parameters whose gradients are averaged in one flat all-reduce, and its progress in
    this step: which gradients are final, the flat copy and the pending work."""

    def __init__(self, params: list[nn.Parameter], rs: _Replicas, *, divide_by: int):
        self.params, self.rs, self.divide_by = params, rs, divide_by
        self.final: set[int] = set()
        self.started = False
        self.grads: list[torch.Tensor] = []
        self.flat: torch.Tensor | None = None
        self.work: dist.Work | None = None

    @property
    def complete(self) -> bool:
        return len(self.final) == len(self.params)

    @torch.no_grad()
    def start(self) -> None:
        self.started = True
        self.grads = [local(p.grad) for p in self.params if p.grad is not None]
        if not self.grads:
            return
        self.flat = _flatten_dense_tensors(self.grads)
        if self.rs.size > 1:
            self.work = dist.all_reduce(self.flat, group=self.rs.group, async_op=True)

    @torch.no_grad()
    def finish(self) -> None:
        """Wait for the all-reduce, write the averages back, forget this step."""
        if self.work is not None:
            self.work.wait()
        if self.flat is not None:
            self.flat.div_(self.divide_by)
            _copy_back(self.grads, self.flat)
        self.final.clear()
        self.started = False
        self.grads, self.flat, self.work = [], None, None


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
