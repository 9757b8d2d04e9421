"""Loom's training step against a bare PyTorch loop of the same model, batch and optimizer.

    python bench/step_overhead.py [--steps 30] [--repeats 5] [--device cpu|cuda]
                                  [overrides ...]     (default: d_model 256, 4 layers)

Both run in this process on one device. Loom: `Trainer.train_step` (its loader and
objective, accumulation over micro-batches, loss normalisation over the global batch,
clipping, LR schedule, the optimizer Loom builds from the config). The bare loop: the
same model (same seed, so the same weights), the same micro-batches already in memory,
`model(**inputs)`, `F.cross_entropy` summed and divided by the step's target count,
backward per micro-batch, `clip_grad_norm_`, the same optimizer class and settings, and
`optimizer.step()`. Rounds alternate (Loom, bare, Loom, ...) after one warm-up round each;
printed are the median tokens/s of each and bare / Loom (1.00: no overhead; 1.05: the bare
loop trains 5% more tokens per second). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

# Run as a script from anywhere: put the repository root ahead of bench/ on the path.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_pipeline.objectives import IGNORE_INDEX, split_batch  # noqa: E402
from models import build_model  # noqa: E402
from parallel.dist import init_world  # noqa: E402
from trainer.config import compose_job  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.optim import build_optimizer  # noqa: E402

DEFAULT = ["model.d_model=256", "model.n_layer=4", "model.n_head=4", "trainer.tensorboard=false"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds of each")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("overrides", nargs="*", help="Loom config overrides")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    out = Path("/tmp/loom_bench_step_overhead")
    job = compose_job(
        [*DEFAULT, *args.overrides, f"trainer.device={args.device}", f"trainer.out_dir={out}"]
    )
    world = init_world(
        job.parallel,
        device_preference=job.trainer.device,
        deterministic=job.trainer.deterministic,
    )
    trainer = Trainer(job, world)
    device, t = world.device, job.trainer

    torch.manual_seed(t.seed)  # the weights Loom started from
    model = build_model(job.model, vocab_size=trainer.vocab_size)
    model.to(device).train()
    optimizer = build_optimizer(model, job.optim)
    steps = [trainer.data.loader.next_batch() for _ in range(args.steps)]
    steps = [[split_batch(b) for b in micro] for micro in steps]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def bare_step(micro_batches) -> None:
        targets = sum(int((m[1]["labels"] != IGNORE_INDEX).sum()) for m in micro_batches)
        for inputs, labels in micro_batches:
            logits = model(**{k: v.to(device) for k, v in inputs.items()})
            loss = F.cross_entropy(
                logits.reshape(-1, logits.size(-1)).float(),
                labels["labels"].reshape(-1).to(device),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            (loss / targets).backward()
        # 0 turns clipping off in Loom; the bare loop measures the norm all the same.
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.optim.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def loom_round() -> float:
        sync()
        start = time.perf_counter()
        for i in range(args.steps):
            trainer.train_step(i)
        sync()
        return time.perf_counter() - start

    def bare_round() -> float:
        sync()
        start = time.perf_counter()
        for micro_batches in steps:
            bare_step(micro_batches)
        sync()
        return time.perf_counter() - start

    times = {"loom": [], "bare": []}
    for repeat in range(args.repeats + 1):  # the first round of each warms up
        for name, run in (("loom", loom_round), ("bare", bare_round)):
            seconds = run()
            if repeat:
                times[name].append(seconds)
    tokens = args.steps * t.global_batch_size * trainer.seq_len
    rate = {name: tokens / statistics.median(v) for name, v in times.items()}
    print(
        f"{job.model.name} d_model {job.model.d_model} x {job.model.n_layer} layers, global "
        f"batch {t.global_batch_size} x {trainer.seq_len} tokens in micro-batches of "
        f"{t.micro_batch_size}, {job.optim.name}, {device}, {torch.get_num_threads()} threads"
    )
    print(
        f"loom {rate['loom']:,.0f} tok/s | bare loop {rate['bare']:,.0f} tok/s | "
        f"bare / loom {rate['bare'] / rate['loom']:.3f}"
    )


if __name__ == "__main__":
    main()
