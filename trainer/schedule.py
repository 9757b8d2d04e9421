"""Learning-rate schedule: linear warm-up, then linear / cosine / constant decay to a floor.

The rate is a pure function of the optimizer step, so resuming needs only the step count.
"""

from __future__ import annotations

import math

import torch

from trainer.config import OptimConfig


class LRSchedule:
    def __init__(self, cfg: OptimConfig, *, max_steps: int) -> None:
        self.peak = cfg.lr
        self.floor = cfg.min_lr
        self.warmup = cfg.warmup_steps
        self.decay = cfg.decay
        self.decay_end = cfg.decay_steps if cfg.decay_steps is not None else max_steps

    def lr_at(self, step: int) -> float:
        """Rate used by optimizer step `step` (0-based)."""
        if step < self.warmup:
            # (step + 1) so the very first step already moves the weights.
            return self.peak * (step + 1) / self.warmup
        if self.decay == "constant":
            return self.peak
        span = max(1, self.decay_end - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        if self.decay == "linear":
            factor = 1.0 - progress
        else:
            factor = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.floor + (self.peak - self.floor) * factor

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr
