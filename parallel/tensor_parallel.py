"""Tensor and sequence parallelism: one DTensor plan per family, applied from outside the model.

Megatron-LM's layout (Shoeybi et al. 2019) written as data: a dict from module path to a
`ParallelStyle`. In every block the projections that fan out (attention q/k/v or the fused
qkv, MLP fc_in/fc_gate) are column-parallel and the ones that fan back in (attention out,
MLP fc_out) are row-parallel, so each rank holds whole attention heads and a slice of the
MLP, and a block costs one reduction of its attention and one of its MLP output.
The token embedding is vocab-parallel (row-sharded table) and the output projection
column-parallel over the vocabulary, sharing the same sharded table when tied; the logits
stay sharded over the vocabulary (`Shard(-1)`) into the loss (`loss_parallel_context`),
so the full (B, T, V) logits are never gathered (ELECTRA's generator gathers the logits of
its masked positions, from which it samples).

Between modules, activations are plain local tensors with one of two layouts:
  sp off: the whole sequence, identical on every TP rank (`Replicate`);
  sp on:  this rank's contiguous slice of the sequence, dim 1 (`Shard(1)`), so norms,
          dropout and residual adds each handle 1/tp of the tokens (Korthikanti et al.
          2022); the reductions above become reduce-scatters and all-gathers.
Modules that are not split (norms without sp, position tables, BERT's heads) are wrapped
by `ReplicateParallel`, so every parameter of a parallelised model is a DTensor on the TP
mesh: optimizers see one kind of tensor, DTensor norms reduce over the shards (LAMB's
trust ratio uses full-tensor norms), and FSDP2 can shard the result over data parallel.

Where a family needs the whole sequence outside the blocks (BERT's rotary tables and its
[CLS] pooler, T5's relative bias and the encoder memory every decoder layer reads), the
embeddings stay replicated, the first block takes its slice, and the sequence is
gathered again where it is read whole.

Shape legend (suffixes of tensor names):
    B  batch size
    T  sequence length (tokens)
    D  model width, d_model
    V  embedding rows (the padded vocabulary)
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import (
    DTensor,
    Partial,
    Placement,
    Replicate,
    Shard,
    distribute_module,
    distribute_tensor,
)
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    PrepareModuleInputOutput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from models.config import ModelConfig
from parallel.config import check_tp_divisibility

__all__ = [
    "TP_PLANS",
    "ReplicateParallel",
    "apply_tensor_parallel",
    "bart_plan",
    "bert_plan",
    "electra_plan",
    "glm_plan",
    "gpt_plan",
    "loss_parallel_context",
    "reduce_pending_grads",
    "t5_plan",
    "tp_plan",
]

Plan = dict[str, ParallelStyle]
_REPLICATE = Replicate()


class ReplicateParallel(ParallelStyle):
    """Run a module whole on every TP rank, with its parameters as replicated DTensors.

    The input (a plain tensor laid out as `input_layouts`) is gathered to the whole tensor
    first; the output is returned as a plain tensor laid out as `output_layouts`
    (a `Shard` there is a local slice, no communication). Used for modules too small to
    split: norms without sequence parallelism, position and token-type tables, BERT's
    heads, and the norm where the sequence is gathered back (T5's encoder memory).
    Parameters are broadcast from the first rank, so replicas start identical even if
    ranks initialised them differently.
    """

    def __init__(
        self, *, input_layouts: Placement = _REPLICATE, output_layouts: Placement = _REPLICATE
    ):
        super().__init__()
        self.input_layouts = input_layouts
        self.output_layouts = output_layouts

    def _replicate(self, name: str, module: nn.Module, mesh: DeviceMesh) -> None:
        for p_name, param in list(module.named_parameters(recurse=False)):
            full = distribute_tensor(param, mesh, [Replicate()], src_data_rank=self.src_data_rank)
            module.register_parameter(p_name, nn.Parameter(full, requires_grad=param.requires_grad))

    def _prepare_input(self, module: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
        x = inputs[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, (self.input_layouts,), run_check=False)
        if x.placements != (Replicate(),):
            x = x.redistribute(placements=(Replicate(),))
        return (x, *inputs[1:])

    def _prepare_output(self, module: nn.Module, output: DTensor, mesh: DeviceMesh):
        if output.placements != (self.output_layouts,):
            output = output.redistribute(placements=(self.output_layouts,))
        return output.to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return distribute_module(
            module, device_mesh, self._replicate, self._prepare_input, self._prepare_output
        )

    def __repr__(self) -> str:
        return (
            f"ReplicateParallel(input_layouts={self.input_layouts}, "
            f"output_layouts={self.output_layouts})"
        )


# ---------------------------------------------------------------------------------------
# Building blocks of the plans.


def _residual(sp: bool) -> Placement:
    """Layout of the activations between modules (see the module docstring)."""
    return Shard(1) if sp else Replicate()


def _norm(sp: bool) -> ParallelStyle:
    return SequenceParallel(use_local_output=True) if sp else ReplicateParallel()


def _gather_input(sp: bool, **kwarg_layouts: Placement) -> PrepareModuleInput:
    """Whole-sequence input for a column-parallel sub-layer, kept a DTensor so the q/k/v (or
    fc_in/fc_gate) gradients add up before one reduction (a reduce-scatter under sp)."""
    return PrepareModuleInput(
        input_layouts=(_residual(sp),),
        desired_input_layouts=(Replicate(),),
        input_kwarg_layouts=kwarg_layouts or None,
        desired_input_kwarg_layouts={k: Replicate() for k in kwarg_layouts} or None,
    )


def _logits(sp: bool) -> ColwiseParallel:
    """Output projection sharded over the vocabulary; logits stay a Shard(-1) DTensor."""
    return ColwiseParallel(
        input_layouts=_residual(sp), output_layouts=Shard(-1), use_local_output=False
    )


def _prefixed(prefix: str, plan: Plan) -> Plan:
    return {f"{prefix}{path}": style for path, style in plan.items()}


def _transformer_block(sp: bool, *, gated: bool) -> Plan:
    """models.blocks.TransformerBlock (GPT, BERT, GLM), pre-LN or post-LN alike."""
    plan = {
        "ln1": _norm(sp),
        "attn": _gather_input(sp),
        "attn.qkv": ColwiseParallel(),  # (H, 3, K) layout: a column shard holds whole heads
        "attn.out": RowwiseParallel(output_layouts=_residual(sp)),
        "ln2": _norm(sp),
        "mlp": _gather_input(sp),
        "mlp.fc_in": ColwiseParallel(),
        "mlp.fc_out": RowwiseParallel(output_layouts=_residual(sp)),
    }
    if gated:
        plan["mlp.fc_gate"] = ColwiseParallel()
    return plan


def _t5_attention(name: str, sp: bool, *, cross: bool) -> Plan:
    # Cross-attention reads the encoder memory whole (kv_BLD), replicated on every rank.
    prepare = _gather_input(sp, kv_BLD=Replicate()) if cross else _gather_input(sp)
    return {
        name: prepare,
        f"{name}.q": ColwiseParallel(),
        f"{name}.k": ColwiseParallel(),
        f"{name}.v": ColwiseParallel(),
        f"{name}.o": RowwiseParallel(output_layouts=_residual(sp)),
    }


def _t5_block(sp: bool, *, gated: bool, cross: bool) -> Plan:
    plan = {"ln_attn": _norm(sp), **_t5_attention("attn", sp, cross=False)}
    if cross:
        plan |= {"ln_cross": _norm(sp), **_t5_attention("cross_attn", sp, cross=True)}
    plan |= {
        "ln_mlp": _norm(sp),
        "mlp": _gather_input(sp),
        "mlp.wo": RowwiseParallel(output_layouts=_residual(sp)),
    }
    for name in ("wi_0", "wi_1") if gated else ("wi",):
        plan[f"mlp.{name}"] = ColwiseParallel()
    return plan


def _slice_sequence() -> PrepareModuleInput:
    """Entry of the blocks when the embeddings are whole: each rank keeps its slice."""
    return PrepareModuleInput(
        input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True
    )


def _gather_sequence() -> PrepareModuleOutput:
    """Exit of the blocks where the next reader needs the whole sequence."""
    return PrepareModuleOutput(output_layouts=Shard(1), desired_output_layouts=Replicate())


def _slice_and_gather() -> PrepareModuleInputOutput:
    return PrepareModuleInputOutput(
        input_layouts=(Replicate(),),
        desired_input_layouts=(Shard(1),),
        use_local_input=True,
        output_layouts=(Shard(1),),
        desired_output_layouts=(Replicate(),),
    )


# ---------------------------------------------------------------------------------------
# One plan per family: cfg and sequence_parallel -> {module path pattern: style}.


def gpt_plan(cfg: ModelConfig, sp: bool) -> Plan:
    """models.gpt.GPT. Learned positions are looked up whole and sliced to the local tokens
    (`Shard(-2)`: the table output is (T, D) or (B, T, D)); rotary tables need no plan."""
    plan: Plan = {"wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=_residual(sp))}
    if cfg.position == "learned":
        plan["wpe"] = ReplicateParallel(output_layouts=Shard(-2) if sp else Replicate())
    gated = cfg.activation == "gated_gelu"
    plan |= _prefixed("blocks.*.", _transformer_block(sp, gated=gated))
    plan |= {"ln_f": _norm(sp), "lm_head": _logits(sp)}
    return plan


def glm_plan(cfg: ModelConfig, sp: bool) -> Plan:
    """models.glm.GLM: GPT's plan with the second (block position) table of its 2D positions."""
    positions = ReplicateParallel(output_layouts=Shard(-2) if sp else Replicate())
    plan: Plan = {
        "wte": RowwiseParallel(input_layouts=Replicate(), output_layouts=_residual(sp)),
        "wpe": positions,
        "wbpe": positions,
        **_prefixed("blocks.*.", _transformer_block(sp, gated=False)),
    }
    if cfg.pre_ln:  # post-LN GLM has an Identity there
        plan["ln_f"] = _norm(sp)
    plan["lm_head"] = _logits(sp)
    return plan


def _bert_embeddings(cfg: ModelConfig, *, tables: bool = True) -> Plan:
    """BERT's tables (vocab-parallel words, whole positions and types) and the E -> D
    projection where E != D; `tables=False`: the projection only (ELECTRA's generator)."""
    plan: Plan = {}
    if tables:
        plan["wte"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    for name, present in (
        ("wpe", tables and cfg.position == "learned"),
        ("tte", tables and cfg.type_vocab_size > 0),
        ("emb_ln", tables),
        ("emb_proj", cfg.embedding_size not in (None, cfg.d_model)),
    ):
        if present:
            plan[name] = ReplicateParallel()
    return plan


def _bert_encoder(cfg: ModelConfig, sp: bool) -> Plan:
    """BERT's blocks, the slicing and gathering of the sequence around them under sp, and
    the final norm of a pre-LN stack."""
    gated = cfg.activation == "gated_gelu"
    plan = _prefixed("blocks.*.", _transformer_block(sp, gated=gated))
    # Under sp the encoder output is gathered by the last block (post-LN) or by ln_f; a
    # shared ALBERT block runs n_layer times, so it slices and gathers on every pass.
    last = 0 if cfg.share_layers else cfg.n_layer - 1
    gathered_by_blocks = cfg.share_layers or not cfg.pre_ln
    if sp:
        if last == 0 and gathered_by_blocks:
            plan["blocks.0"] = _slice_and_gather()
        else:
            plan["blocks.0"] = _slice_sequence()
            if gathered_by_blocks:
                plan[f"blocks.{last}"] = _gather_sequence()
    if cfg.pre_ln:
        gather = sp and not gathered_by_blocks
        plan["ln_f"] = ReplicateParallel(input_layouts=Shard(1) if gather else Replicate())
    return plan


def bert_plan(cfg: ModelConfig, sp: bool) -> Plan:
    """models.bert.Bert (and ALBERT). The embeddings stay whole (the rotary tables are built
    from their length) and the heads run whole (the pooler reads the [CLS] token, which
    lives on one rank under sp); only the blocks see a slice of the sequence."""
    plan = _bert_embeddings(cfg) | _bert_encoder(cfg, sp)
    heads = ("mlm_dense", "mlm_ln") + (("pooler", "nsp_head") if cfg.has_pair_head else ())
    if cfg.sbo_max_targets:  # SpanBERT's span boundary head, before the shared lm_head
        heads += tuple(f"sbo.{name}" for name in ("position", "dense1", "ln1", "dense2", "ln2"))
    for name in heads:
        plan[name] = ReplicateParallel()
    plan["lm_head"] = _logits(False)
    return plan


def electra_plan(cfg: ModelConfig, sp: bool) -> Plan:
    """models.electra.Electra: BERT's plan for each network (the discriminator holds the
    shared tables). The generator's decoder is column-parallel like BERT's, but its logits
    are gathered whole (`Replicate`): the generator samples from the whole distribution of
    each masked position. Only the masked positions reach the head, so the gathered logits
    are about 15% of a (B, T, V) tensor. The RTD head runs whole."""
    gen = cfg.generator_config()
    plan = _prefixed("discriminator.", _bert_embeddings(cfg) | _bert_encoder(cfg, sp))
    generator = _bert_embeddings(gen, tables=False) | _bert_encoder(gen, sp)
    generator |= {"mlm_dense": ReplicateParallel(), "mlm_ln": ReplicateParallel()}
    generator["lm_head"] = ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    plan |= _prefixed("generator.", generator)
    plan |= {"rtd_dense": ReplicateParallel(), "rtd_head": ReplicateParallel()}
    return plan


def t5_plan(cfg: ModelConfig, sp: bool) -> Plan:
    """models.t5.T5. The relative bias tables (buckets x heads) are split by head like the
    attention, so each rank adds the bias of its own heads. The stacks take whole embedded
    sequences (they size the bias and masks from them); the first block of each slices,
    and under sp the encoder's final norm gathers the memory that every decoder layer
    reads whole."""
    gated = cfg.activation == "gated_gelu"
    plan: Plan = {"shared": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())}
    for stack, cross in (("encoder", False), ("decoder", True)):
        plan[f"{stack}.relative_bias.table"] = ColwiseParallel(output_layouts=Shard(-1))
        if sp:
            plan[f"{stack}.blocks.0"] = _slice_sequence()
        plan |= _prefixed(f"{stack}.blocks.*.", _t5_block(sp, gated=gated, cross=cross))
    plan["encoder.ln_f"] = ReplicateParallel(input_layouts=_residual(sp))
    plan["decoder.ln_f"] = _norm(sp)
    plan["lm_head"] = _logits(sp)
    return plan


def bart_plan(cfg: ModelConfig, sp: bool) -> Plan:
    """models.bart.Bart: T5's attention plan with a GPT-style MLP in post-LN blocks. Each
    stack's position table and embedding norm run whole (the stack sizes its masks from the
    whole sequence) and its first block slices; under sp the encoder's last block gathers
    the memory that every decoder layer reads whole."""
    plan: Plan = {"shared": RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())}
    mlp = {
        "mlp": _gather_input(sp),
        "mlp.fc_in": ColwiseParallel(),
        "mlp.fc_out": RowwiseParallel(output_layouts=_residual(sp)),
    }
    stacks = (
        ("encoder", cfg.n_layer, False),
        ("decoder", cfg.n_decoder_layer or cfg.n_layer, True),
    )
    for stack, n_layer, cross in stacks:
        plan |= {f"{stack}.wpe": ReplicateParallel(), f"{stack}.emb_ln": ReplicateParallel()}
        block = {"ln_attn": _norm(sp), **_t5_attention("attn", sp, cross=False)}
        if cross:
            block |= {"ln_cross": _norm(sp), **_t5_attention("cross_attn", sp, cross=True)}
        block |= mlp | {"ln_mlp": _norm(sp)}
        plan |= _prefixed(f"{stack}.blocks.*.", block)
        if sp:
            gather = not cross  # the encoder's output is read whole; the decoder's stays sliced
            if n_layer == 1 and gather:
                plan[f"{stack}.blocks.0"] = _slice_and_gather()
            else:
                plan[f"{stack}.blocks.0"] = _slice_sequence()
                if gather:
                    plan[f"{stack}.blocks.{n_layer - 1}"] = _gather_sequence()
    plan["lm_head"] = _logits(sp)
    return plan


