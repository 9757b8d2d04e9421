"""Communication accounting of a run: one training step measured on every rank, set beside
the formula of parallel/comm_model.py, logged once and written to <run>/comm.json.

The counted step is the run's third (`COUNTED_STEP`): the first builds pipeline schedules
(their shape inference sends metadata) and DDP re-buckets its gradients in its second.
A run of fewer steps counts its last. The counting mode adds Python work to every op of
that one step, so its time (and the throughput logged over it) is a little worse; losses
are untouched. Nothing is counted on one process, nor under parallel.compile (a dispatch
mode would make the compiled blocks recompile or fall back). The formula describes the
native engine; under parallel.engine=deepspeed only the measurement is reported.

comm.json: {"step", "world_size", "layout", "measured" (mean over ranks), "formula",
"ranks" (each rank's own)}, each volume as {kind: {axis: {"bytes", "calls"}}} per step.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from common.log import log_rank0
from models import build_model
from parallel import dist
from parallel.comm import AxisNames, CommCounter, CommTally, summary_lines
from parallel.comm_model import CommLayout, comm_layout, expected_comm
from trainer.config import JobConfig

COUNTED_STEP = 3
"""Which step of a run (counting from its first, resumed or not) is measured."""

_ELEMENT_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


def job_comm_layout(
    job: JobConfig, *, world_size: int, vocab_size: int, seq_len: int
) -> CommLayout:
    """The formula's view of this job on `world_size` ranks (the model built on meta)."""
    with torch.device("meta"):
        model = build_model(job.model, vocab_size=vocab_size)
    return comm_layout(
        model,
        job.model,
        job.parallel,
        world_size=world_size,
        global_batch_size=job.trainer.global_batch_size,
        micro_batch_size=job.trainer.micro_batch_size,
        seq_len=seq_len,
        compute_bytes=_ELEMENT_SIZE[job.precision.dtype],
        positions_per_row=job.model.family == "glm" or job.data.document_attention,
    )


class CommAccounting:
    """Counts the collectives of one step (`count`) and reports them after it (`report`)."""

    def __init__(
        self,
        job: JobConfig,
        world: dist.World,
        *,
        vocab_size: int,
        seq_len: int,
        start_step: int,
        run_dir: Path,
    ) -> None:
        self.job, self.world, self.run_dir = job, world, run_dir
        self.vocab_size, self.seq_len = vocab_size, seq_len
        last = job.trainer.max_steps
        self.step = min(start_step + COUNTED_STEP, last)
        if not world.distributed or job.parallel.compile or self.step <= start_step:
            self.step = None
        self.counter: CommCounter | None = None

    def count(self, step: int) -> contextlib.AbstractContextManager:
        """Around train_step of loop step `step` (1-based): counts only the chosen one."""
        if step != self.step:
            return contextlib.nullcontext()
        self.counter = CommCounter(AxisNames(self.world.mesh))
        return self.counter

    def report(self, step: int) -> dict | None:
        """After step `step`: on the counted one, gather every rank's tally (collective),
        log the comparison on rank 0 and write comm.json there; returns the report."""
        if step != self.step or self.counter is None:
            return None
        ranks = dist.gather_objects(self.counter.tally.to_json(), self.world)
        measured = CommTally.mean(CommTally.from_json(r) for r in ranks)
        expected, layout = self._formula()
        log_rank0(
            "communication per rank in step %d, by mesh axis (payload handed to collectives)%s:",
            step,
            "" if expected is None else " against the formula",
        )
        for line in summary_lines(measured, reference=expected):
            log_rank0("  %s", line)
        report = {
            "step": step,
            "world_size": self.world.world_size,
            "layout": layout,
            "measured": measured.to_json(),
            "formula": None if expected is None else expected.to_json(),
            "ranks": ranks,
        }
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "comm.json").write_text(json.dumps(report, indent=1) + "\n")
        self.counter = None
        return report

    def _formula(self) -> tuple[CommTally | None, dict]:
        p = self.job.parallel
        layout = {"dp": self.world.dp_size, "tp": p.tp, "pp": p.pp, "ep": p.ep, "zero": p.zero}
        layout |= {"sp": p.sp, "engine": p.engine}
        if p.engine != "native":
            return None, layout
        lay = job_comm_layout(
            self.job,
            world_size=self.world.world_size,
            vocab_size=self.vocab_size,
            seq_len=self.seq_len,
        )
        return expected_comm(lay), layout
