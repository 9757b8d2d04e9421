"""Pipeline parallelism: split a model's blocks into stages and run them on a schedule.

Stage `s` of `S = pp x virtual_stages` owns blocks `[s * L/S, (s + 1) * L/S)`; stage 0 also
owns the embeddings, stage S-1 the final norm and the head(s). Rank `r` of the pipeline
axis holds stages `r, r + pp, r + 2 pp, ...` (the "loop" placement of interleaved 1F1B,
Narayanan et al. 2021), so with virtual_stages = 1 it holds stage r alone.

A stage module keeps the original module names (`blocks.5.attn.qkv.weight`) because it
registers the model's own submodules under their own names; nothing is copied. The model
passed in is pruned in place to what this rank owns, so checkpoints stay keyed by the
single-process names whatever the layout.

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
differs from the loop placement above.

Refused: T5 (the decoder stages would need the encoder output) and ALBERT's shared layers
(one block's weights cannot live on several stages). Dropout draws from each rank's own
generator, so only dropout-free runs match a single process bit for bit.

Shape legend (suffixes of tensor names):
    B  batch size (rows of the rank-local batch)
    M  rows of one microbatch
    T  sequence length (tokens)
    D  model width, d_model
    N  label keys (tasks) of a batch
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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
from torch.distributed.tensor import DTensor, Partial

from data_pipeline.objectives import IGNORE_INDEX
from models.bert import combine_masks
from models.blocks import causal_mask
from models.config import ModelConfig
from models.glm import blank_infilling_mask
from parallel.data_parallel import local
from parallel.tensor_parallel import loss_parallel_context, summed_losses_tp
from trainer.loss import summed_losses

__all__ = ["SCHEDULES", "PipelineRunner", "StageModule", "build_pipeline", "split_stages"]

_SINGLE_STAGE = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
_MULTI_STAGE = {
    "interleaved_1f1b": ScheduleInterleaved1F1B,
    "zero_bubble": ScheduleInterleavedZeroBubble,
}
SCHEDULES = (*_SINGLE_STAGE, *_MULTI_STAGE)

Inputs = dict[str, torch.Tensor]
ContextFactory = Callable[[], contextlib.AbstractContextManager]


# --- what each family runs on the first stage, on every stage, and on the last ------------


def _rope(model: nn.Module, x_BTD: torch.Tensor, inputs: Inputs):
    """Rotary tables from the batch's position ids (every stage needs them in every block)."""
    if getattr(model, "rotary", None) is None:
        return None
    position_ids = inputs.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(x_BTD.shape[1], device=x_BTD.device)
    return model.rotary(position_ids)


