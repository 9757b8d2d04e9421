"""Activation checkpointing of the Transformer blocks.

full       keep only each block's input; recompute the whole block in backward.
selective  keep the outputs of matmuls and attention kernels, recompute the cheap
           elementwise work (norms, activations, dropout, residual adds) in backward:
           most of the memory saving at a small fraction of the recompute cost
           (Korthikanti et al. 2022 recompute only the attention core; with fused SDPA the
           attention scores are never stored, so the remaining target is elementwise work).

The block's `forward` is replaced in place rather than wrapping the module, so parameter
names (and so checkpoints) are the same with and without checkpointing. Dropout masks
are reproduced exactly: recomputation restores the RNG state of the first pass.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

MODES = ("none", "full", "selective")

# Every matmul's output (the batched ones of MoE experts too) and attention's; an op this
# torch build lacks (grouped_mm before 2.8) is left out.
_SAVED_OPS = {
    getattr(torch.ops.aten, name).default
    for name in (
        "mm",
        "addmm",
        "bmm",
        "baddbmm",
        "_grouped_mm",
        "linear",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_cudnn_attention",
    )
    if hasattr(torch.ops.aten, name)
}


def _seeded(op) -> bool:
    """The op draws random numbers (dropout, router jitter, the CPU attention kernel)."""
    return torch.Tag.nondeterministic_seeded in getattr(op, "tags", ())


def _saving(save) -> functools.partial:
    """Selective checkpointing that keeps the outputs of the ops `save` picks and
    recomputes the rest."""

    def policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if save(op) else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def _tracing() -> bool:
    """torch is tracing the region into a compiled graph: Dynamo, or AOTAutograd's trace
    (which runs under a proxy dispatch mode, and which torch before 2.13 does not count
    as compiling)."""
    proxy = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.PROXY)
    return torch.compiler.is_compiling() or proxy is not None


def _when_compiled(compiled, eager):
    """A context factory that gives `compiled`'s contexts where torch traces the region
    into a compiled graph and `eager`'s (None: plain recomputation) where it runs it."""

    def contexts():
        if _tracing():
            return compiled()
        return eager() if eager is not None else noop_context_fn()

    return contexts


_SELECTIVE = _saving(_SAVED_OPS.__contains__)

# The checkpoint contexts per mode: any device, and the CPU's. A compiled block recomputing
# a random op on the CPU saves the generator's state as an extra forward output; torch 2.13
# puts it after a saved device mesh (any DTensor parameter's: tensor or expert parallelism)
# and then takes the mesh for a tensor. On CUDA that state is a graph input instead; on
# the CPU a compiled region keeps random ops' outputs instead (a region torch cannot
# compile, and so runs eagerly, recomputes as usual).
_CONTEXTS = {
    "full": (None, _when_compiled(_saving(_seeded), None)),
    "selective": (
        _SELECTIVE,
        _when_compiled(_saving(lambda op: op in _SAVED_OPS or _seeded(op)), _SELECTIVE),
    ),
}


def apply_activation_checkpointing(blocks: list[nn.Module], mode: str) -> None:
    """Make each block recompute its activations in backward according to `mode`."""
    if mode not in MODES:
        raise ValueError(f"parallel.activation_checkpointing={mode!r}; choose one of {MODES}")
    if mode == "none":
        return
    for block in blocks:
        block.forward = _checkpointed(block.forward, *_CONTEXTS[mode])


def _checkpointed(forward, context_fn, cpu_context_fn):
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to save
            return forward(*args, **kwargs)
        fn = cpu_context_fn if args[0].device.type == "cpu" else context_fn
        extra = {"context_fn": fn} if fn is not None else {}
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    return run