TP_PLANS: dict[str, Callable[[ModelConfig, bool], Plan]] = {
    "gpt": gpt_plan,
    "bert": bert_plan,
    "t5": t5_plan,
    "glm": glm_plan,
    "electra": electra_plan,
    "bart": bart_plan,
}


def tp_plan(cfg: ModelConfig, *, sequence_parallel: bool) -> Plan:
    """The plan of `cfg.family`; ValueError for a family without one."""
    if cfg.family not in TP_PLANS:
        raise ValueError(
            f"model.family={cfg.family!r} has no tensor-parallel plan; "
            f"choose one of {sorted(TP_PLANS)}"
        )
    return TP_PLANS[cfg.family](cfg, sequence_parallel)


# ---------------------------------------------------------------------------------------
# Applying a plan.


def _vocab_rows(model: nn.Module) -> int:
    rows = getattr(model, "vocab_size", None)
    if not isinstance(rows, int):
        raise ValueError(f"{type(model).__name__} has no integer `vocab_size` attribute")
    return rows


def _check_sequence_lengths(tp: int) -> Callable:
    """Forward pre-hook: sequence-sharded activations need lengths that split evenly (a
    plain local shard does not record an uneven global length)."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        named = [("input_ids", a) for a in args[:1]] + list(kwargs.items())
        for name, value in named:
            tensor = isinstance(value, torch.Tensor) and name.endswith("input_ids")
            if tensor and value.dim() > 1 and value.shape[1] % tp:
                raise ValueError(
                    f"sequence parallelism (parallel.sp=true) needs sequence lengths "
                    f"divisible by parallel.tp={tp}; {name} has length {value.shape[1]}"
                )

    return hook


def _plain_parameters(model: nn.Module) -> Iterator[str]:
    return (name for name, p in model.named_parameters() if not isinstance(p, DTensor))


def apply_tensor_parallel(
    model: nn.Module, cfg: ModelConfig, *, tp_mesh: DeviceMesh, sequence_parallel: bool
) -> nn.Module:
    """Shard `model` in place over the 1-D `tp_mesh` with its family's plan; returns it.

    Checks divisibility first (ValueError naming the field), re-ties the output projection
    to the vocab-parallel embedding, and refuses a plan that leaves any parameter a plain
    tensor. Call before activation checkpointing and FSDP/DDP (torchtitan's order).
    Forward and backward must then run inside `loss_parallel_context(True)`.
    """
    tp = tp_mesh.size()
    if tp == 1:
        return model
    check_tp_divisibility(cfg, vocab_rows=_vocab_rows(model), tp=tp)
    plan = tp_plan(cfg, sequence_parallel=sequence_parallel)
    # Training-only maps (a distillation student's projections) run whole on every rank.
    extra = getattr(model, "distill_proj", None)
    if extra is not None:
        plan |= {f"distill_proj.{name}": ReplicateParallel() for name in extra}
    parallelize_module(model, tp_mesh, plan)
    # Each module's parameters were replaced by DTensors one module at a time, which
    # splits a tied pair; both halves are Shard(0) over the vocabulary, so re-tie them.
    if cfg.tie_embeddings:
        model.tie_weights()
    plain = list(_plain_parameters(model))
    if plain:
        raise RuntimeError(
            f"the {cfg.family} tensor-parallel plan leaves plain parameters: {plain}"
        )
    if sequence_parallel:
        model.register_forward_pre_hook(_check_sequence_lengths(tp), with_kwargs=True)
    return model


def reduce_pending_grads(params: list[nn.Parameter]) -> None:
    """Lay out each DTensor gradient as its parameter is, once per step, before anything
    reads it. A norm's weight and bias under sequence parallelism see only this rank's
    tokens, so their gradients come out of backward as pending sums (`Partial`); left so,
    DTensor all-reduces them again at every read (the clip's norm and scale, each of the
    optimizer's reads), as Megatron-LM avoids by reducing them once. The pending sums of
    a 1-D mesh go in one all-reduce per dtype; any other layout change is redistributed."""
    pending: dict[tuple, list[nn.Parameter]] = defaultdict(list)
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and g.placements != p.placements:
            pending[(g.device_mesh, g.placements, p.placements, g.dtype)].append(p)
    summed = (Partial("sum"),)
    for (mesh, have, want, _), group in pending.items():
        if mesh.ndim == 1 and have == summed and want == (Replicate(),):
            grads = [p.grad.to_local() for p in group]
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=mesh.get_group())
            for p, g in zip(group, _unflatten_dense_tensors(flat, grads), strict=True):
                p.grad = DTensor.from_local(g, mesh, want, run_check=False)
        else:
            for p in group:
                p.grad = p.grad.redistribute(mesh, want)


# ---------------------------------------------------------------------------------------
# Loss on vocabulary-sharded logits.


def loss_parallel_context(enabled: bool) -> contextlib.AbstractContextManager:
    """Cross-entropy straight from Shard(-1) logits (each rank reduces its vocabulary slice,
    then one all-reduce of per-token max and sum); both forward and backward of the loss
    must run inside. A no-op context when `enabled` is False."""
    return loss_parallel() if enabled else contextlib.nullcontext()
