"""Layout-independent model and optimizer state, keyed by parameter name.

Whatever wraps the model (nothing, DDP, FSDP2) and whatever shards the optimizer
(nothing, ZeroRedundancyOptimizer, FSDP2's DTensor states), the state has one structure:
{"model": {fqn: tensor}, "optim": {"state": {fqn: {...}}, "param_groups": [...]}}.
`save_sharded` writes it with torch.distributed.checkpoint, each rank its own shards;
`load_sharded` reads it back under any other layout (DCP reshards by name). The full
(single-file) form of the same structure is what `model_state` / `optimizer_state`
return, for small runs and for conversion.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
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


def save_sharded(
    model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path, world: World
) -> None:
    """Every rank writes its shards of model and optimizer state into `directory` (DCP)."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optim = optimizer_state(model, optimizer, world)  # whole tensors, gathered on rank 0
    else:
        optim = _merge_group_names(get_optimizer_state_dict(model, optimizer))
    dcp.save({"model": get_model_state_dict(model), "optim": optim}, checkpoint_id=str(directory))


def _merge_group_names(optim: dict) -> dict:
    """Param groups list the names of every rank's parameters.

    DCP stores a non-tensor value such as `param_groups` once, as if replicated; pipeline
    stages each hold different parameters, so their lists are merged first.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return optim
    lists = [None] * dist.get_world_size()
    dist.all_gather_object(lists, [g["params"] for g in optim["param_groups"]])
    for i, group in enumerate(optim["param_groups"]):
        names = [n for rank_lists in lists for n in rank_lists[i]]
        group["params"] = list(dict.fromkeys(names))
    return optim


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Load a DCP checkpoint written under any layout into this one."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        full = read_full(directory)
        load_model_state(model, full["model"])
        load_optimizer_state(model, optimizer, full["optim"])
        return
    # The templates say which shard of each tensor this rank needs; DCP fills them in.
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    names = [list(g["params"]) for g in state["optim"]["param_groups"]]  # load is in place
    dcp.load(state, checkpoint_id=str(directory))
    # Hyperparameters come from the checkpoint, parameter names from this layout (a tied
    # weight saved by two pipeline stages under two names is one parameter here).
    for group, own in zip(state["optim"]["param_groups"], names, strict=True):
        group["params"] = own
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])


def read_full(directory: Path) -> dict:
    """The whole state of a DCP checkpoint on this process (conversion, ZeRO-1 loading)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    return _load_state_dict_from_keys(checkpoint_id=str(directory))


def write_sharded_from_full(state: dict, directory: Path) -> None:
    """Write a full {"model", "optim"} state as a DCP checkpoint (single process)."""
    dcp.save(state, checkpoint_id=str(directory), no_dist=True)
