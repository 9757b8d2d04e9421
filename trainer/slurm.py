"""Slurm submission: the `slurm` config group, the sbatch script, and what the script does
when training ends.

launch/submit.py writes `<run>/slurm/submit.sh` from a job's config and submits it. The
script starts training in one of the two usual ways:

* `launcher: torchrun` (default): one torchrun agent per node (`srun --ntasks-per-node=1`),
  c10d rendezvous on the first node at a port derived from the job id;
* `launcher: srun`: one Slurm task per rank (`srun` with procs_per_node tasks per node);
  Loom reads SLURM_PROCID / SLURM_LOCALID / SLURM_STEP_NUM_TASKS (parallel/launch_env.py).

It asks for `--signal=USR2@signal_lead_s` (the stop signal Loom saves on, before the time
limit), `--requeue` and `--open-mode=append`, keeps a log per restart in `<run>/slurm/`,
exports the job's end time for Loom's own deadline, and always trains in the same run
directory, so a requeued job resumes. When training ends, `after_run` reads
`<run>/exit_state.json` (trainer/stop.py) and the script acts on it:

* done: the job ends;
* preempted, time_limit: `scontrol requeue` (the checkpoint of the stop is on disk);
* failed: requeued while `max_retries` allows and the failure is worth a retry; a config
  error (exit code 2, retry false) never is. No exit state at all (a rank killed, out of
  memory) is recorded as a failure by the script.

The batch shell traps SIGTERM (preemption sends it to every process of the job) so that it
survives to requeue once the training step has saved and exited.
"""

from __future__ import annotations

import argparse
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from parallel.launch_env import LaunchEnv
from trainer.stop import read_exit_state, write_exit_state

__all__ = ["SlurmConfig", "after_run", "sbatch_script"]

LAUNCHERS = ("torchrun", "srun")
# torchrun forwards these to its workers (SIGUSR2 only when listed).
FORWARDED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR2"


@dataclass(kw_only=True)
class SlurmConfig:
    """How launch/submit.py asks Slurm for the job (ignored by launch/train.py)."""

    nodes: int = 1
    """Nodes (--nodes)."""
    gpus_per_node: int = 0
    """GPUs per node (--gpus-per-node); 0 asks for none (CPU jobs)."""
    procs_per_node: int | None = None
    """Training processes per node; None: gpus_per_node, or 1 without GPUs."""
    launcher: str = "torchrun"
    """torchrun (one agent per node, c10d rendezvous) | srun (one Slurm task per rank)."""
    partition: str | None = None
    """--partition."""
    account: str | None = None
    """--account."""
    qos: str | None = None
    """--qos."""
    constraint: str | None = None
    """--constraint."""
    time: str = "01:00:00"
    """Time limit per attempt (--time), in Slurm's formats (minutes, HH:MM:SS, D-HH:MM:SS)."""
    cpus_per_task: int | None = None
    """--cpus-per-task (torchrun: per node, for all its workers)."""
    mem: str | None = None
    """--mem per node, e.g. 200G; None: the partition's default."""
    signal_lead_s: int = 300
    """Seconds before the time limit that Slurm sends USR2 (--signal=USR2@lead): at least
    one step and one checkpoint save, and Slurm may send it up to a minute early. 0: no
    signal (Loom still stops before the job's end time, read at start)."""
    max_retries: int = 3
    """Requeues after failures worth a retry (not config errors), over the job's life."""
    max_restarts: int = 0
    """torchrun --max-restarts: worker crashes restarted in place (resuming the last
    checkpoint) before the attempt counts as failed."""
    job_name: str | None = None
    """--job-name; None: loom-<model.name>."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before training (module load, source a venv, exports)."""
    sbatch_args: list[str] = field(default_factory=list)
    """More sbatch options, each as on the command line (e.g. --exclusive)."""
    python: str | None = None
    """The Python on the compute nodes; None: the one running launch/submit.py."""

    def validate(self) -> None:
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ValueError("slurm.nodes must be >= 1 and slurm.gpus_per_node >= 0")
        if self.procs_per_node is not None and self.procs_per_node < 1:
            raise ValueError(f"slurm.procs_per_node={self.procs_per_node} must be >= 1")
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"slurm.launcher={self.launcher!r} must be torchrun or srun")
        if min(self.signal_lead_s, self.max_retries, self.max_restarts) < 0:
            raise ValueError(
                "slurm.signal_lead_s, slurm.max_retries and slurm.max_restarts must be >= 0"
            )
        if self.max_restarts and self.launcher != "torchrun":
            raise ValueError("slurm.max_restarts needs slurm.launcher=torchrun")

    @property
    def procs(self) -> int:
        return self.procs_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs


