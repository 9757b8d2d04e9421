"""Mixed precision: autocast contexts and fp16 dynamic loss scaling.

Parameters, gradients and optimizer states stay fp32; only the matmuls run in bf16/fp16.
fp16 gradients can overflow, so the loss is multiplied by a scale before backward; a step
whose unscaled gradients hold inf/nan is skipped and the scale shrinks, and after
`growth_interval` clean steps the scale grows again.
"""

from __future__ import annotations

import contextlib

import torch

from trainer.config import PrecisionConfig

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(cfg: PrecisionConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[cfg.dtype])


class LossScaler:
    """Dynamic loss scale for fp16; a no-op scale of 1 for fp32 and bf16."""

    def __init__(self, cfg: PrecisionConfig) -> None:
        self.enabled = cfg.dtype == "fp16"
        self.scale = cfg.initial_scale if self.enabled else 1.0
        self.growth_factor = cfg.growth_factor
        self.backoff_factor = cfg.backoff_factor
        self.growth_interval = cfg.growth_interval
        self.clean_steps = 0
        self.skipped_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale_and_check(self, params: list[torch.nn.Parameter]) -> bool:
        """Divide gradients by the scale in place; True when this rank's are all finite.

        Under ZeRO-2/3 each rank holds a shard of the gradients, so the caller combines
        the verdicts of all ranks before deciding to step.
        """
        grads = [p.grad for p in params if p.grad is not None]
        if not self.enabled or not grads:
            return True
        torch._foreach_mul_(grads, 1.0 / self.scale)
        local = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
        return bool(torch.isfinite(torch.stack(torch._foreach_norm(local))).all())

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if finite:
            self.clean_steps += 1
            if self.clean_steps >= self.growth_interval:
                self.scale *= self.growth_factor
                self.clean_steps = 0
        else:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.skipped_steps += 1

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "clean_steps": self.clean_steps,
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])
