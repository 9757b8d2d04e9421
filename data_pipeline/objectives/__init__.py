"""Pretraining objectives: pure functions turning a batch of packed rows into model inputs."""

from __future__ import annotations

from collections.abc import Callable

import torch

from data_pipeline.objectives.clm import clm_batch

Objective = Callable[[torch.Tensor], dict[str, torch.Tensor]]

OBJECTIVES: dict[str, Objective] = {"clm": clm_batch}


def get_objective(name: str) -> Objective:
    """The batch transform named by data.objective."""
    if name not in OBJECTIVES:
        raise ValueError(f"data.objective={name!r} is unknown; choose one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]


__all__ = ["OBJECTIVES", "Objective", "clm_batch", "get_objective"]
