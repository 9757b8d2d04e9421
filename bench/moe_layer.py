"""Tokens per second of Loom's MoE layer against a dense MLP of equal active FLOPs, in one run.

    python bench/moe_layer.py [--d-model 512] [--ffn 2048] [--experts 8] [--top-k 1]
                              [--capacity-factor 1.25] [--batch 8] [--seq-len 512]
                              [--repeats 7] [--device cpu|cuda] [--dtype fp32|bf16]

The dense MLP is Loom's `models.blocks.MLP(d_model, ffn)`; with top-1 routing every token
meets one expert of the same shape, so both do the same matrix products (the MoE layer adds
the router, d_model x E per token, and its routing, dispatch and combine). Sorted, capacity
drops make the MoE layer do slightly less expert work, never more; padded to capacity, the
experts also run on the empty slots (capacity factor x top_k x tokens in all).

Each repeat times a training step (forward, backward of the sum of the outputs with the aux
and z losses attached) and a no-grad forward, for every variant in turn:
- dense:                the dense MLP;
- moe (padded):         the MoE layer with buffers padded to capacity, one batched GEMM
                        per weight (the default: nothing read on the host);
- moe (sorted, loop):   the kept choices sorted by expert, one GEMM per expert (the CPU
                        path of pad_to_capacity=false);
- moe (sorted, grouped): sorted, one grouped GEMM per weight (the CUDA path where the
                        device runs it; this torch build also runs it on CPU), when the
                        torch build has grouped_mm.
Printed: median tokens/s of each and its time relative to dense (1.00 = as fast), and the
dropped-choice fraction of the routing. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

# Run as a script from anywhere: put the repository root ahead of bench/ on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import moe as moe_module  # noqa: E402
from models.blocks import MLP  # noqa: E402
from models.config import MoeConfig  # noqa: E402
from models.moe import MoE  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    return parser.parse_args()


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    dense = MLP(args.d_model, args.ffn, activation="gelu").to(device)
    cfg = MoeConfig(
        num_experts=args.experts, top_k=args.top_k, capacity_factor=args.capacity_factor
    )
    moe = MoE(cfg, d_model=args.d_model, ffn_size=args.ffn, activation="gelu", bias=True)
    moe = moe.to(device)
    moe.aux_weight = 1.0  # the aux and z gradients are injected, as in training
    padded, sorted_ = (dataclasses.replace(cfg, pad_to_capacity=pad) for pad in (True, False))
    # name: (module, MoE config, grouped GEMM)
    variants = {"dense": (dense, None, None), "moe (padded)": (moe, padded, None)}
    variants["moe (sorted, loop)"] = (moe, sorted_, False)
    if moe_module._GROUPED_MM is not None:
        variants["moe (sorted, grouped)"] = (moe, sorted_, True)

    x = torch.randn(args.batch, args.seq_len, args.d_model, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def train_step(module) -> None:
        with autocast:
            y = module(x)
        y.float().sum().backward()
        module.zero_grad(set_to_none=True)

    def forward(module) -> None:
        with torch.no_grad(), autocast:
            module(x)

    times = {(name, kind): [] for name in variants for kind in ("train", "forward")}
    for repeat in range(args.repeats + 1):  # the first round warms up and is not kept
        for name, (module, moe_cfg, grouped) in variants.items():
            if moe_cfg is not None:
                module.cfg, module.experts.grouped = moe_cfg, grouped
            for kind, fn in (("train", train_step), ("forward", forward)):
                seconds = timed(lambda fn=fn, module=module: fn(module), device)
                if repeat:
                    times[name, kind].append(seconds)
    load = moe.stats.take()
    dropped = float(load[4] / load[3])

    tokens = args.batch * args.seq_len
    print(
        f"d_model {args.d_model}, ffn {args.ffn}, {args.experts} experts, top-{args.top_k}, "
        f"capacity factor {args.capacity_factor}, {tokens} tokens per call, {device}, "
        f"{args.dtype}, {torch.get_num_threads()} threads; dropped choices {dropped:.1%}"
    )
    print(f"{'':24}{'train tok/s':>14}{'x dense':>9}{'forward tok/s':>16}{'x dense':>9}")
    base = {kind: statistics.median(times["dense", kind]) for kind in ("train", "forward")}
    for name in variants:
        row = f"{name:24}"
        for kind in ("train", "forward"):
            median = statistics.median(times[name, kind])
            row += f"{tokens / median:14,.0f}{median / base[kind]:9.2f}"
            if kind == "train":
                row += "  "
        print(row)


if __name__ == "__main__":
    main()
