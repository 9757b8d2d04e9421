"""What the model and conversion tests share: a recipe from conf/model as its dataclass, random
weights in every parameter, and one intra-op thread for tiny models. Import `one_thread` into a
test module to apply it there."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from models.config import ModelConfig

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"


def recipe(name: str, **overrides) -> ModelConfig:
    """conf/model/NAME.yaml merged into the schema, with `overrides` replaced."""
    schema = OmegaConf.structured(ModelConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(CONF_DIR / f"{name}.yaml")))
    return dataclasses.replace(cfg, **overrides)


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter, biases and norms included, so none maps by luck."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: extra intra-op threads only add synchronisation on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
