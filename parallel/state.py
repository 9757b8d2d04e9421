"""Layout-independent model and optimizer state: full tensors keyed by parameter name.

Whatever wraps the model (nothing, DDP, FSDP2) and whatever shards the optimizer
(nothing, ZeroRedundancyOptimizer, FSDP2's DTensor states), the saved state is the same
plain dict, so a checkpoint written under one layout loads under any other.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.optim import ZeroRedundancyOptimizer

from parallel.dist import World
from parallel.parallelize import unwrap

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(model: nn.Module) -> dict:
    """Full state dict of the plain model (rank 0 holds it; other ranks may get {})."""
    return get_model_state_dict(model, options=_FULL)


def load_model_state(model: nn.Module, state: dict) -> None:
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def _names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's own order (the order of its integer ids)."""
    by_id = {id(p): name for name, p in unwrap(model).named_parameters()}
    return [by_id[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict:
    """Full optimizer state keyed by parameter name (collective: call on every rank)."""
    if not isinstance(optimizer, ZeroRedundancyOptimizer):
        return get_optimizer_state_dict(model, optimizer, options=_FULL)
    optimizer.consolidate_state_dict(to=0)
    if world.rank != 0:
        return {}
    full = optimizer.state_dict()
    names = _names(model, optimizer)
    return {
        "state": {names[i]: s for i, s in full["state"].items()},
        "param_groups": [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [names[i] for i in g["params"]],
            }
            for g in full["param_groups"]
        ],
    }


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a state written by `optimizer_state` under any layout (every rank passes it)."""
    if not isinstance(optimizer, ZeroRedundancyOptimizer):
        set_optimizer_state_dict(
            model, optimizer, state, options=StateDictOptions(full_state_dict=True)
        )
        return
    index = {name: i for i, name in enumerate(_names(model, optimizer))}
    optimizer.load_state_dict(
        {
            "state": {index[n]: s for n, s in state["state"].items()},
            "param_groups": [
                {
                    **{k: v for k, v in g.items() if k != "params"},
                    "params": [index[n] for n in g["params"]],
                }
                for g in state["param_groups"]
            ],
        }
    )
    if dist.is_initialized():
        dist.barrier()
