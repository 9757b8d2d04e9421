"""Turn a plain single-device model into its distributed form, from config alone."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from parallel.config import ParallelConfig
from parallel.dist import World


def parallelize(model: torch.nn.Module, cfg: ParallelConfig, *, world: World) -> torch.nn.Module:
    """Wrap `model` for the configured layout; returns it unchanged on one process.

    Order once the other axes land (torchtitan's): tensor parallel, activation
    checkpointing, compile, then data parallel / ZeRO outermost.
    """
    model = model.to(world.device)
    if world.dp_size == 1:
        return model
    group = world.mesh["dp_replicate"].get_group()
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    # DDP broadcasts rank 0's weights at construction, so all replicas start equal.
    return DistributedDataParallel(model, device_ids=device_ids, process_group=group)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside any wrapper (for state dicts and parameter counts)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def no_grad_sync(
    model: torch.nn.Module, *, last_micro_batch: bool
) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if isinstance(model, DistributedDataParallel) and not last_micro_batch:
        return model.no_sync()
    return contextlib.nullcontext()
