"""The one interface the trainer sees of a parallel layout: `Engine`.

An engine is a model placed on this rank under one layout, with its optimizer. The trainer
calls, for every step, `forward_backward` on its share of the global batch and then
`step`; `evaluate` for held-out losses; `save` / `load` for checkpoints. Three
implementations exist: `NativeEngine` (one process, DDP, FSDP2, TP and ZeRO-1 on one
mesh; parallel/native_engine.py), `PipelineEngine` (the same under a pipeline schedule;
parallel/pipeline.py) and `DeepSpeedEngine` (parallel/deepspeed_engine.py); a new layout
is one new class, built in `parallel.parallelize.build_engine`.

What the engines need from the trainer is passed in as a `TrainingSpec`, never imported:
the optimizer factory, the loss function (summed cross-entropy per task, as torchtitan
hands its pipeline schedule a `loss_fn`), the loss scaler and the autocast context.

Loss normalisation stays the trainer's: each micro-batch's backward is
sum over tasks of weights[task] x summed loss of the task (times the fp16 loss scale),
where the trainer's weights already divide by the global target count (and undo DDP's
averaging), so no engine divides by the number of micro-batches.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor

Batch = dict[str, torch.Tensor]
MicroBatch = tuple[Batch, Batch]  # (model inputs, labels by task key)
LossFn = Callable[[Any, Batch], dict[str, torch.Tensor]]
"""(model outputs, labels) -> summed loss per label key (0-dim tensors)."""
ContextFactory = Callable[[], contextlib.AbstractContextManager]


class LossScaling(Protocol):
    """The loss scaler an engine drives (trainer.precision.LossScaler): a no-op for fp32 and
    bf16, dynamic scaling for fp16, its state and verdicts on the device."""

    skipped: torch.Tensor
    """Steps skipped so far (a device tensor)."""

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor: ...

    def unscale(self, params: list[nn.Parameter]) -> torch.Tensor | None: ...

    def update(self, found_inf: torch.Tensor | None) -> None: ...


@dataclass(frozen=True)
class TrainingSpec:
    """What an engine needs from the trainer, passed in so `parallel/` imports no trainer."""

    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    """Builds the optimizer over a plain module's parameters (called once, after wrapping)."""
    loss_fn: LossFn
    scaler: LossScaling
    forward_context: ContextFactory
    """Entered around every forward pass (autocast), not around the loss or backward."""
    precision: str
    """fp32 | bf16 | fp16: the compute dtype (FSDP2 and DeepSpeed need it)."""
    grad_clip: float
    """Clip the global gradient L2 norm to this at every step; 0 disables clipping."""
    global_batch_size: int
    micro_batch_size: int
    loss_targets: Callable[[Batch], dict] | None = None
    """Extra inputs of the loss computed from each micro-batch's model inputs (on the
    device) right before its loss, and merged into its labels: a distillation teacher's
    outputs (trainer/distill.py). None: the labels alone."""


def inputs_to(device: torch.device, inputs: Batch) -> dict:
    """The model inputs on `device`; values that are not tensors (a memory slot number)
    pass as they are."""
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
        for k, v in inputs.items()
    }


def sum_micro_losses(total: torch.Tensor | None, sums: dict[str, torch.Tensor], keys: list[str]):
    """Running float64 per-task sums over micro-batches, in `keys` order, on the device the
    losses are on (reading them on the host would wait for the GPU every micro-batch)."""
    step = torch.stack([sums[k].detach() for k in keys]).double()
    return step if total is None else total + step


def local_losses(loss_fn: LossFn) -> LossFn:
    """`loss_fn` for tensor-parallel outputs: each sum as a plain 0-dim tensor.

    Under `loss_parallel` the vocabulary-parallel cross-entropy returns a replicated DTensor
    (already reduced over the TP ranks); its local value is the full sum, and a plain tensor
    adds and stacks with the other tasks' (e.g. NSP's, from replicated logits). Gradients
    still flow through the DTensor graph, so backward must run inside the context as well.
    """

    def wrapped(outputs: Any, labels: Batch) -> dict[str, torch.Tensor]:
        sums = loss_fn(outputs, labels)
        return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in sums.items()}

    return wrapped


class Engine(ABC):
    """A model on this rank under one parallel layout, its optimizer, and their state.

    `module` is the plain model this rank holds (pruned to its stages under PP); its
    parameter names are the single-process ones, so checkpoints are keyed alike whatever
    the layout. `optimizer` is the optimizer whose `param_groups` the LR schedule writes.
    """

    module: nn.Module
    optimizer: torch.optim.Optimizer

    @abstractmethod
    def forward_backward(
        self, micro_batches: list[MicroBatch], weights: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        """Forward and backward of this rank's share of one global batch; gradients
        accumulate over the micro-batches. Returns each task's summed, unweighted loss
        (float64, on the device), summed over the micro-batches."""

    @abstractmethod
    def step(self) -> torch.Tensor | float:
        """Reduce, clip and apply the accumulated gradients, then clear them. Returns the
        global gradient norm before clipping (a device tensor, so that nothing waits for
        it before the trainer logs it; not finite when fp16 gradients overflowed and the
        optimizer skipped the step)."""

    @abstractmethod
    def evaluate(self, inputs: Batch, labels: Batch) -> dict[str, torch.Tensor]:
        """Forward only, in eval mode: each task's summed loss on this batch (collective
        under sharded layouts: every rank calls it the same number of times)."""

    @property
    @abstractmethod
    def skipped_steps(self) -> torch.Tensor | int:
        """Optimizer steps skipped so far because gradients overflowed (a device tensor
        where the engine keeps the count there)."""

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Collective: write model and optimizer state into `directory` (DCP, by name)."""

    @abstractmethod
    def load(self, directory: Path, *, full: dict | None = None) -> None:
        """Collective: load state written under any layout, from the DCP `directory` or from
        `full` ({"model", "optim"}: the single-file form)."""
