"""Turn a plain single-device model into its engine for the configured layout, from config.

`build_engine` is the one entry point: it wraps the model and returns the `Engine`
(parallel/engine.py) the trainer drives. Order: tensor parallel, activation
checkpointing, then the pipeline split, then data parallel outermost (torchtitan applies
the pipeline split first and TP, checkpointing and FSDP per stage; here TP comes before
the split so that the tied embedding and head are re-tied once on the whole model, and a
stage is a view of it). Data parallelism by ZeRO stage:
  0  replicated parameters, gradients all-reduced: DDP for a plain model, `ReplicaSync`
     beside TP or PP (DDP takes neither DTensor parameters nor pipeline stages).
  1  as 0, and each rank keeps the optimizer states of whole parameters it owns
     (`ReplicaSync`; LAMB's per-tensor trust ratio needs no communication).
  2  FSDP2, reshard_after_forward=False: gradients and optimizer states sharded.
  3  FSDP2, reshard_after_forward=True: parameters sharded too.
Under FSDP2 parameters are DTensors; LAMB's norms of DTensors reduce over the shards,
so its trust ratio uses the norm of the full tensor. Under PP each stage module is
sharded on its own, as torchtitan does, and the schedule drives FSDP's gradient sync.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from models.config import ModelConfig
from models.moe import moe_layers
from parallel.activation import apply_activation_checkpointing
from parallel.config import ParallelConfig
from parallel.data_parallel import ReplicaSync
from parallel.dist import World
from parallel.engine import Engine, TrainingSpec
from parallel.expert_parallel import apply_expert_parallel, expert_parameters
from parallel.native_engine import NativeEngine
from parallel.pipeline import PipelineEngine, RankStages, split_for_rank
from parallel.state import unwrap
from parallel.tensor_parallel import apply_tensor_parallel

_LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The Transformer blocks: members of any ModuleList/ModuleDict of one repeated class
    that has submodules (a dict of single layers, such as a distillation student's
    projections, is not a stack of blocks).

    They are the units FSDP gathers one at a time (and that activation checkpointing
    wraps), whatever the family calls its stacks.
    """
    blocks = []
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            members = list(module.values() if isinstance(module, nn.ModuleDict) else module)
            composite = all(next(m.children(), None) is not None for m in members)
            if members and composite and len({type(m) for m in members}) == 1:
                blocks.extend(members)
    return blocks


def build_engine(
    model: nn.Module,
    cfg: ParallelConfig,
    *,
    world: World,
    model_cfg: ModelConfig,
    spec: TrainingSpec,
) -> Engine:
    """The engine of the configured layout around `model` (built on any device; moved here).

    parallel.engine=deepspeed gives the DeepSpeed engine, parallel.pp > 1 the pipeline
    engine, anything else the native one (one process, DDP, FSDP2, TP, ZeRO-1).
    """
    if cfg.engine == "deepspeed":
        from parallel.deepspeed_engine import build_deepspeed_engine

        return build_deepspeed_engine(model, cfg, world=world, spec=spec)
    if cfg.pp > 1:
        return _pipeline_engine(model, cfg, world=world, model_cfg=model_cfg, spec=spec)
    model = parallelize(model, cfg, world=world, model_cfg=model_cfg, precision=spec.precision)
    return NativeEngine(
        model,
        spec=spec,
        world=world,
        replicas=replica_sync(unwrap(model), cfg, world=world),
        tensor_parallel=cfg.tp > 1,
        sharded_norm=cfg.ep > 1,
    )


def _tensor_parallel_and_checkpointing(
    model: nn.Module, cfg: ParallelConfig, *, world: World, model_cfg: ModelConfig
) -> nn.Module:
    model = model.to(world.device)
    if cfg.tp > 1:
        model = apply_tensor_parallel(
            model, model_cfg, tp_mesh=world.mesh["tp"], sequence_parallel=cfg.sp
        )
    if cfg.ep > 1:
        apply_expert_parallel(model, world.mesh["ep"])
    blocks = repeated_blocks(model)
    apply_activation_checkpointing(blocks, cfg.activation_checkpointing)
    if cfg.compile:
        compile_blocks(blocks, split_backward=cfg.pp > 1 and cfg.pp_schedule == "zero_bubble")
    return model


