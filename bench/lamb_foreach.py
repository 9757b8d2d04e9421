"""Time one LAMB step, multi-tensor (foreach) against per-tensor loop, with AdamW's foreach
and fused steps as the reference, on the parameter shapes of a GPT-2-like model.

    python bench/lamb_foreach.py [--layers L] [--params N] [--steps S] [--device cpu|cuda]

Prints ms/step for each optimizer, the foreach speed-up over the loop and the cost of a
LAMB step relative to AdamW's foreach and fused steps (the fastest step torch has; LAMB
keeps its exact per-tensor trust ratios, which a flat fused kernel would not). Timings
only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Run as a script from anywhere: put the repository root ahead of bench/ on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.optim import Lamb, param_groups  # noqa: E402


def gpt_shapes(*, layers: int, d_model: int, vocab: int, max_seq_len: int) -> list[tuple]:
    """Parameter shapes of a GPT-2-style decoder, in module order."""
    d, ff = d_model, 4 * d_model
    block = [
        (d,),
        (d,),
        (3 * d, d),
        (3 * d,),
        (d, d),
        (d,),  # ln1, attention
        (d,),
        (d,),
        (ff, d),
        (ff,),
        (d, ff),
        (d,),
    ]  # ln2, MLP
    return [(vocab, d), (max_seq_len, d)] + block * layers + [(d,), (d,)]


class ShapeModel(torch.nn.Module):
    """Holds parameters of the given shapes so `param_groups` can split them."""

    def __init__(self, shapes: list[tuple], *, device: torch.device) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter((0.02 * torch.randn(s, generator=gen)).to(device)) for s in shapes
        )
        for p in self.weights:
            p.grad = 1e-3 * torch.randn(p.shape, generator=gen).to(device)


def time_steps(
    make: Callable[[], torch.optim.Optimizer], *, steps: int, warmup: int, device: torch.device
) -> float:
    """Median ms per `step()`; warm-up steps allocate state and are not timed."""
    opt = make()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        opt.step()
    times = []
    for _ in range(steps):
        sync()
        start = time.perf_counter()
        opt.step()
        sync()
        times.append(1e3 * (time.perf_counter() - start))
    del opt
    gc.collect()  # free the optimizer state before the next contender allocates its own
    return statistics.median(times)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks")
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument(
        "--params",
        type=int,
        default=None,
        help="keep only the first N parameter tensors (default: all)",
    )
    parser.add_argument("--steps", type=int, default=3, help="timed steps per optimizer")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    shapes = gpt_shapes(
        layers=args.layers, d_model=args.d_model, vocab=args.vocab, max_seq_len=args.max_seq_len
    )[: args.params]
    model = ShapeModel(shapes, device=device)
    numel = sum(p.numel() for p in model.parameters())
    print(
        f"{len(shapes)} tensors, {numel / 1e6:.1f}M params, device={device}, "
        f"threads={torch.get_num_threads()}, steps={args.steps}"
    )
    hyper = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-6)

    def groups() -> list[dict]:
        return param_groups(model, weight_decay=0.01)

    contenders = {
        "lamb foreach": lambda: Lamb(groups(), foreach=True, **hyper),
        "lamb loop": lambda: Lamb(groups(), foreach=False, **hyper),
        "adamw foreach": lambda: torch.optim.AdamW(groups(), foreach=True, **hyper),
        "adamw fused": lambda: torch.optim.AdamW(groups(), fused=True, **hyper),
    }
    ms = {}
    for name, make in contenders.items():
        ms[name] = time_steps(make, steps=args.steps, warmup=args.warmup, device=device)
        print(f"{name:>14}: {ms[name]:9.1f} ms/step")
    print(
        f"foreach speed-up over loop (loop / foreach): {ms['lamb loop'] / ms['lamb foreach']:.2f}x"
    )
    print(f"LAMB / AdamW cost (both foreach): {ms['lamb foreach'] / ms['adamw foreach']:.2f}x")
    print(f"LAMB foreach / AdamW fused cost: {ms['lamb foreach'] / ms['adamw fused']:.2f}x")


if __name__ == "__main__":
    main()
