"""Turn a plain single-device model into its distributed form, from config alone.

Order (torchtitan's): tensor parallel, activation checkpointing, pipeline split, then
data parallel outermost. Data parallelism by ZeRO stage:
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

import contextlib

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from models.config import ModelConfig
from parallel.activation import apply_activation_checkpointing
from parallel.config import ParallelConfig
from parallel.data_parallel import ReplicaSync
from parallel.deepspeed_engine import DeepSpeedEngine
from parallel.dist import World
from parallel.pipeline import ContextFactory, PipelineRunner, build_pipeline
from parallel.tensor_parallel import apply_tensor_parallel

_LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The Transformer blocks: members of any ModuleList/ModuleDict of one repeated class.

    They are the units FSDP gathers one at a time (and that activation checkpointing
    wraps), whatever the family calls its stacks.
    """
    blocks = []
    for module in model.modules():
        if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            members = list(module.values() if isinstance(module, nn.ModuleDict) else module)
            if members and len({type(m) for m in members}) == 1:
                blocks.extend(members)
    return blocks


def parallelize(
    model: nn.Module,
    cfg: ParallelConfig,
    *,
    world: World,
    model_cfg: ModelConfig,
    precision: str = "fp32",
) -> nn.Module:
    """Wrap `model` for the configured layout; returns it unchanged on one process."""
    model = model.to(world.device)
    if cfg.tp > 1:
        model = apply_tensor_parallel(
            model, model_cfg, tp_mesh=world.mesh["tp"], sequence_parallel=cfg.sp
        )
    apply_activation_checkpointing(repeated_blocks(model), cfg.activation_checkpointing)
    if world.dp_size == 1:
        return model
    if cfg.zero >= 2:
        return _fully_shard(model, world, reshard=cfg.zero == 3, precision=precision)
    if not uses_ddp(cfg, world):
        return model  # ReplicaSync averages the gradients
    group = world.mesh["dp"].get_group()
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    # DDP broadcasts rank 0's weights at construction, so all replicas start equal.
    return DistributedDataParallel(model, device_ids=device_ids, process_group=group)


def parallelize_pipeline(
    model: nn.Module,
    cfg: ParallelConfig,
    *,
    world: World,
    model_cfg: ModelConfig,
    precision: str,
    n_microbatches: int,
    forward_context: ContextFactory | None = None,
) -> PipelineRunner:
    """TP, activation checkpointing, then this rank's pipeline stages, each sharded by FSDP2
    at ZeRO-2/3. `model` is pruned in place to the stages (its parameter names unchanged)."""
    model = model.to(world.device)
    if cfg.tp > 1:
        model = apply_tensor_parallel(
            model, model_cfg, tp_mesh=world.mesh["tp"], sequence_parallel=cfg.sp
        )
    apply_activation_checkpointing(repeated_blocks(model), cfg.activation_checkpointing)
    runner = build_pipeline(
        model,
        model_cfg,
        pp_mesh=world.mesh["pp"],
        device=world.device,
        schedule=cfg.pp_schedule,
        n_microbatches=n_microbatches,
        virtual_stages=cfg.virtual_stages,
        forward_context=forward_context,
        tensor_parallel=cfg.tp > 1,
    )
    if world.dp_size > 1 and cfg.zero >= 2:
        for stage in runner.modules:
            _fully_shard(stage, world, reshard=cfg.zero == 3, precision=precision)
    return runner


def uses_ddp(cfg: ParallelConfig, world: World) -> bool:
    """Whether `parallelize` wraps the model in DDP (ZeRO-0/1 data parallelism alone)."""
    return world.dp_size > 1 and cfg.zero < 2 and cfg.tp == 1 and cfg.pp == 1


def replica_sync(
    params: list[nn.Parameter], cfg: ParallelConfig, *, world: World
) -> ReplicaSync | None:
    """What keeps ZeRO-0/1 replicas equal besides DDP: gradient averaging beside TP or PP,
    and ZeRO-1's owned optimizer states. None when FSDP2, DDP alone or one replica does."""
    if world.dp_size == 1 or cfg.zero >= 2 or (cfg.zero == 0 and uses_ddp(cfg, world)):
        return None
    return ReplicaSync(
        params,
        group=world.mesh["dp"].get_group(),
        reduce=not uses_ddp(cfg, world),
        zero1=cfg.zero == 1,
    )


def _fully_shard(model: nn.Module, world: World, *, reshard: bool, precision: str) -> nn.Module:
    low = _LOW_PRECISION.get(precision)
    # Compute in the low dtype, but reduce gradients in fp32 so the sum over ranks keeps
    # the precision of a single-process fp32 accumulation.
    policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32)
    mesh = world.mesh["dp_shard"]
    for block in repeated_blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=policy)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside any wrapper (for state dicts and parameter counts)."""
    if isinstance(model, DistributedDataParallel | DeepSpeedEngine):
        return model.module
    return model


def no_grad_sync(model: nn.Module, *, last_micro_batch: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient reduction on all but the last micro-batch of an accumulation."""
    if isinstance(model, DistributedDataParallel) and not last_micro_batch:
        return model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last_micro_batch)
    return contextlib.nullcontext()