def compile_blocks(blocks: list[nn.Module], *, split_backward: bool = False) -> None:
    """Regional compilation: each block's call, checkpointing included; with nn modules
    inlined (torch's default) the blocks of one class share their compiled graphs.
    `split_backward`: a schedule runs each backward in two passes (zero bubble: input
    gradients, then weight gradients), so the compiled backward must not reuse (donate) its
    saved buffers in the first.

    A checkpointed block's forward may record telemetry (MoE's) as a side effect, which its
    recomputation in backward must not repeat, as eager recomputation does not; torch is
    told so, and compiles the checkpointed block whole (older torch breaks the graph there).
    Each block is handed its inputs as they are compiled for (see `_block_input`)."""
    if hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    if split_backward:
        torch._functorch.config.donated_buffer = False
    for block in blocks:
        block.compile()
        block._compiled_call_impl = _with_block_inputs(block._compiled_call_impl)


def _with_block_inputs(compiled_call):
    def call(*args, **kwargs):
        args = tuple(_block_input(a) for a in args)
        kwargs = {k: _block_input(v) for k, v in kwargs.items()}
        return compiled_call(*args, **kwargs)

    return call


def _block_input(x):
    """A block's input as its graph is compiled for: a plain tensor (the pending result of a
    collective outside the block, such as a tensor-parallel embedding's all-reduce, is
    waited for: a stream dependency on the device, not a host sync) of static shape (one
    graph per shape, such as T5's encoder and decoder lengths, rather than one dynamic
    graph, whose backward torch 2.13 fails to compile around DTensor parameters)."""
    if isinstance(x, AsyncCollectiveTensor):
        x = torch.ops._c10d_functional.wait_tensor(x)
    if isinstance(x, torch.Tensor):
        torch._dynamo.mark_static(x)
    return x


def parallelize(
    model: nn.Module,
    cfg: ParallelConfig,
    *,
    world: World,
    model_cfg: ModelConfig,
    precision: str = "fp32",
) -> nn.Module:
    """Wrap `model` for the configured layout without pipelining; returns it unchanged on one
    process."""
    model = _tensor_parallel_and_checkpointing(model, cfg, world=world, model_cfg=model_cfg)
    if world.dp_size == 1:
        return model
    if cfg.zero >= 2:
        return _fully_shard(model, world, reshard=cfg.zero == 3, precision=precision)
    if not uses_ddp(cfg, world):
        return model  # ReplicaSync averages the gradients
    group = world.mesh["dp"].get_group()
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    # DDP broadcasts rank 0's weights at construction, so all replicas start equal.
    # A model whose objective may leave parameters without gradient says so (XLNet's causal
    # path never reads its query stream's mask embedding or its segment terms).
    unused = getattr(model, "may_leave_parameters_unused", False)
    return DistributedDataParallel(
        model, device_ids=device_ids, process_group=group, find_unused_parameters=unused
    )


def place_frozen(
    model: nn.Module,
    cfg: ParallelConfig,
    *,
    world: World,
    model_cfg: ModelConfig,
    precision: str = "fp32",
) -> nn.Module:
    """A model that only runs forward passes (a distillation teacher), frozen and in eval
    mode, placed as `parallelize` places a trained one's weights: on this rank's device,
    split by its family's tensor-parallel plan over parallel.tp (without sequence
    parallelism), and under parallel.zero=3 sharded block by block over the data-parallel
    ranks (FSDP2, every block all-gathered for its forward and resharded after). Pipeline
    stages are refused before this (trainer/config.py)."""
    model.requires_grad_(False)
    model = model.to(world.device).eval()
    if cfg.tp > 1:
        model = apply_tensor_parallel(
            model, model_cfg, tp_mesh=world.mesh["tp"], sequence_parallel=False
        )
    if cfg.zero == 3 and world.dp_size > 1:
        model = _fully_shard(model, world, reshard=True, precision=precision)
    return model