def _gpt_embed(model: nn.Module, input_ids_BT: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    return model.embed(input_ids_BT, position_ids_BT=inputs.get("position_ids"))


def _gpt_context(model: nn.Module, x_BTD: torch.Tensor, inputs: Inputs) -> dict:
    """Block keywords of GPT.forward: the causal mask folded into any explicit one."""
    rope, mask = _rope(model, x_BTD, inputs), inputs.get("attn_mask")
    if mask is None:
        return {"attn_mask": None, "is_causal": True, "rope": rope}
    allowed = mask & causal_mask(x_BTD.shape[1], device=mask.device)
    return {"attn_mask": allowed, "is_causal": False, "rope": rope}


def _bert_embed(model: nn.Module, input_ids_BT: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    return model.embed(
        input_ids_BT,
        token_type_ids_BT=inputs.get("token_type_ids"),
        position_ids_BT=inputs.get("position_ids"),
    )


def _bert_context(model: nn.Module, x_BTD: torch.Tensor, inputs: Inputs) -> dict:
    """Padding and document masks are per sample, so every stage rebuilds them."""
    b, t = x_BTD.shape[:2]
    mask = combine_masks(inputs.get("attention_mask"), inputs.get("attn_mask"), shape=(b, t))
    return {"attn_mask": mask, "rope": _rope(model, x_BTD, inputs)}


def _bert_head(model: nn.Module, x_BTD: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if model.ln_f is not None:
        x_BTD = model.ln_f(x_BTD)
    out = model.heads(x_BTD)
    return out["logits"], out["nsp_logits"]


def _glm_embed(model: nn.Module, input_ids_BT: torch.Tensor, inputs: Inputs) -> torch.Tensor:
    return model.embed(input_ids_BT, position_ids_B2T=inputs.get("position_ids"))


def _glm_context(model: nn.Module, x_BTD: torch.Tensor, inputs: Inputs) -> dict:
    sep_B = inputs.get("sep")
    if sep_B is None:
        return {"attn_mask": None}
    return {"attn_mask": blank_infilling_mask(sep_B, x_BTD.shape[1], device=x_BTD.device)}


def _lm_head(model: nn.Module, x_BTD: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (model.head(x_BTD),)


@dataclass(frozen=True)
class _Family:
    """How one family splits: top-level module names by stage, and the three stage bodies."""

    first: tuple[str, ...]  # embeddings, on stage 0 only
    last: tuple[str, ...]  # final norm and heads, on the last stage only
    every: tuple[str, ...]  # parameter-free helpers every stage calls (rotary tables)
    inputs: tuple[str, ...]  # forward keywords besides input_ids
    outputs: tuple[str, ...]  # names of the last stage's outputs, in order
    embed: Callable
    context: Callable
    head: Callable


_FAMILIES = {
    "gpt": _Family(
        first=("wte", "wpe", "drop"),
        last=("ln_f", "lm_head"),
        every=("rotary",),
        inputs=("position_ids", "attn_mask"),
        outputs=("logits",),
        embed=_gpt_embed,
        context=_gpt_context,
        head=_lm_head,
    ),
    "bert": _Family(
        first=("wte", "wpe", "tte", "emb_ln", "emb_proj", "drop"),
        last=("ln_f", "mlm_dense", "mlm_act", "mlm_ln", "lm_head", "pooler", "nsp_head"),
        every=("rotary",),
        inputs=("token_type_ids", "attention_mask", "position_ids", "attn_mask"),
        outputs=("logits", "nsp_logits"),
        embed=_bert_embed,
        context=_bert_context,
        head=_bert_head,
    ),
    "glm": _Family(
        first=("wte", "wpe", "wbpe", "drop"),
        last=("ln_f", "lm_head"),
        every=(),
        inputs=("position_ids", "sep"),
        outputs=("logits",),
        embed=_glm_embed,
        context=_glm_context,
        head=_lm_head,
    ),
}


# --- splitting ------------------------------------------------------------------------------


class StageModule(nn.Module):
    """One pipeline stage: the model's own submodules, registered under their own names.

    `forward(x, **inputs)`: on the first stage `x` is input_ids (B, T) and the embeddings
    run first; on the others it is the previous stage's activation (B, T, D). Per-sample
    inputs (masks, positions, GLM's sep) arrive as keywords on every stage; each stage uses
    what it needs. The last stage returns a tuple of logits, in `output_names` order.
    `forward_context` wraps the forward pass only (autocast), as the trainer wraps a
    plain model's call and not its loss or backward.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        family: str,
        stage_id: int,
        n_stages: int,
        module_names: list[str],
        block_ids: list[str],
    ):
        super().__init__()
        # Kept out of the module tree: the family methods (embed, head) live on the model,
        # but this stage's parameters must be only the pieces it owns.
        object.__setattr__(self, "_model", model)
        self.family = family
        self.stage_id = stage_id
        self.n_stages = n_stages
        for name in module_names:
            if getattr(model, name, None) is not None:
                self.add_module(name, getattr(model, name))
        self.blocks = nn.ModuleDict({k: model.blocks[k] for k in block_ids})
        self.forward_context: ContextFactory = contextlib.nullcontext

    @property
    def is_first(self) -> bool:
        return self.stage_id == 0

    @property
    def is_last(self) -> bool:
        return self.stage_id == self.n_stages - 1

    @property
    def output_names(self) -> tuple[str, ...]:
        return _FAMILIES[self.family].outputs

    def forward(
        self, x: torch.Tensor, **inputs: torch.Tensor
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        spec = _FAMILIES[self.family]
        with self.forward_context():
            x_BTD = spec.embed(self._model, x, inputs) if self.is_first else x
            block_kwargs = spec.context(self._model, x_BTD, inputs)
            for block in self.blocks.values():
                x_BTD = block(x_BTD, **block_kwargs)
            return spec.head(self._model, x_BTD) if self.is_last else x_BTD


@dataclass(frozen=True)
class _Plan:
    """Which stage owns which module: the same on every rank, computed from the config."""

    family: str
    n_stages: int
    per_stage: int

    def block_ids(self, stage: int) -> list[str]:
        return [str(i) for i in range(stage * self.per_stage, (stage + 1) * self.per_stage)]

    def module_names(self, stage: int) -> list[str]:
        spec = _FAMILIES[self.family]
        names = list(spec.every)
        if stage == 0:
            names += spec.first
        if stage == self.n_stages - 1:
            names += spec.last
        return names

    def owner(self, fqn: str) -> int:
        """Stage that owns the parameter or buffer named `fqn` in the plain model."""
        top, _, rest = fqn.partition(".")
        if top == "blocks":
            return int(rest.partition(".")[0]) // self.per_stage
        spec = _FAMILIES[self.family]
        if top in spec.first:
            return 0
        if top in spec.last:
            return self.n_stages - 1
        raise ValueError(f"{fqn!r} belongs to no pipeline stage of family {self.family}")


def _plan(model: nn.Module, cfg: ModelConfig, *, pp_size: int, virtual_stages: int) -> _Plan:
    if cfg.family == "t5":
        raise ValueError(
            "model.family='t5' cannot be pipelined: every decoder stage needs the encoder "
            "output and the decoder's cross-attention masks; set parallel.pp=1"
        )
    if cfg.family not in _FAMILIES:
        raise ValueError(
            f"model.family={cfg.family!r} has no pipeline split; choose one of {sorted(_FAMILIES)}"
        )
    if cfg.share_layers:
        raise ValueError(
            "model.share_layers=True (ALBERT) applies one block n_layer times, so its layers "
            "cannot be split into pipeline stages; set parallel.pp=1 or model.share_layers=false"
        )
    if pp_size < 1 or virtual_stages < 1:
        raise ValueError(
            f"parallel.pp={pp_size} and parallel.virtual_stages={virtual_stages} must be >= 1"
        )
    n_stages = pp_size * virtual_stages
    if cfg.n_layer % n_stages:
        raise ValueError(
            f"model.n_layer={cfg.n_layer} is not divisible by parallel.pp={pp_size} x "
            f"parallel.virtual_stages={virtual_stages} = {n_stages} pipeline stages"
        )
    expected = [str(i) for i in range(cfg.n_layer)]
    if list(model.blocks.keys()) != expected:
        raise ValueError(
            f"model.blocks holds {list(model.blocks.keys())}, expected {expected}: "
            "split a whole model, once"
        )
    spec = _FAMILIES[cfg.family]
    known = {"blocks", *spec.first, *spec.last, *spec.every}
    unknown = [name for name, _ in model.named_children() if name not in known]
    if unknown:
        raise ValueError(f"family {cfg.family}: modules {unknown} are assigned to no stage")
    return _Plan(cfg.family, n_stages, cfg.n_layer // n_stages)


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
            model,
            family=cfg.family,
            stage_id=s,
            n_stages=plan.n_stages,
            module_names=plan.module_names(s),
            block_ids=plan.block_ids(s),
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


class PipelineRunner:
    """The stages of one pipeline rank and the schedule that drives them.

    Every pipeline rank calls `train_step` / `forward_loss` with the same (rank-local
    data-parallel) batch; results come back on every rank. Use `modules` or `parameters()`
    for the optimizer and `clip_grad_norm_` for the norm over the whole pipeline.
    """

    def __init__(
        self,
        stages: list[StageModule],
        *,
        pp_mesh: DeviceMesh,
        device: torch.device,
        schedule: str,
        n_microbatches: int,
        tied: list[tuple[str, int]],
        tensor_parallel: bool = False,
        aliases: dict[str, list[str]] | None = None,
    ):
        self.modules: list[nn.Module] = list(stages)
        # The other names of each tied parameter in the whole model: a checkpoint written
        # without pipelining keys its optimizer state by the first name only.
        self.aliases = aliases or {}
        # Under TP the last stage's logits stay sharded over the vocabulary: the loss and
        # the backward through it run in loss_parallel.
        self.tensor_parallel = tensor_parallel
        self.schedule = schedule
        self.n_microbatches = n_microbatches
        self.device = device
        self.group = pp_mesh.get_group()
        self.pp_rank = pp_mesh.get_local_rank()
        self.pp_size = pp_mesh.size()
        self.family = stages[0].family
        # (local name, peer pipeline rank) of each tied parameter copied across ranks.
        self._tied = tied
        self._schedules: dict[bool, tuple[tuple, object]] = {}
        self._labels: Inputs = {}
        self._weights: dict[str, float] = {}
        self._records: list[dict[str, torch.Tensor]] = []

    # parameters ---------------------------------------------------------------------------

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(plain-model name, parameter) of every local parameter, each once."""
        seen: set[int] = set()
        for stage in self.modules:
            for name, p in stage.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    def train(self, mode: bool = True) -> PipelineRunner:
        for stage in self.modules:
            stage.train(mode)
        return self

    def eval(self) -> PipelineRunner:
        return self.train(False)

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    # steps --------------------------------------------------------------------------------

    def train_step(
        self, inputs: Inputs, labels: Inputs, weights: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        """Forward + backward of the batch in `n_microbatches` pieces; gradients accumulate.

        The last stage backpropagates sum over label keys of weights[key] x summed fp32
        cross-entropy (ignore_index -100) per microbatch, the trainer's normalisation (for
        fp16, pass weights multiplied by the loss scale). Returns each key's summed,
        unweighted loss (float64, CPU) on every pipeline rank.
        """
        missing = sorted(set(labels) - set(weights))
        if missing:
            raise ValueError(f"weights has no entry for the label keys {missing}")
        inputs = {k: v for k, v in inputs.items() if v is not None}
        batch = self._check(inputs, labels)
        if batch % self.n_microbatches:
            raise ValueError(
                f"the batch of {batch} rows does not split into "
                f"parallel.pp_microbatches={self.n_microbatches} equal microbatches"
            )
        input_ids, kwargs, rows = self._prepare(inputs, labels, weights)
        schedule = self._schedule(train=True, input_ids=input_ids, kwargs=kwargs)
        before = self._tied_snapshot()
        with loss_parallel_context(self.tensor_parallel):
            schedule.step(input_ids, target=rows, return_outputs=False, **kwargs)
        sums = self._collect(sorted(labels))
        self._sync_tied_grads(before)
        return sums

    @torch.no_grad()
    def forward_loss(
        self, inputs: Inputs, labels: Inputs
    ) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """(summed loss per label key, scored targets per key) without backward.

        A batch that does not split into equal microbatches is padded with unscored copies
        of its last row (labels -100), so any evaluation batch size works.
        """
        inputs = {k: v for k, v in inputs.items() if v is not None}
        batch = self._check(inputs, labels)
        counts = {k: int((v != IGNORE_INDEX).sum()) for k, v in labels.items()}
        pad = -batch % self.n_microbatches
        if pad:
            inputs = {k: _pad_rows(v, pad) for k, v in inputs.items()}
            labels = {k: _pad_rows(v, pad, fill=IGNORE_INDEX) for k, v in labels.items()}
        input_ids, kwargs, rows = self._prepare(inputs, labels, dict.fromkeys(labels, 1.0))
        schedule = self._schedule(train=False, input_ids=input_ids, kwargs=kwargs)
        with loss_parallel_context(self.tensor_parallel):
            schedule.eval(input_ids, target=rows, **kwargs)
        return self._collect(sorted(labels)), counts

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
        sq = _squared_norm(counted, self.device)
        if self.pp_size > 1:
            dist.all_reduce(sq, group=self.group)
        total = sq.sqrt().float()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            local(g).mul_(coef.to(g.dtype))
        return total.cpu()

    # internals ----------------------------------------------------------------------------

    def _check(self, inputs: Inputs, labels: Inputs) -> int:
        """Rows of the batch, after refusing inputs or labels the stages cannot use."""
        allowed = {"input_ids", *_FAMILIES[self.family].inputs}
        unknown = sorted(set(inputs) - allowed)
        if unknown:
            raise ValueError(
                f"inputs {unknown} are not inputs of a pipelined {self.family} model "
                f"(accepted: {sorted(allowed)})"
            )
        if "input_ids" not in inputs or not labels:
            raise ValueError("a pipelined batch needs inputs['input_ids'] and at least one label")
        outputs = _FAMILIES[self.family].outputs
        for key in labels:
            if key[: -len("labels")] + "logits" not in outputs:
                raise ValueError(f"label {key!r} has no matching {self.family} output {outputs}")
        batch = inputs["input_ids"].shape[0]
        for key, value in {**inputs, **labels}.items():
            if value.shape[0] != batch:
                raise ValueError(f"{key} has {value.shape[0]} rows, input_ids has {batch}")
        if batch == 0:
            raise ValueError("the batch is empty")
        return batch

    def _prepare(self, inputs: Inputs, labels: Inputs, weights: dict[str, float]):
        """input_ids (positional, first stage), the other inputs (keywords, every stage) and
        the row indices that stand in for the labels as the schedule's target."""
        on_device = {k: v.to(self.device) for k, v in inputs.items()}
        input_ids = on_device.pop("input_ids")
        self._labels = {k: v.to(self.device) for k, v in labels.items()}
        self._weights = dict(weights)
        self._records = []
        rows = torch.arange(input_ids.shape[0], device=self.device)
        return input_ids, on_device, rows

    def _loss(self, output, rows_M: torch.Tensor) -> torch.Tensor:
        """Loss of one microbatch on the last stage; records its per-task sums."""
        outputs = (output,) if isinstance(output, torch.Tensor) else tuple(output)
        logits = dict(zip(_FAMILIES[self.family].outputs, outputs, strict=True))
        labels = {k: v.index_select(0, rows_M) for k, v in self._labels.items()}
        sums = (summed_losses_tp if self.tensor_parallel else summed_losses)(logits, labels)
        self._records.append({k: v.detach() for k, v in sums.items()})
        return sum(sums[k] * self._weights[k] for k in sorted(sums))

    def _collect(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Per-task sums over the microbatches, broadcast from the last stage's rank."""
        sums_N = torch.zeros(len(keys), dtype=torch.float64, device=self.device)
        if any(stage.is_last for stage in self.modules):
            # Shape inference may add an extra call first; the real microbatches come last.
            for record in self._records[-self.n_microbatches :]:
                sums_N += torch.stack([record[k].double() for k in keys])
        self._records = []
        if self.pp_size > 1:
            last_rank = (self.modules[0].n_stages - 1) % self.pp_size
            dist.broadcast(sums_N, group=self.group, group_src=last_rank)
        return dict(zip(keys, sums_N.cpu().unbind(0), strict=True))

    def _schedule(self, *, train: bool, input_ids: torch.Tensor, kwargs: Inputs):
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
            for m in self.modules
        ]
        common = {"n_microbatches": self.n_microbatches, "loss_fn": self._loss}
        # The loss is already a weighted sum, normalised by the caller, so the schedule
        # must not divide gradients by the microbatch count.
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


def _local_grad(p: nn.Parameter) -> torch.Tensor:
    """This rank's part of p.grad, laid out as p is. DTensor may return a gradient in another
    layout (a vocabulary-parallel embedding's comes back replicated); it is re-laid first."""
    if isinstance(p.grad, DTensor) and p.grad.placements != p.placements:
        p.grad = p.grad.redistribute(p.device_mesh, p.placements)
    return local(p.grad)


def _squared_norm(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
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


def _pad_rows(value: torch.Tensor, pad: int, *, fill: int | None = None) -> torch.Tensor:
    extra = value[-1:].expand(pad, *value.shape[1:])
    if fill is not None:
        extra = torch.full_like(extra, fill)
    return torch.cat([value, extra])


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


def build_pipeline(
    model: nn.Module,
    cfg: ModelConfig,
    *,
    pp_mesh: DeviceMesh,
    device: torch.device,
    schedule: str,
    n_microbatches: int,
    virtual_stages: int = 1,
    forward_context: ContextFactory | None = None,
    tensor_parallel: bool = False,
) -> PipelineRunner:
    """Split `model` for this rank of the 1-D pipeline mesh `pp_mesh` and wrap the schedule.

    `model` is pruned in place to this rank's stages (see `split_stages`), which are moved
    to `device`. `forward_context` (e.g. `lambda: trainer.precision.autocast(cfg, device)`)
    is entered around every stage's forward pass. `tensor_parallel`: the model's
    parameters are already TP DTensors (its logits come out vocabulary-sharded).
    """
    pp_size, pp_rank = pp_mesh.size(), pp_mesh.get_local_rank()
    _check_schedule(schedule, n_microbatches=n_microbatches, pp_size=pp_size, v=virtual_stages)
    plan = _plan(model, cfg, pp_size=pp_size, virtual_stages=virtual_stages)
    shared = _shared_names(model)
    tied = _tied_pairs(shared, plan, pp_rank=pp_rank, pp_size=pp_size)
    stages = split_stages(
        model, cfg, pp_rank=pp_rank, pp_size=pp_size, virtual_stages=virtual_stages
    )
    for stage in stages:
        stage.to(device)
        if forward_context is not None:
            stage.forward_context = forward_context
    return PipelineRunner(
        stages,
        pp_mesh=pp_mesh,
        device=device,
        schedule=schedule,
        n_microbatches=n_microbatches,
        tied=tied,
        tensor_parallel=tensor_parallel,
        aliases={name: [a for a in names if a != name] for names in shared for name in names},
    )


def _check_schedule(schedule: str, *, n_microbatches: int, pp_size: int, v: int) -> None:
    """Refuse, naming the config fields, what torch's schedules would refuse later."""
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.pp_schedule={schedule!r} is unknown; choose one of {SCHEDULES}")
    if n_microbatches < 1:
        raise ValueError(f"parallel.pp_microbatches={n_microbatches} must be >= 1")
    if schedule in _SINGLE_STAGE and v != 1:
        raise ValueError(
            f"parallel.pp_schedule={schedule} runs one stage per rank; set "
            f"parallel.virtual_stages=1 (got {v}) or use interleaved_1f1b / zero_bubble"
        )
    if schedule == "1f1b" and n_microbatches < pp_size:
        raise ValueError(
            f"parallel.pp_schedule=1f1b needs parallel.pp_microbatches={n_microbatches} "
            f">= parallel.pp={pp_size}"
        )
    rounds = max(1, n_microbatches // pp_size)
    if schedule in _MULTI_STAGE and n_microbatches % rounds:
        raise ValueError(
            f"parallel.pp_schedule={schedule} needs parallel.pp_microbatches={n_microbatches} "
            f"to be a multiple of {rounds} (rounds of parallel.pp={pp_size} microbatches)"
        )
