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
    """Dynamic loss scale for fp16; a no-op scale of 1 for fp32 and bf16.

    Everything the scaling decides stays on the device, so a step never waits for it: the
    scale, the clean steps since it last changed, the skipped steps and each step's
    overflow verdict are tensors, updated by the kernels torch.amp.GradScaler runs
    (`_amp_foreach_non_finite_check_and_unscale_`, `_amp_update_scale_`), and the optimizer
    skips an overflowing step on the device (`found_inf`). `scale` and `skipped_steps` read
    them on the host, for logs and checkpoints only.
    """

    def __init__(self, cfg: PrecisionConfig, device: torch.device | None = None) -> None:
        self.enabled = cfg.dtype == "fp16"
        self.growth_factor = cfg.growth_factor
        self.backoff_factor = cfg.backoff_factor
        self.growth_interval = cfg.growth_interval
        device = device or torch.device("cpu")
        initial = cfg.initial_scale if self.enabled else 1.0
        self.scale_tensor = torch.full((), initial, dtype=torch.float32, device=device)
        self.clean_steps = torch.zeros((), dtype=torch.int32, device=device)
        self.skipped = torch.zeros((), dtype=torch.int64, device=device)
        self.found_inf: torch.Tensor | None = None  # the last step's verdict: 1.0 overflowed

    @property
    def scale(self) -> float:
        return float(self.scale_tensor)

    @property
    def skipped_steps(self) -> int:
        return int(self.skipped)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_tensor if self.enabled else loss

    def unscale(self, params: list[torch.nn.Parameter]) -> torch.Tensor | None:
        """Divide gradients by the scale in place; this rank's verdict, 1.0 if any of its
        gradients holds inf or nan (a device tensor), or None without loss scaling.

        Under ZeRO-2/3 and TP each rank holds a part of the gradients, so the caller
        combines the verdicts of all ranks (a maximum) before the optimizer reads it.
        """
        if not self.enabled:
            return None
        found_inf = torch.zeros((), dtype=torch.float32, device=self.scale_tensor.device)
        inv_scale = self.scale_tensor.double().reciprocal().float()
        groups: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                groups.setdefault((grad.device, grad.dtype), []).append(grad)
        for grads in groups.values():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
        self.found_inf = found_inf
        return found_inf

    def update(self, found_inf: torch.Tensor | None) -> None:
        """After the step: back off and count a skipped step on overflow, else grow after
        `growth_interval` clean steps (on the device)."""
        if not self.enabled or found_inf is None:
            return
        torch._amp_update_scale_(
            self.scale_tensor,
            self.clean_steps,
            found_inf,
            self.growth_factor,
            self.backoff_factor,
            self.growth_interval,
        )
        self.skipped += found_inf.to(torch.int64)

    def state_dict(self) -> dict:
        return {
            "scale": self.scale,
            "clean_steps": int(self.clean_steps),
            "skipped_steps": self.skipped_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        self.scale_tensor.fill_(float(state["scale"]))
        self.clean_steps.fill_(int(state["clean_steps"]))
        self.skipped.fill_(int(state["skipped_steps"]))
