#!/usr/bin/env python
"""Submit a Loom training job to Slurm.

python launch/submit.py +model=glm_large slurm.nodes=4 slurm.gpus_per_node=8 \\
    slurm.partition=gpu slurm.time=24:00:00 [--dry-run]

Takes the overrides launch/train.py takes, plus the `slurm.*` keys (trainer/slurm.py,
SlurmConfig). The job's config is composed and checked first, for the world size the
allocation gives (nodes x processes per node), so a bad config fails here rather than in
the queue. Then `<trainer.out_dir>/slurm/submit.sh` is written (the run directory is made
absolute: every restart of the job trains, and resumes, there) and handed to `sbatch`;
--dry-run only writes it and prints its path. Prints the job id. The job requeues itself
after preemption or its time limit and retries failures (trainer/slurm.py), so one
submission carries a run to the end.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.errors import USER_ERROR_EXIT, LoomError, one_line  # noqa: E402


def write_script(overrides: list[str]) -> tuple[Path, str]:
    """Check the job and write its batch script; (script path, sbatch options summary)."""
    from trainer.config import check_runnable, compose_job, fit_micro_batch, validate_job
    from trainer.slurm import sbatch_script

    job = compose_job(overrides)
    world = job.slurm.world_size
    fit_micro_batch(job, world_size=world)  # as each rank will
    validate_job(job, world_size=world)
    check_runnable(job, world_size=world)
    run_dir = Path(job.trainer.out_dir).resolve()
    train_args = [o for o in overrides if not o.startswith("trainer.out_dir=")]
    script = sbatch_script(
        job.slurm,
        run_dir=run_dir,
        project=ROOT,
        python=job.slurm.python or sys.executable,
        train_args=train_args,
        job_name=job.slurm.job_name or f"loom-{job.model.name}",
    )
    path = run_dir / "slurm" / "submit.sh"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    path.chmod(0o755)
    layout = f"{job.slurm.nodes} node(s) x {job.slurm.procs} process(es), {job.slurm.launcher}"
    return path, layout


def main(argv: list[str]) -> int:
    dry_run = "--dry-run" in argv
    overrides = [a for a in argv if a != "--dry-run"]
    if any(a in ("-h", "--help") for a in overrides):
        print(__doc__)
        return 0
    from hydra.errors import HydraException

    try:
        path, layout = write_script(overrides)
    except (ValueError, LoomError, HydraException) as exc:  # they name the key or value
        reason = f" ({str(exc.__cause__).splitlines()[0]})" if exc.__cause__ else ""
        print(f"config error: {one_line(exc)}{reason}", file=sys.stderr)
        return USER_ERROR_EXIT
    if dry_run:
        print(f"wrote {path} ({layout}); not submitted")
        return 0
    proc = subprocess.run(
        ["sbatch", "--parsable", str(path)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        print(f"sbatch {path} failed: {proc.stderr.strip()}", file=sys.stderr)
        return 1
    job_id = proc.stdout.strip().split(";")[0]
    print(f"submitted job {job_id}: {path} ({layout})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
