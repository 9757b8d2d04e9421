"""metrics.jsonl, TensorBoard scalars and the console progress line (rank 0 only).

MFU = achieved model FLOP/s / peak FLOP/s of all devices, where achieved FLOP/s is
tokens/s x training FLOPs per token (formula in models/flops.py). Without a known peak
(CPU, unknown GPU, no trainer.peak_flops) MFU is recorded as null rather than guessed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from common.log import get_logger
from data_pipeline.objectives import target_length
from models.flops import flops_per_token
from trainer.config import JobConfig

log = get_logger("loom.metrics")


def job_flops_per_token(job: JobConfig, *, vocab_size: int, seq_len: int) -> float:
    """Training FLOPs per token of the job's model on its objective's samples (an
    encoder-decoder's decoder length follows the objective's configured noise; ELECTRA's
    generator head runs on the data.mlm.mask_prob share of the tokens)."""
    objective = job.data.objective or job.model.objective
    return flops_per_token(
        job.model,
        vocab_size=vocab_size,
        seq_len=seq_len,
        target_len=target_length(objective, cfg=job.data, seq_len=seq_len),
        mask_prob=job.data.mlm.mask_prob,
    )


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def truncate_after(path: Path, step: int) -> None:
    """Drop records past `step` (logged after the checkpoint a run resumes from)."""
    if not path.exists():
        return
    kept = [
        line
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    def __init__(
        self, run_dir: Path, *, enabled: bool, tensorboard: bool, max_steps: int, start_step: int
    ) -> None:
        self.enabled = enabled
        self.max_steps = max_steps
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if not enabled:
            return
        if start_step == 0:
            self.path.unlink(missing_ok=True)
        else:
            truncate_after(self.path, start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=start_step + 1)

    def write(self, record: dict, *, histograms: dict | None = None) -> None:
        """Append one record (must hold "step") to metrics.jsonl and TensorBoard; a nested
        dict of numbers becomes one scalar per leaf (`moe/load/<layer>/max`), and
        `histograms` ({name: tensor}) TensorBoard histograms."""
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record["step"]
            for key, value in _leaves(record):
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    prefix = "val" if key.startswith("val") else "train"
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)
            for name, values in (histograms or {}).items():
                self.writer.add_histogram(name, values, step)
            self.writer.flush()

    def progress(self, record: dict, *, seconds_per_step: float) -> None:
        if not self.enabled:
            return
        step = record["step"]
        eta = format_eta(seconds_per_step * (self.max_steps - step))
        mfu = "-" if record.get("mfu") is None else f"{100 * record['mfu']:.1f}%"
        scale = (
            "" if record.get("loss_scale") in (None, 1.0) else f" | scale {record['loss_scale']:g}"
        )
        # A step skipped for an fp16 overflow has no gradient norm.
        grad = "- (skipped)" if record["grad_norm"] is None else f"{record['grad_norm']:.3f}"
        log.info(
            "step %d/%d | loss %.4f | lr %.3e | grad %s | %s tok/s | mfu %s%s | ETA %s",
            step,
            self.max_steps,
            record["loss"],
            record["lr"],
            grad,
            _human(record["tokens_per_s"]),
            mfu,
            scale,
            eta,
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _leaves(record: dict, prefix: str = ""):
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}/")
        else:
            yield prefix + key, value


def moe_metrics(stats: dict[str, torch.Tensor], *, reduce: str) -> tuple[dict, dict]:
    """metrics.jsonl entries and TensorBoard histograms from the summed layer statistics
    ({layer name: [aux, z, rows, choices, dropped, load per expert...]}, see models.moe).

    moe/aux_loss and moe/z_loss are the per-row losses before their coefficients, combined
    over layers as the objective combines them (mean or sum); moe/dropped_frac the share of
    token choices past capacity; moe/load/<layer> the tokens per expert (min, max, mean, and
    max / mean, the imbalance)."""
    if not stats:
        return {}, {}
    rows = {name: max(float(v[2]), 1.0) for name, v in stats.items()}
    aux = [float(v[0]) / rows[name] for name, v in stats.items()]
    z = [float(v[1]) / rows[name] for name, v in stats.items()]
    combine = (lambda xs: sum(xs) / len(xs)) if reduce == "mean" else sum
    choices = sum(float(v[3]) for v in stats.values())
    record = {
        "moe/aux_loss": combine(aux),
        "moe/z_loss": combine(z),
        "moe/dropped_frac": sum(float(v[4]) for v in stats.values()) / max(choices, 1.0),
        "moe/load": {},
    }
    histograms = {}
    for name, v in stats.items():
        load = v[5:]
        mean = float(load.mean())
        record["moe/load"][name] = {
            "min": float(load.min()),
            "max": float(load.max()),
            "mean": mean,
            "imbalance": float(load.max()) / mean if mean > 0 else 0.0,
        }
        histograms[f"moe/load/{name}"] = load
    return record, histograms


def _human(x: float) -> str:
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if x >= size:
            return f"{x / size:.1f}{unit}"
    return f"{x:.0f}"


class Throughput:
    """Tokens/s and MFU over the window since the last call."""

    def __init__(self, *, flops_per_token: float, peak_flops_total: float | None) -> None:
        self.flops_per_token = flops_per_token
        self.peak = peak_flops_total
        self.seconds = 0.0
        self.tokens = 0
        self.steps = 0

    def add(self, tokens: int, seconds: float) -> None:
        """Count one training step; evaluation and checkpoint time are left out."""
        self.tokens += tokens
        self.seconds += seconds
        self.steps += 1

    def read(self) -> tuple[float, float | None, float]:
        """(tokens/s, MFU or None, seconds per step) since the last read; resets the window."""
        dt = max(self.seconds, 1e-9)
        tps = self.tokens / dt
        sps = dt / max(self.steps, 1)
        self.seconds, self.tokens, self.steps = 0.0, 0, 0
        mfu = None if self.peak is None else tps * self.flops_per_token / self.peak
        return tps, mfu, sps
