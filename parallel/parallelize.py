"""Turn a plain single-device model into its distributed form, from config alone.

Order (torchtitan's): tensor parallel, activation checkpointing, compile, then data
parallel outermost. Data parallelism by ZeRO stage:
  0  DDP: replicated parameters, gradients all-reduced.
  1  DDP + ZeroRedundancyOptimizer: each rank keeps the optimizer states of whole
     parameters (so LAMB's per-tensor trust ratio needs no communication).
  2  FSDP2, reshard_after_forward=False: gradients and optimizer states sharded.
  3  FSDP2, reshard_after_forward=True: parameters sharded too.
Under FSDP2 parameters are DTensors; LAMB's norms of DTensors reduce over the shards,
so its trust ratio uses the norm of the full tensor.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from models.config import ModelConfig
from parallel.activation import apply_activation_checkpointing
from parallel.config import ParallelConfig
from parallel.deepspeed_engine import DeepSpeedEngine
from parallel.dist import World
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
    group = world.mesh["dp"].get_group()
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    # DDP broadcasts rank 0's weights at construction, so all replicas start equal.
    return DistributedDataParallel(model, device_ids=device_ids, process_group=group)


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


def shard_optimizer(
    optimizer: torch.optim.Optimizer, cfg: ParallelConfig, *, world: World
) -> torch.optim.Optimizer:
    """ZeRO-1: re-create `optimizer` as a ZeroRedundancyOptimizer over the DP ranks."""
    if cfg.zero != 1 or world.dp_size == 1:
        return optimizer
    groups = [dict(g) for g in optimizer.param_groups if g["params"]]
    zero = ZeroRedundancyOptimizer(
        groups,
        optimizer_class=type(optimizer),
        process_group=world.mesh["dp"].get_group(),
        **optimizer.defaults,
    )
    # Lamb's norm hook is an attribute, not a group key (it must not reach the state).
    # Each rank owns whole tensors, so its local norms are already the full ones.
    if hasattr(optimizer, "norm_fn"):
        zero.optim.norm_fn = optimizer.norm_fn
    return zero


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