def sbatch_script(
    cfg: SlurmConfig,
    *,
    run_dir: Path,
    project: Path,
    python: str,
    train_args: list[str],
    job_name: str,
) -> str:
    """The batch script of a job training `launch/train.py train_args` in `run_dir`."""
    q = shlex.quote
    run = q(str(run_dir))
    options = [
        f"--job-name={job_name}",
        f"--nodes={cfg.nodes}",
        f"--ntasks-per-node={1 if cfg.launcher == 'torchrun' else cfg.procs}",
        f"--time={cfg.time}",
        *([f"--signal=USR2@{cfg.signal_lead_s}"] if cfg.signal_lead_s else []),
        "--requeue",
        "--open-mode=append",
        f"--output={run_dir}/slurm/%j.out",
    ]
    if cfg.gpus_per_node:
        options.append(f"--gpus-per-node={cfg.gpus_per_node}")
    for key in ("partition", "account", "qos", "constraint", "cpus_per_task", "mem"):
        value = getattr(cfg, key)
        if value is not None:
            options.append(f"--{key.replace('_', '-')}={value}")
    options += cfg.sbatch_args
    train = " ".join(q(a) for a in ["launch/train.py", *train_args, f"trainer.out_dir={run_dir}"])
    if cfg.launcher == "torchrun":
        launch = (
            f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 {q(python)} -m torch.distributed.run "
            f'--nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node={cfg.procs} '
            f'--rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="$SLURM_JOB_ID" '
            f"--max-restarts={cfg.max_restarts} {train}"
        )
    else:
        launch = f"srun --kill-on-bad-exit=1 {q(python)} {train}"
    lines = [
        "#!/bin/bash",
        f"# Written by launch/submit.py: trains in {run_dir} and requeues itself until done",
        "# (trainer/slurm.py says what each exit state leads to).",
        *(f"#SBATCH {o}" for o in options),
        "set -uo pipefail",
        "# Preemption sends SIGTERM to the batch shell too: outlive the training step to requeue.",
        "trap 'echo \"batch shell: SIGTERM (training saves and stops)\"' TERM",
        f"cd {q(str(project))}",
        f"RUN_DIR={run}",
        'mkdir -p "$RUN_DIR/slurm"',
        'export LOOM_EXIT_STATE="$RUN_DIR/exit_state.json"',
        'RESTART="${SLURM_RESTART_COUNT:-0}"',
        'LOG="$RUN_DIR/slurm/$SLURM_JOB_ID.$RESTART.log"',
        "# The job's end time, for Loom's deadline (Slurm before 23.02 does not export it).",
        'if [ -z "${SLURM_JOB_END_TIME:-}" ]; then',
        '  END="$(squeue -h -j "$SLURM_JOB_ID" -o %e)"',
        '  SLURM_JOB_END_TIME="$(date -d "$END" +%s 2>/dev/null || echo 0)"',
        "  export SLURM_JOB_END_TIME",
        "fi",
        'HEAD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        'PORT="$((20000 + SLURM_JOB_ID % 20000))"',
        f"export TORCHELASTIC_SIGNALS_TO_HANDLE={FORWARDED_SIGNALS}",
        *cfg.setup,
        'rm -f "$LOOM_EXIT_STATE"',
        'echo "job $SLURM_JOB_ID restart $RESTART on $SLURM_JOB_NODELIST: log $LOG"',
        f'{launch} </dev/null >>"$LOG" 2>&1 &',
        "TRAIN=$!",
        "# `wait` returns early when a trapped signal arrives: wait again until training exits.",
        'CODE=0; wait "$TRAIN" || CODE=$?',
        'while kill -0 "$TRAIN" 2>/dev/null; do CODE=0; wait "$TRAIN" || CODE=$?; done',
        f'ACTION="$({q(python)} -m trainer.slurm after-run --exit-state "$LOOM_EXIT_STATE" '
        f'--code "$CODE" --max-retries {cfg.max_retries} --failures "$RUN_DIR/slurm/failures")"',
        'echo "training exited $CODE: $ACTION"',
        'case "$ACTION" in',
        '  requeue) scontrol requeue "$SLURM_JOB_ID"; exit 0 ;;',
        "  done) exit 0 ;;",
        "  *) exit 1 ;;",
        "esac",
    ]
    return "\n".join(lines) + "\n"


def after_run(exit_state: Path, *, code: int, max_retries: int, failures: Path) -> str:
    """requeue | done | stop, from the exit state the training left (or its absence)."""
    state = read_exit_state(exit_state)
    if state is None:
        error = f"training exited {code} without an exit state (a rank killed, out of memory?)"
        env = LaunchEnv("single")
        write_exit_state(exit_state, reason="failed", step=None, env=env, error=error)
        state = read_exit_state(exit_state)
    reason = state["reason"]
    if reason == "done":
        return "done"
    if reason in ("preempted", "time_limit"):
        return "requeue"
    if not state.get("retry", True):
        return "stop"
    past = failures.read_text().splitlines() if failures.exists() else []
    if len(past) >= max_retries:
        return "stop"
    with open(failures, "a") as f:
        f.write(json.dumps({"code": code, "error": state.get("error")}) + "\n")
    return "requeue"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m trainer.slurm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    after = sub.add_parser("after-run", help="print requeue, done or stop for the batch script")
    after.add_argument("--exit-state", type=Path, required=True)
    after.add_argument("--code", type=int, required=True)
    after.add_argument("--max-retries", type=int, required=True)
    after.add_argument("--failures", type=Path, required=True)
    args = parser.parse_args(argv)
    print(
        after_run(
            args.exit_state, code=args.code, max_retries=args.max_retries, failures=args.failures
        )
    )


if __name__ == "__main__":
    main()
