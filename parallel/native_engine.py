"""The native engine: one process, DDP, FSDP2 (ZeRO-2/3), tensor parallelism and Loom's ZeRO-1,
composed on one mesh (parallel/parallelize.py wraps the model; this runs it).

Per step: every micro-batch's forward and backward (DDP and FSDP2 reduce gradients only
on the last one; so does `ReplicaSync`, where DDP and FSDP2 do not keep the replicas
equal: gradient averaging beside TP, its buckets started during the last backward), then
the wait for those reductions, the fp16 overflow check, clipping, the optimizer step, and
ZeRO-1's broadcast of the updated tensors. None of it waits for the device: under fp16
the overflow verdict is a device tensor the optimizer reads (`found_inf`) to skip.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel

from parallel import dist
from parallel.data_parallel import ReplicaSync, clip_grads_
from parallel.engine import (
    Batch,
    Engine,
    MicroBatch,
    TrainingSpec,
    inputs_to,
    local_losses,
    sum_micro_losses,
)
from parallel.state import (
    load_model_state,
    load_optimizer_state,
    load_sharded,
    save_sharded,
    unwrap,
)
from parallel.tensor_parallel import loss_parallel_context, reduce_pending_grads


def no_grad_sync(model: nn.Module, *, last_micro_batch: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient reduction on all but the last micro-batch of an accumulation."""
    if isinstance(model, DistributedDataParallel) and not last_micro_batch:
        return model.no_sync()
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last_micro_batch)
    return contextlib.nullcontext()


class NativeEngine(Engine):
    """A model wrapped by `parallel.parallelize.parallelize` (or left plain on one process).

    `model` is what runs the forward (DDP, an FSDP2 root or the plain module); `module` the
    plain model inside it. `replicas` is the ReplicaSync of the layout, if any.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        spec: TrainingSpec,
        world: dist.World,
        replicas: ReplicaSync | None = None,
        tensor_parallel: bool = False,
        aliases: dict[str, list[str]] | None = None,
        sharded_norm: bool = False,
    ) -> None:
        self.model = model
        self.module = unwrap(model)
        self.spec = spec
        self.world = world
        self.scaler = spec.scaler
        self.tensor_parallel = tensor_parallel
        self.loss_fn = local_losses(spec.loss_fn) if tensor_parallel else spec.loss_fn
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = spec.make_optimizer(self.module)
        self.replicas = replicas
        if replicas is not None:
            replicas.shard_optimizer(self.optimizer)
        # Other names of tied parameters, whose state a checkpoint may hold under either.
        self.aliases = aliases
        # Gradients on several meshes (expert parallelism): a norm torch's clip cannot take.
        self.sharded_norm = sharded_norm

    # -- training ------------------------------------------------------------------------

    def _loss_context(self) -> contextlib.AbstractContextManager:
        """Vocabulary-parallel cross-entropy under TP: the logits stay sharded."""
        return loss_parallel_context(self.tensor_parallel)

    def forward_backward(
        self, micro_batches: list[MicroBatch], weights: dict[str, float]
    ) -> dict[str, torch.Tensor]:
        self.model.train()
        totals, keys = None, sorted(micro_batches[0][1])
        for i, (inputs, labels) in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with no_grad_sync(self.model, last_micro_batch=last), self._loss_context():
                sums = self._forward_loss(self.model, inputs, labels)
                total = sum(sums[k] * weights[k] for k in sums)
                if last and self.replicas is not None:
                    self.replicas.begin_overlap()
                self.scaler.scale_loss(total).backward()
            totals = sum_micro_losses(totals, sums, keys)
        return dict(zip(keys, totals.unbind(0), strict=True))

    def _forward_loss(self, model: nn.Module, inputs: Batch, labels: Batch) -> dict:
        device = self.world.device
        inputs, labels = inputs_to(device, inputs), inputs_to(device, labels)
        with self.spec.forward_context():
            outputs = model(**inputs)
        if self.spec.loss_targets is not None:
            labels = {**labels, **self.spec.loss_targets(inputs)}
        return self.loss_fn(outputs, labels)

    def step(self) -> torch.Tensor:
        if self.replicas is not None:  # waits for the buckets the last backward started
            self.replicas.reduce_gradients()
        if self.tensor_parallel:  # norm gradients under sp: reduced once, here
            reduce_pending_grads(self.params)
        found_inf = self.scaler.unscale(self.params)
        if found_inf is not None:  # fp16: any rank's overflow skips the step on every rank
            dist.max_over_ranks_(found_inf, self.world)
        self.optimizer.found_inf = found_inf  # read by the optimizer, on the device
        grad_norm = self._clip(self.spec.grad_clip or math.inf)
        self.optimizer.step()
        if self.replicas is not None:
            self.replicas.broadcast_parameters()
        self.scaler.update(found_inf)
        # Every gradient, not only the optimizer's: under ZeRO-1 it holds a subset.
        for p in self.params:
            p.grad = None
        return grad_norm

    def _clip(self, max_norm: float) -> torch.Tensor:
        """The pre-clip global gradient norm (inf or nan after an fp16 overflow, whose step
        the optimizer skips); nothing here waits for the device."""
        if self.sharded_norm:
            return clip_grads_(self.params, max_norm, self.world.device)
        return torch.nn.utils.clip_grad_norm_(self.params, max_norm).detach()

    @property
    def skipped_steps(self) -> torch.Tensor | int:
        return self.scaler.skipped

    @torch.no_grad()
    def evaluate(self, inputs: Batch, labels: Batch) -> dict[str, torch.Tensor]:
        self.module.eval()
        with self._loss_context():
            return self._forward_loss(self.module, inputs, labels)

    # -- state ---------------------------------------------------------------------------

    def save(self, directory: Path) -> None:
        save_sharded(self.model, self.optimizer, directory)

    def load(self, directory: Path, *, full: dict | None = None) -> None:
        if full is None:
            load_sharded(self.model, self.optimizer, directory, aliases=self.aliases)
            return
        load_model_state(self.model, full["model"])
        load_optimizer_state(self.model, self.optimizer, full["optim"], aliases=self.aliases)
