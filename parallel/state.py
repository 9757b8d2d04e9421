"""Layout-independent model and optimizer state, keyed by parameter name.

Whatever wraps the model (nothing, DDP, FSDP2, TP, pipeline stages) and whatever shards
the optimizer (nothing, ZeRO-1's owned tensors, FSDP2's DTensor states), the state has one
structure:
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
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DDP (FSDP2 and tensor parallelism wrap in place)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def at_rest(model: nn.Module) -> nn.Module:
    """`model` with every FSDP2 unit holding its sharded parameters, the ones its optimizer
    steps and its state is read from. ZeRO-2 keeps a unit gathered from forward until its
    backward; an evaluation's forward has no backward, and left gathered, the module's
    parameters would not be the optimizer's."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
    return model


def model_state(model: nn.Module) -> dict:
    """Full state dict of the plain model (rank 0 holds it; other ranks may get {})."""
    return get_model_state_dict(at_rest(model), options=_FULL)


def load_model_state(model: nn.Module, state: dict) -> None:
    """Load a full state dict; a pipeline rank's pruned model takes only its own entries
    (any it lacks still fails, naming them)."""
    own = unwrap(model).state_dict().keys()
    state = {k: v for k, v in state.items() if k in own}
    set_model_state_dict(at_rest(model), state, options=StateDictOptions(full_state_dict=True))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full optimizer state keyed by parameter name (collective: call on every rank)."""
    return get_optimizer_state_dict(at_rest(model), optimizer, options=_FULL)


def load_optimizer_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    *,
    aliases: dict[str, list[str]] | None = None,
) -> None:
    """Load a state written by `optimizer_state` under any layout (every rank passes it).

    Only the entries of this optimizer's own parameters are used: under ZeRO-1 or a
    pipeline a rank's optimizer holds a subset of the model. `aliases` gives the other
    names of tied parameters, whose state may be stored under one of them.
    """
    own = _own_names(at_rest(model), optimizer)
    saved = state["state"]
    found = {n: _stored_name(n, saved.keys(), aliases) for n in own}
    state = {
        "state": {n: saved[found[n]] for n in own if found[n] is not None},
        "param_groups": [
            {**g, "params": [n for n in g["params"] if n in own]} for g in state["param_groups"]
        ],
    }
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )


def _stored_name(name: str, stored, aliases: dict[str, list[str]] | None) -> str | None:
    """The name under which `name`'s state was saved: itself or a tied alias (None: not
    saved, e.g. a parameter that never had a gradient)."""
    for candidate in (name, *(aliases or {}).get(name, ())):
        if candidate in stored:
            return candidate
    return None


def _own_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> set[str]:
    by_id = {id(p): name for name, p in unwrap(model).named_parameters()}
    return {by_id[id(p)] for g in optimizer.param_groups for p in g["params"]}


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Every rank writes its shards of model and optimizer state into `directory` (DCP)."""
    optim = _merge_group_names(get_optimizer_state_dict(at_rest(model), optimizer))
    dcp.save({"model": get_model_state_dict(model), "optim": optim}, checkpoint_id=str(directory))


def _merge_group_names(optim: dict) -> dict:
    """Param groups list the names of every rank's parameters.

    DCP stores a non-tensor value such as `param_groups` once, as if replicated; pipeline
    stages and ZeRO-1 owners each hold different parameters, so their lists are merged.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return optim
    lists = [None] * dist.get_world_size()
    dist.all_gather_object(lists, [g["params"] for g in optim["param_groups"]])
    for i, group in enumerate(optim["param_groups"]):
        names = [n for rank_lists in lists for n in rank_lists[i]]
        group["params"] = list(dict.fromkeys(names))
    return optim


def load_sharded(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    directory: Path,
    *,
    aliases: dict[str, list[str]] | None = None,
) -> None:
    """Load a DCP checkpoint written under any layout into this one; `aliases` as for
    `load_optimizer_state`."""
    # The templates say which shard of each tensor this rank needs; DCP fills them in.
    at_rest(model)
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
    }
    names = [list(g["params"]) for g in state["optim"]["param_groups"]]  # load is in place
    renamed = _rename_to_stored(state["optim"]["state"], directory, aliases)
    # A parameter that never had a gradient (XLNet's segment terms in a causal run) was
    # saved without optimizer state; it keeps the fresh state the template gave it.
    stored = _stored_state_names(directory)
    stateless = [n for n in state["optim"]["state"] if n not in stored]
    for name in stateless:
        del state["optim"]["state"][name]
    dcp.load(state, checkpoint_id=str(directory))
    for own, stored in renamed.items():
        state["optim"]["state"][own] = state["optim"]["state"].pop(stored)
    # Hyperparameters come from the checkpoint, parameter names from this layout (a tied
    # weight saved by two pipeline stages under two names is one parameter here).
    for group, own in zip(state["optim"]["param_groups"], names, strict=True):
        group["params"] = own
    set_model_state_dict(model, state["model"])
    options = StateDictOptions(strict=False) if stateless else None
    set_optimizer_state_dict(model, optimizer, state["optim"], options=options)


def _stored_state_names(directory: Path) -> set[str]:
    """Names of the parameters whose optimizer state a DCP checkpoint holds."""
    keys = dcp.FileSystemReader(str(directory)).read_metadata().state_dict_metadata
    return {k.split(".", 2)[2].rsplit(".", 1)[0] for k in keys if k.startswith("optim.state.")}


def _rename_to_stored(
    optim_state: dict, directory: Path, aliases: dict[str, list[str]] | None
) -> dict[str, str]:
    """Key each template entry by the name its state was saved under (a tied alias when
    the writer held the parameter under another name); returns {own name: stored name}."""
    if not aliases:
        return {}
    stored = _stored_state_names(directory)
    renamed = {}
    for name in list(optim_state):
        found = _stored_name(name, stored, aliases)
        if found is not None and found != name:
            optim_state[found] = optim_state.pop(name)
            renamed[name] = found
    return renamed


def read_full(directory: Path) -> dict:
    """The whole state of a DCP checkpoint on this process (conversion, inspection)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    return _load_state_dict_from_keys(checkpoint_id=str(directory))


def write_sharded_from_full(state: dict, directory: Path) -> None:
    """Write a full {"model", "optim"} state as a DCP checkpoint (single process)."""
    dcp.save(state, checkpoint_id=str(directory), no_dist=True)