def _pipeline_engine(
    model: nn.Module,
    cfg: ParallelConfig,
    *,
    world: World,
    model_cfg: ModelConfig,
    spec: TrainingSpec,
) -> PipelineEngine:
    """TP, activation checkpointing, then this rank's pipeline stages, each sharded by FSDP2
    at ZeRO-2/3. `model` is pruned in place to the stages (its parameter names unchanged)."""
    model = _tensor_parallel_and_checkpointing(model, cfg, world=world, model_cfg=model_cfg)
    split = split_for_rank(
        model, model_cfg, pp_mesh=world.mesh["pp"], virtual_stages=cfg.virtual_stages
    )
    for stage in split.stages:
        stage.to(world.device)
        if world.dp_size > 1 and cfg.zero >= 2:
            _fully_shard(stage, world, reshard=cfg.zero == 3, precision=spec.precision)
    return PipelineEngine(
        model,
        split.stages,
        spec=spec,
        world=world,
        pp_mesh=world.mesh["pp"],
        schedule=cfg.pp_schedule,
        n_microbatches=cfg.pipeline_microbatches(
            global_batch_size=spec.global_batch_size,
            micro_batch_size=spec.micro_batch_size,
            dp_size=world.dp_size,
        ),
        tied=split.tied,
        aliases=split.aliases,
        replicas=replica_sync(model, cfg, world=world, held=_held_in_pipeline(split)),
        tensor_parallel=cfg.tp > 1,
    )


def _held_in_pipeline(split: RankStages) -> list[str]:
    """Parameters whose gradient is not final after one accumulation per microbatch: tied
    copies (their peer stage's gradient is added after the schedule) and parameters of two
    stages of this rank (each stage's backward accumulates them)."""
    stages_of: dict[int, set[int]] = defaultdict(set)
    name_of: dict[int, str] = {}
    for i, stage in enumerate(split.stages):
        for name, p in stage.named_parameters():
            stages_of[id(p)].add(i)
            name_of[id(p)] = name
    shared = [name_of[k] for k, stages in stages_of.items() if len(stages) > 1]
    return [name for name, _ in split.tied] + shared


def uses_ddp(cfg: ParallelConfig, world: World) -> bool:
    """Whether `parallelize` wraps the model in DDP (ZeRO-0/1 data parallelism alone; expert
    weights differ between the ranks of an ep group, which DDP cannot express)."""
    return world.dp_size > 1 and cfg.zero < 2 and cfg.tp == cfg.pp == cfg.ep == 1


def replica_sync(
    model: nn.Module, cfg: ParallelConfig, *, world: World, held: list[str] = ()
) -> ReplicaSync | None:
    """What keeps ZeRO-0/1 replicas equal besides DDP: gradient averaging beside TP, PP or
    EP, and ZeRO-1's owned optimizer states. None when FSDP2, DDP alone or one replica
    does. Under EP, expert weights are reduced over the ranks that hold the same experts.
    `held`: names of parameters whose gradients change after backward (a pipeline's tied
    copies), reduced only after it."""
    if world.dp_size == 1 or cfg.zero >= 2 or (cfg.zero == 0 and uses_ddp(cfg, world)):
        return None
    params = [p for p in model.parameters() if p.requires_grad]
    named = dict(model.named_parameters(remove_duplicate=False))
    experts = expert_parameters(model) if cfg.ep > 1 else []
    return ReplicaSync(
        params,
        group=world.mesh["dp"].get_group(),
        reduce=not uses_ddp(cfg, world),
        zero1=cfg.zero == 1,
        experts=experts,
        expert_group=world.mesh["edp"].get_group() if experts else None,
        held=[named[name] for name in held],
    )


def _fully_shard(model: nn.Module, world: World, *, reshard: bool, precision: str) -> nn.Module:
    low = _LOW_PRECISION.get(precision)
    # Compute in the low dtype, but reduce gradients in fp32 so the sum over ranks keeps
    # the precision of a single-process fp32 accumulation.
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    mesh = world.mesh["fsdp"]
    if world.mesh["ep"].size() > 1:
        # Experts first, as units of their own over the ranks that hold the same experts;
        # their gradients are averaged over the whole data-parallel degree like the rest.
        for _, layer in moe_layers(model):
            experts = fully_shard(
                layer.experts,
                mesh=world.mesh["edp"],
                reshard_after_forward=reshard,
                mp_policy=policy,
            )
            experts.set_gradient_divide_factor(float(world.dp_size))
    blocks = repeated_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    # Explicit prefetch, as torchtitan sets it: each block's all-gather starts while the
    # block before it computes (forward), the one after it (backward).
    for before, after in zip(blocks, blocks[1:], strict=False):
        before.set_modules_to_forward_prefetch([after])
        after.set_modules_to_backward_prefetch([before])
    return model
