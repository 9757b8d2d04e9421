from __future__ import annotations

import gc

import pytest
import torch


@pytest.fixture(autouse=True)
def free_the_gpu():
    """A test's trainer is in a reference cycle: collect it after the test, so the next
    test's memory figures and headroom do not include it."""
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
