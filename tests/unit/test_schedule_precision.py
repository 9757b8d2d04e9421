from __future__ import annotations

import math

import pytest
import torch

from trainer.config import OptimConfig, PrecisionConfig
from trainer.precision import LossScaler
from trainer.schedule import LRSchedule


def test_warmup_then_cosine_to_floor():
    s = LRSchedule(OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=10, decay="cosine"), max_steps=110)
    assert s.lr_at(0) == pytest.approx(0.1)
    assert s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(110) == pytest.approx(0.1)
    assert s.lr_at(500) == pytest.approx(0.1)


def test_linear_and_constant_decay():
    lin = LRSchedule(OptimConfig(lr=1.0, min_lr=0.0, warmup_steps=0, decay="linear"), max_steps=100)
    assert [lin.lr_at(s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    const = LRSchedule(
        OptimConfig(lr=0.3, min_lr=0.0, warmup_steps=5, decay="constant"), max_steps=100
    )
    assert const.lr_at(4) == pytest.approx(0.3) and const.lr_at(99) == pytest.approx(0.3)


def test_schedule_writes_every_param_group():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [p]}, {"params": []}], lr=0.0)
    LRSchedule(OptimConfig(lr=2.0, min_lr=0.0, warmup_steps=2), max_steps=10).apply(opt, 0)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 1.0]


def test_fp16_scaler_skips_overflow_and_backs_off():
    """The verdict, scale and counts stay tensors; they follow GradScaler's rules."""
    scaler = LossScaler(PrecisionConfig(dtype="fp16", initial_scale=1024.0, growth_interval=2))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1024.0, float("inf"), 0.0])
    found_inf = scaler.unscale([p])
    assert isinstance(found_inf, torch.Tensor) and found_inf.item() == 1.0
    scaler.update(found_inf)
    assert scaler.scale == 512.0 and scaler.skipped_steps == 1
    p.grad = torch.tensor([512.0, 1024.0, 0.0])
    found_inf = scaler.unscale([p])
    assert found_inf.item() == 0.0 and scaler.found_inf is found_inf
    assert torch.equal(p.grad, torch.tensor([1.0, 2.0, 0.0]))
    scaler.update(found_inf)
    assert scaler.scale == 512.0
    scaler.update(found_inf)
    assert scaler.scale == 1024.0 and scaler.skipped_steps == 1  # grew after 2 clean steps
    assert scaler.scale_loss(torch.tensor(2.0)).item() == 2048.0
    restored = LossScaler(PrecisionConfig(dtype="fp16"))
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()


def test_scaler_is_identity_without_fp16():
    scaler = LossScaler(PrecisionConfig(dtype="bf16"))
    loss = torch.tensor(3.0)
    assert scaler.scale_loss(loss) is loss and scaler.scale == 1.0
    assert scaler.unscale([]) is None and scaler.found_inf is None
