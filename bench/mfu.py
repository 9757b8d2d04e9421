"""Tokens/s, MFU and peak memory of Loom's training step on one device, beside the dry run's
memory estimate for the same job.

    python bench/mfu.py +model=gpt3_1.3b precision=bf16 trainer.micro_batch_size=8 \\
        [--steps 20] [--warmup 5] [--micro-batches 4,8,16]   (any launch/train.py overrides)

Builds the job as launch/train.py does (trainer.device=auto: the GPU when there is one),
runs `--warmup` untimed steps (compilation, allocator, optimizer state), then `--steps`
steps timed with one device synchronisation at each end. MFU = tokens/s x FLOPs per token
(models/flops.py, active parameters for MoE) / the device's peak (trainer.peak_flops, or
the known peak of the GPU and precision; null on CPU unless given). Peak memory is
torch.cuda.max_memory_allocated over the timed steps, against `total_gib` of
trainer/dry_run.py's estimate (without attention scores: SDPA does not keep them).
With --micro-batches, the job runs once per micro-batch size (global batch = micro-batch:
one micro-batch per step) and the best MFU is marked; a size that runs out of device
memory is named and skipped. With --profile N, N more steps run under torch.profiler and
the kernels (CPU ops off the GPU) that take the most device time are printed, to explain
where a step's time goes. Prints one line per run and writes each, as it finishes, as a
JSON line to <trainer.out_dir>/mfu.jsonl. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

# Run as a script from anywhere: put the repository root ahead of bench/ on the path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models import param_counts  # noqa: E402
from parallel.dist import init_world, shutdown  # noqa: E402
from trainer.config import compose_job, fit_micro_batch, validate_job  # noqa: E402
from trainer.dry_run import memory_estimate  # noqa: E402
from trainer.loop import Trainer, peak_flops_total  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--micro-batches", default=None, help="comma-separated sizes to sweep")
    parser.add_argument("--profile", type=int, default=0, help="profiled steps after timing")
    parser.add_argument("--top", type=int, default=15, help="kernels listed by --profile")
    parser.add_argument("overrides", nargs="*")
    return parser.parse_args()


def profile_steps(trainer: Trainer, first: int, steps: int, *, cuda: bool, top: int) -> str:
    """The `top` kernels (ops on CPU) by total device time over `steps` training steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for step in range(first, first + steps):
            record = trainer.train_step(step)
        float(record["loss"])
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top)


def measure(
    overrides: list[str], *, steps: int, warmup: int, profile: int = 0, top: int = 15
) -> dict:
    job = compose_job([*overrides, "trainer.tensorboard=false"])
    fit_micro_batch(job, world_size=1)
    validate_job(job)
    world = init_world(
        job.parallel,
        device_preference=job.trainer.device,
        deterministic=job.trainer.deterministic,
    )
    try:
        trainer = Trainer(job, world)
        device = world.device
        cuda = device.type == "cuda"
        for step in range(warmup):
            trainer.train_step(step)
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for step in range(warmup, warmup + steps):
            record = trainer.train_step(step)
        float(record["loss"])  # waits for the device
        seconds = time.perf_counter() - start
        tokens = steps * job.trainer.global_batch_size * trainer.seq_len
        tps = tokens / seconds
        peak = peak_flops_total(job, world)
        estimate = memory_estimate(
            job,
            params=trainer.counts["total"],
            vocab=trainer.vocab_size,
            world_size=1,
            expert_params=trainer.counts["expert"],
        )
        measured = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
        kernels = (
            profile_steps(trainer, warmup + steps, profile, cuda=cuda, top=top) if profile else None
        )
        return {
            "model": job.model.name,
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
            "precision": job.precision.dtype,
            "micro_batch_size": job.trainer.micro_batch_size,
            "compile": job.parallel.compile,
            "activation_checkpointing": job.parallel.activation_checkpointing,
            "params": param_counts(trainer.engine.module)["total"],
            "tokens_per_s": tps,
            "mfu": None if peak is None else tps * trainer.flops_per_token / peak,
            "peak_memory_gib": measured,
            "estimated_memory_gib": estimate["total_gib"],
            "loss": float(record["loss"]),
            "profile": kernels,
        }
    finally:
        shutdown(world)


def main() -> None:
    args = parse_args()
    sizes = [int(s) for s in args.micro_batches.split(",")] if args.micro_batches else [None]
    out = Path(compose_job(args.overrides).trainer.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for size in sizes:
        extra = (
            []
            if size is None
            else [
                f"trainer.micro_batch_size={size}",
                f"trainer.global_batch_size={size}",
            ]
        )
        try:
            r = measure(
                [*args.overrides, *extra],
                steps=args.steps,
                warmup=args.warmup,
                profile=args.profile,
                top=args.top,
            )
        except torch.OutOfMemoryError:
            if size is None:
                raise
            print(f"micro-batch {size}: out of device memory", flush=True)
            continue
        results.append(r)
        with open(out / "mfu.jsonl", "a") as f:  # each as it comes: a sweep may be cut short
            f.write(json.dumps(r) + "\n")
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
        print(
            f"{r['model']} on {r['device']}, {r['precision']}, micro-batch {r['micro_batch_size']}"
            f", compile {r['compile']}, recompute {r['activation_checkpointing']}: "
            f"{r['tokens_per_s']:,.0f} tok/s, MFU {mfu}, peak {mem} GiB "
            f"(estimate {r['estimated_memory_gib']:.2f} GiB)",
            flush=True,
        )
        if r["profile"]:
            print(r["profile"], flush=True)
    if len(sizes) > 1 and results:
        best = max(results, key=lambda r: r["mfu"] or r["tokens_per_s"])
        print(f"best: micro-batch {best['micro_batch_size']}")


if __name__ == "__main__":
    main()
