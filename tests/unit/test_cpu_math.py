"""CPU math gives the same bits on its first multi-threaded call as on every later one, once
common.cpu_math has settled it. Without the settling, a fresh process's first VML call on two
threads returns a low-accuracy chunk now and then (about one process in six on the machines
Loom's CI runs on, always the first function called), so twelve processes catch a missing
or broken settle nearly always; with it, none may differ."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

PROCESSES = 12

# A fresh interpreter: the race is in a process's first call, so it cannot run in this one.
FIRST_CALLS = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from common.cpu_math import VML_FUNCTIONS, settle_cpu_math
settle_cpu_math()
torch.set_num_threads(2)  # two threads race to each function's first call
for dtype in (torch.float32, torch.float64):
    x = torch.linspace(0.01, 0.99, 16384, dtype=dtype)
    first = {name: getattr(torch, name)(x) for name in VML_FUNCTIONS}
    torch.set_num_threads(1)
    for name in VML_FUNCTIONS:
        if not torch.equal(first[name], getattr(torch, name)(x)):
            print(name, dtype)
    torch.set_num_threads(2)
"""


def test_first_multithreaded_calls_match_later_ones():
    if not torch.backends.mkl.is_available():
        pytest.skip("this torch has no MKL: its CPU math has no first-call race to settle")
    differing = []
    for _ in range(PROCESSES):
        out = subprocess.run(
            [sys.executable, "-c", FIRST_CALLS, str(ROOT)],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        differing += out.stdout.split("\n")[:-1]
    assert not differing, differing
