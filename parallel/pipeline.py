"""Pipeline parallelism: split a model's blocks into stages and run them on a schedule.

Stage `s` of `S = pp x virtual_stages` owns blocks `[s * L/S, (s + 1) * L/S)`; stage 0 also
owns the embeddings, stage S-1 the final norm and the head(s). Rank `r` of the pipeline
axis holds stages `r, r + pp, r + 2 pp, ...` (the "loop" placement of interleaved 1F1B,
Narayanan et al. 2021), so with virtual_stages = 1 it holds stage r alone.

A stage is the model itself with the modules of other stages set to None (torchtitan's
pattern): the model's forward passes over what it lacks (without the embeddings it takes
the previous stage's hidden states, without the head it returns its own), so this module
holds no family code. The model class names its first-stage modules (`pipeline_first`)
and last-stage modules (`pipeline_last`); `blocks` is split evenly, and any other module
(a rotary table) must hold no parameters and runs on every stage. Each stage is a shallow
view of the model that shares its submodules; nothing is copied. The model passed in is
pruned in place to what this rank owns, so checkpoints stay keyed by the single-process
names whatever the layout.

Tied embeddings: with `tie_embeddings` the first stage's `wte.weight` and the last stage's
`lm_head.weight` are one parameter of the plain model. When the two stages live on
different ranks each rank holds a copy; their gradients are summed after every step
(Megatron's embedding group), so both copies receive the same update.

Schedules (torch.distributed.pipelining, all run on CPU/gloo):
    gpipe             ScheduleGPipe                  virtual_stages = 1
    1f1b              Schedule1F1B                   virtual_stages = 1, microbatches >= pp
    interleaved_1f1b  ScheduleInterleaved1F1B        any virtual_stages
    zero_bubble       ScheduleInterleavedZeroBubble  any virtual_stages (ZB1P, Qi et al. 2024)
ScheduleZBVZeroBubble is not offered: its V placement (rank r holds stages r and 2 pp-1-r)
differs from the loop placement above. The config checks (parallel/config.py,
models.build.check_pipeline_split) refuse what the schedules would refuse later.

Dropout draws from each rank's own generator, so only dropout-free runs match a single
process bit for bit.

Shape legend (suffixes of tensor names):
    B  batch size (rows of the rank-local batch)
    M  rows of one microbatch
    N  label keys (tasks) of a batch
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from models.build import check_pipeline_split
from models.config import ModelConfig
from models.moe import moe_layers
from parallel.data_parallel import ReplicaSync, local, squared_norm
from parallel.dist import World
from parallel.engine import Batch, ContextFactory, MicroBatch, TrainingSpec, inputs_to
from parallel.native_engine import NativeEngine
from parallel.tensor_parallel import reduce_pending_grads

__all__ = [
    "SCHEDULES",
    "PipelineEngine",
    "RankStages",
    "StageModule",
    "split_for_rank",
    "split_stages",
]

_SINGLE_STAGE = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
_MULTI_STAGE = {
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
}
SCHEDULES = (*_SINGLE_STAGE, *_MULTI_STAGE)


# --- splitting ------------------------------------------------------------------------------


class StageModule(nn.Module):
    """One pipeline stage: the modules of a stage view of the model, registered here under
    their own names, so parameter names (and FSDP2's units) are the single-process ones.

    `forward(x, **inputs)` runs the view: on the first stage `x` is input_ids (B, T), on
    the others the previous stage's activation. Per-sample inputs (masks, positions, GLM's
    sep) arrive as keywords on every stage. A dict output (the last stage of a model with
    several heads) leaves as a tuple, its keys in `output_keys`. `forward_context` wraps the
    forward pass only (autocast), as the native engine wraps a plain model's call and not
    its loss.
    """

    def __init__(self, view: nn.Module, *, stage_id: int, n_stages: int):
        super().__init__()
        # Kept out of the module tree: its children are registered here directly.
        object.__setattr__(self, "_view", view)
        self.stage_id = stage_id
        self.n_stages = n_stages
        for name, module in view.named_children():
            self.add_module(name, module)
        self.forward_context: ContextFactory = contextlib.nullcontext
        # Keys of a model that returns a dict (BERT's logits and nsp_logits), in order.
        self.output_keys: tuple[str, ...] | None = None

    @property
    def is_first(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last(self) -> bool:
        return self.stage_id == self.n_stages - 1

    def forward(self, x: torch.Tensor, **inputs: torch.Tensor):
        with self.forward_context():
            out = self._view(x, **inputs)
        if isinstance(out, dict):  # schedules pass tensors or tuples: keep the keys aside
            self.output_keys = tuple(out)
            return tuple(out.values())
        return out


@dataclass(frozen=True)
class _Plan:
    """Which stage owns which module: the same on every rank, computed from the model."""

    first: tuple[str, ...]  # embeddings, on stage 0 only
    last: tuple[str, ...]  # final norm and heads, on the last stage only
    every: tuple[str, ...]  # parameter-free helpers every stage runs
    n_stages: int
    per_stage: int

    def block_ids(self, stage: int) -> list[str]:
        return [str(i) for i in range(stage * self.per_stage, (stage + 1) * self.per_stage)]

    def module_names(self, stage: int) -> set[str]:
        names = set(self.every)
        if stage == 0:
            names.update(self.first)
        if stage == self.n_stages - 1:
            names.update(self.last)
        return names

    def owner(self, fqn: str) -> int:
        """Stage that owns the parameter or buffer named `fqn` in the plain model."""
        top, _, rest = fqn.partition(".")
        if top == "blocks":
            return int(rest.partition(".")[0]) // self.per_stage
        if top in self.first:
            return 0
        if top in self.last:
            return self.n_stages - 1
        raise ValueError(f"{fqn!r} belongs to no pipeline stage")


def _plan(model: nn.Module, cfg: ModelConfig, *, pp_size: int, virtual_stages: int) -> _Plan:
    check_pipeline_split(cfg, pp=pp_size, virtual_stages=virtual_stages)
    n_stages = pp_size * virtual_stages
    expected = [str(i) for i in range(cfg.n_layer)]
    if list(model.blocks.keys()) != expected:
        raise ValueError(
            f"model.blocks holds {list(model.blocks.keys())}, expected {expected}: "
            "split a whole model, once"
        )
    first, last = tuple(model.pipeline_first), tuple(model.pipeline_last)
    every = tuple(
        name for name, _ in model.named_children() if name not in {"blocks", *first, *last}
    )
    weighted = [name for name in every if any(True for _ in getattr(model, name).parameters())]
    if weighted:
        raise ValueError(
            f"{type(model).__name__} modules {weighted} hold parameters but belong to no "
            "pipeline stage: name them in pipeline_first or pipeline_last"
        )
    return _Plan(first, last, every, n_stages, cfg.n_layer // n_stages)


def _stage_view(model: nn.Module, *, keep: set[str], block_ids: list[str]) -> nn.Module:
    """A shallow copy of `model` whose top-level modules outside `keep` are None and whose
    `blocks` hold only `block_ids`; submodules, parameters and hooks are shared."""
    view = copy.copy(model)
    children = {name: module if name in keep else None for name, module in model._modules.items()}
    children["blocks"] = nn.ModuleDict({k: model.blocks[k] for k in block_ids})
    view.__dict__["_modules"] = children
    return view


def split_stages(
    model: nn.Module, cfg: ModelConfig, *, pp_rank: int, pp_size: int, virtual_stages: int
) -> list[StageModule]:
    """The stage modules of pipeline rank `pp_rank` (stage ids pp_rank + k * pp_size).

    `model` is pruned in place to the modules those stages own (the rest is freed), so
    split a fully built model once per process; build and initialise it first, since the
    pruned model can no longer re-tie or re-initialise itself.
    """
    plan = _plan(model, cfg, pp_size=pp_size, virtual_stages=virtual_stages)
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pp_rank={pp_rank} is outside parallel.pp={pp_size}")
    ids = [pp_rank + k * pp_size for k in range(virtual_stages)]
    stages = [
        StageModule(
            _stage_view(model, keep=plan.module_names(s), block_ids=plan.block_ids(s)),
            stage_id=s,
            n_stages=plan.n_stages,
        )
        for s in ids
    ]
    _prune(model, stages)
    return stages


def _prune(model: nn.Module, stages: list[StageModule]) -> None:
    owned = {name for stage in stages for name, _ in stage.named_children()}
    owned_blocks = {k for stage in stages for k in stage.blocks}
    for key in [k for k in model.blocks if k not in owned_blocks]:
        del model.blocks[key]
    for name in [n for n, m in model.named_children() if n != "blocks" and n not in owned]:
        setattr(model, name, None)


def _shared_names(model: nn.Module) -> list[list[str]]:
    """Names of every parameter that appears under more than one name (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [group for group in names.values() if len(group) > 1]


# --- running --------------------------------------------------------------------------------


class PipelineEngine(NativeEngine):
    """This rank's pipeline stages, the schedule that drives them, and their optimizer.

    Every pipeline rank receives the same (rank-local data-parallel) batch; losses come back
    on every rank. `module` is the plain model pruned to this rank's stages; `stages` the
    stage modules (FSDP2-sharded at ZeRO-2/3). Beside the native engine's step, gradients
    of tied parameters copied on two ranks are summed after each batch and the gradient
    norm is reduced over the whole pipeline.
    """

    def __init__(
        self,
        module: nn.Module,
        stages: list[StageModule],
        *,
        spec: TrainingSpec,
        world: World,
        pp_mesh: DeviceMesh,
        schedule: str,
        n_microbatches: int,
        tied: list[tuple[str, int]],
        aliases: dict[str, list[str]],
        replicas: ReplicaSync | None = None,
        tensor_parallel: bool = False,
    ):
        super().__init__(
            module,
            spec=spec,
            world=world,
            replicas=replicas,
            tensor_parallel=tensor_parallel,
            aliases=aliases,
        )
        self.stages = list(stages)
        for stage in self.stages:
            stage.forward_context = spec.forward_context
        self.schedule = schedule
        self.n_microbatches = n_microbatches
        self.device = world.device
        self.group = pp_mesh.get_group()
        self.pp_rank = pp_mesh.get_local_rank()
        self.pp_size = pp_mesh.size()
        # (local name, peer pipeline rank) of each tied parameter copied across ranks.
        self._tied = tied
        self._accepted = set(inspect.signature(type(module).forward).parameters) - {"self"}
        self._schedules: dict[bool, tuple[tuple, object]] = {}
        self._labels: Batch = {}
        self._weights: dict[str, float] = {}
        self._real_rows = 0
        self._padded = False
        self._records: list[dict[str, torch.Tensor]] = []

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(plain-model name, parameter) of every local parameter, each once."""
        seen: set[int] = set()
        for stage in self.stages:
            for name, p in stage.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def _set_mode(self, training: bool) -> None:
        for stage in self.stages:
            stage.train(training)

    # steps --------------------------------------------------------------------------------

    def forward_backward(
        self, micro_batches: list[MicroBatch], weights: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        """Each batch of `micro_batches` runs as one schedule step, split into
        `n_microbatches` pieces (the trainer hands the rank's whole batch as one); gradients
        accumulate. The last stage backpropagates sum over label keys of weights[key] x the
        loss function's summed loss per microbatch (times the fp16 loss scale)."""
        self._set_mode(True)
        totals: dict[str, torch.Tensor] = {}
        for i, (inputs, labels) in enumerate(micro_batches):
            if i == len(micro_batches) - 1 and self.replicas is not None:
                # Data-parallel buckets start during the schedule's backwards.
                self.replicas.begin_overlap(accumulations=self.n_microbatches)
            sums = self._train_batch(inputs, labels, weights)
            totals = {k: totals[k] + v for k, v in sums.items()} if totals else sums
        return totals

    def _train_batch(self, inputs: Batch, labels: Batch, weights: dict[str, float]):
        missing = sorted(set(labels) - set(weights))
        if missing:
            raise ValueError(f"weights has no entry for the label keys {missing}")
        batch = self._check(inputs, labels)
        if batch % self.n_microbatches:
            raise ValueError(
                f"the batch of {batch} rows does not split into "
                f"parallel.pp_microbatches={self.n_microbatches} equal microbatches"
            )
        input_ids, kwargs, rows = self._prepare(inputs, labels, weights, real_rows=batch)
        schedule = self._schedule(train=True, input_ids=input_ids, kwargs=kwargs)
        before = self._tied_snapshot()
        with self._loss_context():
            schedule.step(
                *self._first_stage_args(input_ids), target=rows, return_outputs=False, **kwargs
            )
        sums = self._collect(sorted(labels))
        self._sync_tied_grads(before)
        return sums

    @torch.no_grad()
    def evaluate(self, inputs: Batch, labels: Batch) -> dict[str, torch.Tensor]:
        """Summed loss per label key without backward. A batch that does not split into
        equal microbatches is padded with copies of its last row, which are not scored."""
        self._set_mode(False)
        batch = self._check(inputs, labels)
        pad = -batch % self.n_microbatches
        if pad:
            inputs = {k: _pad_rows(v, pad) for k, v in inputs.items()}
        input_ids, kwargs, rows = self._prepare(
            inputs, labels, dict.fromkeys(labels, 1.0), real_rows=batch
        )
        schedule = self._schedule(train=False, input_ids=input_ids, kwargs=kwargs)
        with self._loss_context():
            schedule.eval(*self._first_stage_args(input_ids), target=rows, **kwargs)
        return self._collect(sorted(labels))

    def _clip(self, max_norm: float) -> torch.Tensor:
        # The norm over every stage (inf or nan after an fp16 overflow on any rank).
        return self.clip_grad_norm_(max_norm).detach()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """L2 norm of every gradient of the pipeline, tied copies counted once, then clip to
        `max_norm` as torch.nn.utils.clip_grad_norm_ does. Collective over the pp axis (and
        over the mesh axes that shard DTensor gradients: TP, FSDP)."""
        counted_elsewhere = {name for name, peer in self._tied if peer < self.pp_rank}
        grads = []
        counted = []
        for name, p in self.named_parameters():
            if p.grad is not None:
                grads.append(p.grad.detach())
                if name not in counted_elsewhere:
                    counted.append(grads[-1])
        sq = squared_norm(counted, self.device)
        if self.pp_size > 1:
            dist.all_reduce(sq, group=self.group)
        total = sq.sqrt().float()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            local(g).mul_(coef.to(g.dtype))
        return total

    # internals ----------------------------------------------------------------------------

    def _check(self, inputs: Batch, labels: Batch) -> int:
        """Rows of the batch, after refusing inputs the model's forward does not take."""
        unknown = sorted(set(inputs) - self._accepted)
        if unknown:
            raise ValueError(
                f"inputs {unknown} are not arguments of {type(self.module).__name__}.forward "
                f"(accepted: {sorted(self._accepted)})"
            )
        if "input_ids" not in inputs or not labels:
            raise ValueError("a pipelined batch needs inputs['input_ids'] and at least one label")
        batch = inputs["input_ids"].shape[0]
        for key, value in {**inputs, **labels}.items():
            if value is not None and value.shape[0] != batch:
                raise ValueError(f"{key} has {value.shape[0]} rows, input_ids has {batch}")
        if batch == 0:
            raise ValueError("the batch is empty")
        return batch

    def _prepare(self, inputs: Batch, labels: Batch, weights: dict[str, float], *, real_rows: int):
        """input_ids (positional, first stage), the other inputs (keywords, every stage) and
        the row indices that stand in for the labels as the schedule's target."""
        on_device = inputs_to(self.device, {k: v for k, v in inputs.items() if v is not None})
        input_ids = on_device.pop("input_ids")
        self._labels = inputs_to(self.device, labels)
        self._weights = dict(weights)
        self._real_rows = real_rows
        self._padded = input_ids.shape[0] > real_rows
        self._records = []
        rows = torch.arange(input_ids.shape[0], device=self.device)
        return input_ids, on_device, rows

    def _first_stage_args(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The schedule's positional inputs: input_ids on the rank holding the first stage,
        none elsewhere (the other stages receive theirs; torch before 2.13 refuses them)."""
        return (input_ids,) if any(stage.is_first for stage in self.stages) else ()

    def _loss(self, output, rows_M: torch.Tensor) -> torch.Tensor:
        """Loss of one microbatch on the last stage; records its per-task sums. Rows past
        the real batch (evaluation padding, always the last rows) are left out."""
        keys = next(stage.output_keys for stage in self.stages if stage.is_last)
        if keys is not None:
            # The schedule hands a one-element tuple over as its tensor.
            output = (output,) if isinstance(output, torch.Tensor) else output
            output = dict(zip(keys, output, strict=True))
        if self._padded:
            real = int((rows_M < self._real_rows).sum())
            if real == 0:
                self._records.append(
                    {k: rows_M.new_zeros((), dtype=torch.float32) for k in self._labels}
                )
                return rows_M.new_zeros((), dtype=torch.float32)
            output, rows_M = _first_rows(output, real), rows_M[:real]
        labels = {k: v.index_select(0, rows_M) for k, v in self._labels.items()}
        sums = self.loss_fn(output, labels)
        self._records.append({k: v.detach() for k, v in sums.items()})
        # fp16: the last stage scales the loss, so every stage's gradients come back scaled
        # (and are unscaled by the step, the overflow verdict taken over every rank).
        return self.scaler.scale_loss(sum(sums[k] * self._weights[k] for k in sorted(sums)))

    def _collect(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Per-task sums over the microbatches, broadcast from the last stage's rank."""
        sums_N = torch.zeros(len(keys), dtype=torch.float64, device=self.device)
        if any(stage.is_last for stage in self.stages):
            # Shape inference may add an extra call first; the real microbatches come last.
            for record in self._records[-self.n_microbatches :]:
                sums_N += torch.stack([record[k].double() for k in keys])
        self._records = []
        if self.pp_size > 1:
            last_rank = (self.stages[0].n_stages - 1) % self.pp_size
            dist.broadcast(sums_N, group=self.group, group_src=last_rank)
        return dict(zip(keys, sums_N.unbind(0), strict=True))

    def _schedule(self, *, train: bool, input_ids: torch.Tensor, kwargs: Batch):
        """The schedule for this microbatch shape, built anew (with fresh stages, whose
        receive buffers are sized from the first microbatch) when the shape changes."""
        key = tuple(
            (k, tuple(v.shape), v.dtype)
            for k, v in [("input_ids", input_ids), *sorted(kwargs.items())]
        )
        cached = self._schedules.get(train)
        if cached is not None and cached[0] == key:
            return cached[1]
        stages = [
            PipelineStage(m, m.stage_id, m.n_stages, self.device, group=self.group)
            for m in self.stages
        ]
        common = {"n_microbatches": self.n_microbatches, "loss_fn": self._loss}
        # The loss is already a weighted sum, normalised by the caller, so the schedule
        # must not divide gradients by the microbatch count.
        if train:  # its first step first runs every stage once to infer shapes: not data
            for _, layer in moe_layers(self.module):
                layer.stats.skip += 1
        if self.schedule in _SINGLE_STAGE:
            built = _SINGLE_STAGE[self.schedule](stages[0], scale_grads=False, **common)
        else:
            built = _MULTI_STAGE[self.schedule](stages, scale_grads=False, **common)
        self._schedules[train] = (key, built)
        return built

    def _tied_snapshot(self) -> dict[str, torch.Tensor]:
        """Gradients already accumulated in tied copies (already summed over the copies),
        so that a second step before zero_grad adds only its own contribution."""
        params = dict(self.named_parameters())
        return {
            name: _local_grad(params[name]).detach().clone()
            for name, _ in self._tied
            if params[name].grad is not None
        }

    def _sync_tied_grads(self, before: dict[str, torch.Tensor]) -> None:
        """Sum this step's gradients of parameters copied on two ranks (tied embeddings)."""
        params = dict(self.named_parameters())
        for name, peer in self._tied:
            p = params[name]
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            # Both copies are sharded alike (TP, FSDP) on the peer: local shards pair up.
            grad = _local_grad(p).detach()
            mine = (grad - before[name] if name in before else grad).contiguous()
            theirs = torch.empty_like(mine)
            peer_rank = dist.get_global_rank(self.group, peer)
            ops = [
                dist.P2POp(dist.isend, mine, peer_rank, self.group),
                dist.P2POp(dist.irecv, theirs, peer_rank, self.group),
            ]
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            # a + b equals b + a exactly, so both copies stay bitwise equal.
            total = mine + theirs
            grad.copy_(total + before[name] if name in before else total)


def _first_rows(output, n: int):
    """The first `n` rows of a model output: a tensor, or a dict or tuple of them (slicing,
    which DTensor logits support, unlike boolean indexing)."""
    if isinstance(output, torch.Tensor):
        return output[:n]
    if isinstance(output, dict):
        return {k: v[:n] for k, v in output.items()}
    return tuple(v[:n] for v in output)


def _local_grad(p: nn.Parameter) -> torch.Tensor:
    """This rank's part of p.grad, laid out as p is. DTensor may return a gradient in another
    layout (a vocabulary-parallel embedding's comes back replicated); it is re-laid first."""
    reduce_pending_grads([p])
    return local(p.grad)


def _pad_rows(value: torch.Tensor, pad: int) -> torch.Tensor:
    return torch.cat([value, value[-1:].expand(pad, *value.shape[1:])])


def _tied_pairs(
    shared: list[list[str]], plan: _Plan, *, pp_rank: int, pp_size: int
) -> list[tuple[str, int]]:
    """(name this rank holds, peer rank) for each tied parameter split over two ranks."""
    pairs = []
    for names in shared:
        ranks = {name: plan.owner(name) % pp_size for name in names}
        holders = sorted(set(ranks.values()))
        if len(holders) == 1 or pp_rank not in holders:
            continue
        if len(holders) > 2:
            raise ValueError(f"tied parameters {names} span more than two pipeline ranks")
        peer = holders[0] if holders[1] == pp_rank else holders[1]
        mine = next(n for n, r in ranks.items() if r == pp_rank)
        pairs.append((mine, peer))
    return pairs


@dataclass(frozen=True)
class RankStages:
    """What `split_for_rank` leaves this pipeline rank: its stages, the tied parameters it
    shares with another rank, and the other names of every tied parameter."""

    stages: list[StageModule]
    tied: list[tuple[str, int]]  # (name this rank holds, peer pipeline rank)
    aliases: dict[str, list[str]]  # a checkpoint may hold a tied weight under either name


def split_for_rank(
    model: nn.Module, cfg: ModelConfig, *, pp_mesh: DeviceMesh, virtual_stages: int
) -> RankStages:
    """Split `model` for this rank of the 1-D pipeline mesh `pp_mesh`; `model` is pruned in
    place to this rank's stages (see `split_stages`)."""
    pp_size, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    plan = _plan(model, cfg, pp_size=pp_size, virtual_stages=virtual_stages)
    shared = _shared_names(model)
    stages = split_stages(
        model, cfg, pp_rank=pp_rank, pp_size=pp_size, virtual_stages=virtual_stages
    )
    return RankStages(
        stages=stages,
        tied=_tied_pairs(shared, plan, pp_rank=pp_rank, pp_size=pp_size),
        aliases={name: [a for a in names if a != name] for names in shared for name in names},
    )
