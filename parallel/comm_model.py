"""The expected communication of one optimizer step of a layout: the formula beside the
measurement of parallel/comm.py, from the layout's numbers alone (no process group), so
that a small run checks it and a dry run applies it to any world size.

`expected_comm(layout)` returns payload bytes per (kind, axis) with the same meaning as
`CommCounter`'s (what each rank hands the collective; parallel/comm.py), averaged over the
ranks (the ranks of one pipeline stage all move the same). With n micro-batches of M rows
of T tokens per rank and step, D = d_model, "act" = M T D elements, and P the parameter
elements this rank holds (its pipeline stages; tensor-parallel weights / tp):

Data parallel (dp > 1), by ZeRO stage, as parallel/parallelize.py sets it up:
  0   all_reduce(dp)  P gradients, once (DDP, or ReplicaSync beside TP / PP / EP);
  1   as 0, and broadcast(dp) P parameters after the optimizer step (each owner sends its
      tensors; every rank hands every bucket to the broadcast);
  2-3 FSDP2 over fsdp: reduce_scatter P gradients once (fp32, its reduce dtype);
      all_gather P / dp parameters (in the compute dtype) for every forward, since
      parameters are resharded after each backward; at ZeRO-3 again for every backward
      (every unit, the root included, is resharded after forward). Under a pipeline the
      schedule keeps them unsharded across a step's backwards: ZeRO-2 gathers once per
      step, ZeRO-3 n + 1 times (each forward of GPipe or 1F1B, then the first backward;
      interleaved schedules may differ).
  Expert weights (ep > 1) do the same over edp, the ranks holding the same experts.
Tensor parallel (tp > 1; Megatron's layout, parallel/tensor_parallel.py), per micro-batch
and per row-parallel sub-layer (attention output, MLP output: 2 per GPT block):
  sp off: all_reduce(tp) of act in forward (the row-parallel output) and in backward
          (the gradient of the column-parallel input);
  sp on:  each of those becomes a reduce_scatter of act, and all_gather of act / tp before
          the column-parallel input (forward) and of the output's gradient (backward).
  The vocabulary-parallel embedding adds one forward reduction (sp: reduce_scatter, and an
  all_gather of the gradient), the output projection one backward reduction (sp: and a
  forward all_gather), and the vocabulary-parallel loss three all_reduces of M T fp32
  (maximum, sum of exponentials, target logit). Under sp a learned position table's
  gradient is gathered (T / tp x D, or M T / tp x D when positions are per row), and the
  gradient of every norm weight and bias, a pending sum after backward, is all-reduced
  once per step (`reduce_pending_grads`, all of them in one buffer).
Pipeline (pp > 1), per micro-batch and stage boundary: send/recv(pp) of act (act / tp
  under sp) forward and of its gradient backward; and once per step, the gradient of a
  weight tied across ranks (embedding and head), each copy's local shard both ways.
Expert parallel (ep > 1), per MoE layer and micro-batch: 4 all_to_alls (dispatch and
  return, forward and backward) of E x M x capacity x D when the layers pad to capacity
  (exact: the buffers' shape is fixed); sorted by expert, of M T top_k x D (an upper bound,
  since choices past an expert's capacity stay home) after one exchange of E counts.

Dtypes: gradients and their reductions are fp32; activations leave a row-parallel layer
in the compute dtype (bf16 / fp16 under autocast) but the residual stream, norm outputs,
embeddings and their gradients stay fp32, so stage boundaries and the other reductions
move fp32. Left out: scalars (loss and token sums, gradient-norm pieces, LAMB's norms,
finiteness and stop flags, routing counts), which `CommCounter` tallies as "control";
FSDP2's padding of each tensor to a multiple of dp rows; DDP's re-bucketing broadcast in
its second step (the trainer measures a later one); the pipeline's shape inference in its
first step. The tensor-parallel terms follow GPT and GLM; BERT's and T5's embeddings and
heads, and T5's cross-attention, differ by terms of the same size as the embedding's, and
ELECTRA's generator blocks are counted d_model wide (they are generator_size as wide).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from fnmatch import fnmatch

from torch import nn

from models.build import check_pipeline_split
from models.config import ModelConfig
from models.moe import moe_layers
from parallel.comm import CommTally, axis_label
from parallel.config import ParallelConfig
from parallel.data_parallel import BUCKET_NUMEL

__all__ = [
    "CommLayout",
    "StageParams",
    "comm_layout",
    "expected_comm",
    "stage_params",
]


@dataclass(frozen=True, kw_only=True)
class StageParams:
    """One pipeline stage (the whole model when pp = 1), in elements of full tensors."""

    params: int = 0
    """Every parameter of the stage but the expert weights (a tied weight once)."""
    tp_sharded: int = 0
    """Of `params`, the elements tensor parallelism splits over tp."""
    experts: int = 0
    """Stacked expert weights (split over ep)."""
    tied: int = 0
    """Elements of a weight this stage shares with a stage on another pipeline rank."""
    blocks: int = 0
    """Transformer blocks (FSDP2's units, beside the stage itself)."""
    row_parallel: int = 0
    """Row-parallel sub-layers in the stage's blocks (attention and MLP output: 2 each)."""
    embedding: bool = False
    """Holds the vocabulary-parallel token embedding (the first stage)."""
    head: bool = False
    """Holds the vocabulary-parallel output projection and so the loss (the last stage)."""
    moe_layers: int = 0
    sp_norm_tensors: int = 0
    """Norm weights and biases run on sequence shards under sp (each of d_model elements)."""
    sp_positions: int = 0
    """Learned position tables whose output is sliced by sequence under sp."""


@dataclass(frozen=True, kw_only=True)
class CommLayout:
    """What the formula needs of a layout: degrees, batch shape, model shape, parameters."""

    dp: int = 1
    """Data-parallel degree (replicas x shards x ep)."""
    tp: int = 1
    pp: int = 1
    ep: int = 1
    zero: int = 0
    sp: bool = False
    micro_batches: int = 1
    """Forward/backward passes per rank per step (the pipeline's micro-batches under pp)."""
    micro_batch_size: int = 1
    """Rows of each."""
    seq_len: int
    d_model: int
    stages: tuple[StageParams, ...]
    """pp x virtual_stages stages, in order; rank r holds stages r, r + pp, ..."""
    compute_bytes: int = 4
    """Element size of the compute dtype (FSDP2's gathered parameters, row-parallel outputs)."""
    positions_per_row: bool = False
    """Position ids differ per row (documents, GLM), so a position table's output is M T D."""
    top_k: int = 1
    num_experts: int = 0
    capacity: int | None = None
    """Slots per expert and row when MoE layers pad to capacity; None: sorted dispatch."""
    # fp32 whatever the compute dtype (see the module docstring):
    grad_bytes: int = 4
    """Gradients as reduced (DDP, ReplicaSync, FSDP2's reduce dtype, tied copies)."""
    param_bytes: int = 4
    """Master weights as ZeRO-1 broadcasts them."""
    act_bytes: int = 4
    """The residual stream, norm outputs and embeddings, and their gradients."""

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def shape(self) -> dict[str, int]:
        """Degree of each base mesh axis, as parallel.dist.mesh_shape lays them out."""
        edp = self.dp // self.ep
        sharded = self.zero >= 2
        return {
            "pp": self.pp,
            "dp_replicate": 1 if sharded else edp,
            "dp_shard": edp if sharded else 1,
            "ep": self.ep,
            "tp": self.tp,
        }


Event = tuple[str, str, float, int, int]  # (kind, axis, numel per call, element size, calls)


def expected_comm(layout: CommLayout) -> CommTally:
    """Payload bytes and calls per (kind, axis) of one optimizer step, averaged over the
    ranks; axes named as parallel.comm.axis_label names them for this layout's mesh, and
    collectives of at most CONTROL_NUMEL elements counted as control, as CommCounter does."""
    tally = CommTally()
    shape = layout.shape()
    for pp_rank in range(layout.pp):
        for kind, axis, numel, size, calls in _rank_events(layout, pp_rank):
            if calls and numel:
                share = calls / layout.pp
                tally.add(kind, axis_label(axis, shape), numel, numel * size * share, share)
    return tally


def _rank_events(lay: CommLayout, pp_rank: int) -> Iterator[Event]:
    stages = [(s, lay.stages[s]) for s in range(pp_rank, len(lay.stages), lay.pp)]
    yield from _data_parallel(lay, [st for _, st in stages])
    for index, stage in stages:
        if lay.tp > 1:
            yield from _tensor_parallel(lay, stage)
        if lay.pp > 1:
            yield from _pipeline(lay, stage, index)
        if lay.ep > 1 and stage.moe_layers:
            yield from _expert_parallel(lay, stage)


def _local(stage: StageParams, tp: int) -> int:
    """Elements of the stage's dense parameters on one rank after tensor parallelism."""
    return stage.tp_sharded // tp + stage.params - stage.tp_sharded


def _data_parallel(lay: CommLayout, stages: list[StageParams]) -> Iterator[Event]:
    """Gradient reduction and ZeRO's parameter traffic. Calls: one per FSDP2 unit (each
    block, and each stage as the root); per flat bucket for DDP and ReplicaSync."""
    if lay.dp == 1:
        return
    dense = sum(_local(s, lay.tp) for s in stages)
    experts = sum(s.experts for s in stages) // lay.ep
    edp = lay.dp // lay.ep
    if lay.zero <= 1:
        ddp = lay.tp == lay.pp == lay.ep == 1
        for axis, numel, size in (("dp", dense, lay.dp), ("edp", experts, edp)):
            if size > 1 and numel:
                calls = _ddp_buckets(numel * lay.grad_bytes) if ddp else _buckets(numel)
                yield "all_reduce", axis, numel / calls, lay.grad_bytes, calls
                if lay.zero == 1:  # every owner broadcasts at least one bucket
                    calls = max(size, _buckets(numel))
                    yield "broadcast", axis, numel / calls, lay.param_bytes, calls
        return
    gathers = _fsdp_gathers(lay)
    units = sum(s.blocks for s in stages) + len(stages)
    moe_units = sum(s.moe_layers for s in stages)
    for axis, numel, size, k in (
        ("fsdp", dense, lay.dp, units),
        ("edp", experts, edp, moe_units),
    ):
        if size > 1 and numel:  # numel per call: the mean over the units
            yield "all_gather", axis, numel / size / k, lay.compute_bytes, gathers * k
            yield "reduce_scatter", axis, numel / k, lay.grad_bytes, k


def _fsdp_gathers(lay: CommLayout) -> int:
    """All-gathers of each FSDP2 unit per step (see the module docstring)."""
    n = lay.micro_batches
    if lay.pp > 1:  # the schedule keeps parameters unsharded across backwards
        return n + 1 if lay.zero == 3 else 1
    return 2 * n if lay.zero == 3 else n


def _buckets(numel: int) -> int:
    return max(1, math.ceil(numel / BUCKET_NUMEL))


def _ddp_buckets(nbytes: int) -> int:
    """DDP's buckets: 1 MiB first, then 25 MiB (its defaults)."""
    return 1 + math.ceil(max(0, nbytes - (1 << 20)) / (25 << 20))


def _tensor_parallel(lay: CommLayout, stage: StageParams) -> Iterator[Event]:
    n, tp, fp32 = lay.micro_batches, lay.tp, lay.act_bytes
    act = lay.micro_batch_size * lay.seq_len * lay.d_model
    rows = stage.row_parallel
    if not lay.sp:
        yield "all_reduce", "tp", act, lay.compute_bytes, n * rows  # row-parallel outputs
        yield "all_reduce", "tp", act, fp32, n * rows  # column-parallel input gradients
        yield "all_reduce", "tp", act, fp32, n * (int(stage.embedding) + int(stage.head))
    else:
        shard = act // tp
        yield "all_gather", "tp", shard, fp32, n * rows  # norm outputs, forward
        yield "reduce_scatter", "tp", act, lay.compute_bytes, n * rows  # outputs, forward
        yield "all_gather", "tp", shard, lay.compute_bytes, n * rows  # output grads
        yield "reduce_scatter", "tp", act, fp32, n * rows  # input gradients
        ends = int(stage.embedding) + int(stage.head)
        yield "reduce_scatter", "tp", act, fp32, n * ends
        yield "all_gather", "tp", shard, fp32, n * ends
        table = (lay.micro_batch_size if lay.positions_per_row else 1) * lay.seq_len
        yield "all_gather", "tp", table * lay.d_model // tp, fp32, n * stage.sp_positions
        yield "all_reduce", "tp", lay.d_model, fp32, stage.sp_norm_tensors  # norm gradients
    if stage.head:  # vocabulary-parallel cross-entropy: max, sum of exp, target logit
        yield "all_reduce", "tp", lay.micro_batch_size * lay.seq_len, fp32, 3 * n


def _pipeline(lay: CommLayout, stage: StageParams, index: int) -> Iterator[Event]:
    n = lay.micro_batches
    act = lay.micro_batch_size * lay.seq_len * lay.d_model // (lay.tp if lay.sp else 1)
    if index < len(lay.stages) - 1:  # activation out, its gradient back
        yield "send", "pp", act, lay.act_bytes, n
        yield "recv", "pp", act, lay.act_bytes, n
    if index > 0:
        yield "recv", "pp", act, lay.act_bytes, n
        yield "send", "pp", act, lay.act_bytes, n
    if stage.tied:
        local = stage.tied // (lay.tp * (lay.dp if lay.zero >= 2 else 1))
        yield "send", "pp", local, lay.grad_bytes, 1
        yield "recv", "pp", local, lay.grad_bytes, 1


def _expert_parallel(lay: CommLayout, stage: StageParams) -> Iterator[Event]:
    n = lay.micro_batches * stage.moe_layers
    if lay.capacity is not None:
        slots = lay.num_experts * lay.micro_batch_size * lay.capacity
        yield "all_to_all", "ep", slots * lay.d_model, lay.act_bytes, 4 * n
        return
    tokens = lay.micro_batch_size * lay.seq_len * lay.top_k
    yield "all_to_all", "ep", lay.num_experts, 8, n  # token counts per expert (int64)
    yield "all_to_all", "ep", tokens * lay.d_model, lay.act_bytes, 4 * n


# --- the layout of a model -------------------------------------------------------------------


def comm_layout(
    model: nn.Module,
    model_cfg: ModelConfig,
    cfg: ParallelConfig,
    *,
    world_size: int,
    global_batch_size: int,
    micro_batch_size: int,
    seq_len: int,
    compute_bytes: int = 4,
    positions_per_row: bool = False,
) -> CommLayout:
    """The CommLayout of `model` (built whole, on any device: meta is enough) trained under
    `cfg` on `world_size` ranks with these batch sizes."""
    dp = cfg.data_parallel_size(world_size)
    if cfg.pp > 1:
        micro = cfg.pipeline_microbatches(
            global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, dp_size=dp
        )
        rows = global_batch_size // dp // micro
    else:
        micro, rows = global_batch_size // (micro_batch_size * dp), micro_batch_size
    return CommLayout(
        dp=dp,
        tp=cfg.tp,
        pp=cfg.pp,
        ep=cfg.ep,
        zero=cfg.zero,
        sp=cfg.sp,
        micro_batches=micro,
        micro_batch_size=rows,
        seq_len=seq_len,
        d_model=model_cfg.d_model,
        stages=tuple(stage_params(model, model_cfg, cfg)),
        compute_bytes=compute_bytes,
        positions_per_row=positions_per_row,
        top_k=model_cfg.moe.top_k,
        num_experts=model_cfg.moe.num_experts,
        capacity=model_cfg.moe.padded_capacity(seq_len, training=True),
    )


def stage_params(
    model: nn.Module, model_cfg: ModelConfig, cfg: ParallelConfig
) -> list[StageParams]:
    """The parameters of each pipeline stage of `model` under `cfg` (the model is only
    read: build it on the meta device)."""
    from parallel.expert_parallel import expert_parameters
    from parallel.parallelize import repeated_blocks

    n_stages = cfg.pp * cfg.virtual_stages
    owner = _stage_owner(model, model_cfg, cfg)
    styles = _styles(model, model_cfg, cfg)
    blocks = {id(m) for b in repeated_blocks(model) for m in b.modules()}
    experts = {id(p) for p in expert_parameters(model)}
    stages = [StageParams() for _ in range(n_stages)]
    seen: set[tuple[int, int]] = set()
    holders: dict[int, set[int]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        own = list(module.named_parameters(recurse=False, remove_duplicate=False))
        if not own:
            continue
        s = owner(f"{path}.{own[0][0]}" if path else own[0][0])
        style = styles.get(path, "")
        stage = stages[s]
        for name, p in own:
            holders.setdefault(id(p), set()).add(s % cfg.pp)
            if (s, id(p)) in seen:
                continue
            seen.add((s, id(p)))
            if id(p) in experts:
                stage = replace(stage, experts=stage.experts + p.numel())
                continue
            split = style == "col" or (style == "row" and name != "bias")
            stage = replace(
                stage,
                params=stage.params + p.numel(),
                tp_sharded=stage.tp_sharded + (p.numel() if split else 0),
                sp_norm_tensors=stage.sp_norm_tensors + int(style == "seq"),
            )
        in_block = id(module) in blocks
        stage = replace(
            stage,
            row_parallel=stage.row_parallel + int(in_block and style == "row"),
            embedding=stage.embedding or (not in_block and style == "row"),
            head=stage.head or path.rsplit(".", 1)[-1] == "lm_head",
            sp_positions=stage.sp_positions + int(style == "positions"),
        )
        stages[s] = stage
    for block in repeated_blocks(model):
        s = owner(_first_param(model, block))
        stages[s] = replace(stages[s], blocks=stages[s].blocks + 1)
    for name, layer in moe_layers(model):
        s = owner(f"{name}.{next(n for n, _ in layer.named_parameters())}")
        stages[s] = replace(stages[s], moe_layers=stages[s].moe_layers + 1)
    return _mark_tied(model, stages, owner, holders)


def _first_param(model: nn.Module, module: nn.Module) -> str:
    """The full name of `module`'s first parameter in `model`."""
    target = next(module.parameters())
    return next(n for n, p in model.named_parameters(remove_duplicate=False) if p is target)


def _mark_tied(model, stages, owner, holders) -> list[StageParams]:
    """A weight held by two pipeline ranks (tied embedding and head) counts as tied on both."""
    for name, p in model.named_parameters(remove_duplicate=False):
        if len(holders.get(id(p), ())) > 1:
            s = owner(name)
            if stages[s].tied == 0:
                stages[s] = replace(stages[s], tied=p.numel())
    return stages


def _stage_owner(model: nn.Module, model_cfg: ModelConfig, cfg: ParallelConfig):
    """Stage owning a parameter name: parallel/pipeline.py's split (stage s holds blocks
    [s L/S, (s + 1) L/S), the first stage the embeddings, the last the final norm and
    heads); ValueError naming the field for a split the pipeline refuses."""
    n_stages = cfg.pp * cfg.virtual_stages
    if n_stages == 1:
        return lambda name: 0
    check_pipeline_split(model_cfg, pp=cfg.pp, virtual_stages=cfg.virtual_stages)
    per_stage = model_cfg.n_layer // n_stages
    last = set(model.pipeline_last)

    def owner(name: str) -> int:
        top, _, rest = name.partition(".")
        if top == "blocks":
            return int(rest.partition(".")[0]) // per_stage
        return n_stages - 1 if top in last else 0

    return owner


def _styles(model: nn.Module, model_cfg: ModelConfig, cfg: ParallelConfig) -> dict[str, str]:
    """{module path: "col" | "row" | "seq" | "positions"} for the modules whose parameters
    the family's tensor-parallel plan splits (col, row), runs on sequence shards (seq: norms
    under sp) or slices by sequence (positions); others are replicated. Read at any tp, so
    that the stages describe the model the same way whatever the degree."""
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, SequenceParallel

    from parallel.tensor_parallel import ReplicateParallel, tp_plan

    try:
        plan = tp_plan(model_cfg, sequence_parallel=cfg.sp)
    except ValueError:  # a family without a plan runs without tensor parallelism
        return {}
    out = {}
    for path, _ in model.named_modules():
        for key, style in plan.items():
            if not _matches(path, key):
                continue
            if isinstance(style, ColwiseParallel):
                out[path] = "col"
            elif isinstance(style, RowwiseParallel):
                out[path] = "row"
            elif isinstance(style, SequenceParallel):
                out[path] = "seq"
            elif isinstance(style, ReplicateParallel) and isinstance(style.output_layouts, Shard):
                out[path] = "positions"
    return out


def _matches(path: str, key: str) -> bool:
    parts, pattern = path.split("."), key.split(".")
    return len(parts) == len(pattern) and all(
        fnmatch(p, k) for p, k in zip(parts, pattern, strict=True)
    )
