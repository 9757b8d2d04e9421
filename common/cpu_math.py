"""One call per process that makes PyTorch's CPU math functions give the same bits every run.

ATen computes contiguous float32/float64 `sin`, `exp`, `sqrt`, `log`, ... with Intel MKL's
vector math library (VML), each intra-op thread on its own chunk. MKL picks each function's
kernel on that function's first call; in oneMKL 2024.2 (the MKL in PyTorch's wheels) first
calls made by several threads at once can leave one thread running the low-accuracy kernel
for its whole chunk of that call (pytorch/pytorch#188792). Errors reach thousands of ulp
(sin(63) off by 1.6e-5), in a random thread's chunk, once per process: a run and its resume
then differ in the last bits, so nothing compares bit for bit. One single-threaded call of
each function per precision settles the choice before any thread races to it.
"""

from __future__ import annotations

import torch

__all__ = ["VML_FUNCTIONS", "settle_cpu_math"]

# The functions ATen hands to MKL VML (aten/src/ATen/cpu/vml.h), for float32 and float64.
VML_FUNCTIONS = (
    "acos",
    "asin",
    "atan",
    "cos",
    "erf",
    "erfc",
    "erfinv",
    "exp",
    "log",
    "log10",
    "log2",
    "sin",
    "sqrt",
    "tan",
    "tanh",
    "trunc",
)


def settle_cpu_math() -> None:
    """Call each VML-backed function once, on one element, on this thread (a few
    microseconds; calling again changes nothing). Run it before a process's first
    multi-threaded CPU math: Loom does in `parallel.dist.init_world` and in the data
    loader's workers."""
    if not torch.backends.mkl.is_available():
        return
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for name in VML_FUNCTIONS:
            getattr(torch, name)(x)
