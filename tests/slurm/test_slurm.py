"""Loom on a real (one-node) Slurm: jobs written by launch/submit.py train like one process,
survive preemption and their time limit by saving, requeueing and resuming bit-exact, fail
fast with the retry budget honoured, refuse a double launch, and sweep through
hydra-submitit-launcher. The cluster is brought up by tests/slurm/cluster.py (installing
Slurm when absent and this is root); without it the tier is skipped with the reason."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import (
    ROOT,
    assert_same_losses,
    assert_same_weights,
    final_weights,
    read_metrics,
    worker_pids,
)
from tests.slurm.cluster import Unavailable, down, up

pytestmark = pytest.mark.slurm

COMMON = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=2",
    "model.max_seq_len=64",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.log_every=1",
    "trainer.eval_every=5",
    "trainer.eval_samples=16",
    "trainer.save_every=100",
    "optim.warmup_steps=2",
    "optim.decay_steps=40",
    "trainer.max_steps=20",
]
# Over 20 AdamW steps the attention key biases, whose true gradient is zero, move by the
# sign of rounding noise (about lr per step): parameters agree to 5e-6, losses to 1e-5.
ATOL = 5e-6
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, loom_cache) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("slurm") / "cluster"
    try:
        env = up(directory)
    except Unavailable as exc:
        pytest.skip(f"no one-node Slurm here: {exc}")
    yield env
    down(directory)


@pytest.fixture()
def slurm_env(cluster, train_env) -> dict[str, str]:
    return {**train_env, **cluster}


def submit(env: dict, out: Path, *overrides: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "submit.py"), *overrides, f"trainer.out_dir={out}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    return re.search(r"submitted job (\d+)", proc.stdout).group(1)


def sbatch_wrap(env: dict, script: str, *, tasks: int, output: Path) -> str:
    """Submit a one-line batch script of `tasks` tasks run from the repository; its job id."""
    cmd = ["sbatch", "--parsable", "-n", str(tasks), f"--output={output}", f"--chdir={ROOT}"]
    proc = subprocess.run(
        [*cmd, "--wrap", script], env=env, capture_output=True, text=True, check=True
    )
    return proc.stdout.strip()


def job_info(env: dict, job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_final(env: dict, job_id: str, timeout: float = 240) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(env, job_id)
        if info.get("JobState") in FINAL:
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job_info(env, job_id).get('JobState')}")


def wait_step(out: Path, step: int, *, after: int = 0, timeout: float = 120) -> None:
    """Until metrics.jsonl holds a training record of `step` or later (beyond `after`)."""
    deadline = time.monotonic() + timeout
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline:
        if metrics.exists():
            steps = [r["step"] for r in map(json.loads, metrics.read_text().splitlines())]
            if steps and steps[-1] >= step and len(steps) > after:
                return
        time.sleep(0.1)
    raise AssertionError(f"{out} never logged step {step}")


def wait_log(path: Path, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} never said {text!r}")


def exit_state(out: Path) -> dict:
    return json.loads((out / "exit_state.json").read_text())


def logs(out: Path) -> str:
    return "".join(p.read_text() for p in sorted((out / "slurm").glob("*.log")))


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory, loom_cache) -> Path:
    """The torchrun-per-node job of COMMON (2 processes), run to the end once."""
    env = {**os.environ, "LOOM_CACHE": str(loom_cache), **cluster}
    out = tmp_path_factory.mktemp("uninterrupted")
    job = submit(env, out, *COMMON, "slurm.procs_per_node=2", "slurm.time=10")
    info = wait_final(env, job)
    assert info["JobState"] == "COMPLETED", (info, logs(out))
    return out


def test_torchrun_per_node_job_matches_one_process(uninterrupted, one_process):
    state = exit_state(uninterrupted)
    assert state["reason"] == "done" and state["step"] == 20 and state["job_id"]
    ref = one_process(*COMMON)
    assert_same_losses(ref, uninterrupted)
    assert_same_weights(ref, uninterrupted, atol=ATOL)


def test_srun_task_per_rank_job_matches_one_process(slurm_env, one_process, tmp_path):
    out = tmp_path / "srun"
    job = submit(slurm_env, out, *COMMON, "slurm.launcher=srun", "slurm.procs_per_node=2")
    assert wait_final(slurm_env, job)["JobState"] == "COMPLETED", logs(out)
    assert "global batch 8 = 2 ranks" in logs(out)
    ref = one_process(*COMMON)
    assert_same_losses(ref, out)
    assert_same_weights(ref, out, atol=ATOL)


@pytest.mark.parametrize("sig", ["USR2", "TERM"])
def test_a_signal_mid_run_saves_requeues_and_resumes_bit_exact(
    slurm_env, uninterrupted, tmp_path, sig
):
    out = tmp_path / sig
    job = submit(slurm_env, out, *COMMON, "slurm.procs_per_node=2", "slurm.time=10")
    wait_step(out, 4)
    subprocess.run(["scancel", f"--signal={sig}", job], env=slurm_env, check=True)
    info = wait_final(slurm_env, job)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, (info, logs(out))
    reason = {"USR2": "time_limit", "TERM": "preempted"}[sig]
    stopped = re.search(rf"stopping at step (\d+): {reason}", logs(out))
    assert stopped and f"resumed from {out}/checkpoints/step_{stopped.group(1)}" in logs(out)
    assert exit_state(out)["reason"] == "done" and exit_state(out)["restart_count"] == 1
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps == list(range(1, 21))  # no gap, no duplicate
    train = [(r["step"], r["loss"]) for r in read_metrics(uninterrupted) if "loss" in r]
    assert [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r] == train
    wa, wb = final_weights(uninterrupted), final_weights(out)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_time_limit_saves_first_and_the_job_resumes(slurm_env, uninterrupted, tmp_path):
    """One-minute attempts with 58 s kept in hand: each attempt trains its one step (a time
    limit never stops an attempt before it has trained), stops before the job's end time
    (exported by the script from squeue, no signal asked for), saves, and is requeued; the
    steps are those of the uninterrupted run, to the bit."""
    out = tmp_path / "limit"
    limited = ["trainer.stop_margin_s=58", "slurm.time=1", "slurm.signal_lead_s=0"]
    job = submit(
        slurm_env, out, *COMMON[:-1], "trainer.max_steps=3", *limited, "slurm.procs_per_node=2"
    )
    info = wait_final(slurm_env, job, timeout=300)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", (info, logs(out))
    for step in (1, 2):
        assert f"stopping at step {step}: time_limit" in logs(out)
        assert f"resumed from {out}/checkpoints/step_{step}" in logs(out)
    first = [(r["step"], r["loss"]) for r in read_metrics(uninterrupted) if "loss" in r][:3]
    assert [(r["step"], r["loss"]) for r in read_metrics(out) if "loss" in r] == first


def test_a_crashed_rank_ends_the_job_within_seconds_and_retries_are_counted(slurm_env, tmp_path):
    """Rank 1 killed in each attempt (as by the OOM killer): the job fails within seconds,
    is retried once (slurm.max_retries=1), then stops with the exit state `failed`."""
    out = tmp_path / "crash"
    overrides = [*COMMON[:-1], "trainer.max_steps=100000", "trainer.eval_every=0"]
    job = submit(slurm_env, out, *overrides, "slurm.procs_per_node=2", "slurm.max_retries=1")
    for attempt in range(2):
        wait_log(out / "slurm" / f"{job}.{attempt}.log", "step 2/")
        os.kill(worker_pids(out)[1], signal.SIGKILL)
        killed = time.monotonic()
        while True:
            info = job_info(slurm_env, job)
            if info.get("Restarts") != str(attempt) or info.get("JobState") != "RUNNING":
                break
            time.sleep(0.2)
        assert time.monotonic() - killed < 30
    info = wait_final(slurm_env, job)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", info
    state = exit_state(out)
    assert state["reason"] == "failed" and state["retry"] is True, state
    assert len((out / "slurm" / "failures").read_text().splitlines()) == 1


def test_a_double_launch_is_refused_by_name(slurm_env, tmp_path):
    script = (
        f"srun -n 2 {sys.executable} -m torch.distributed.run --standalone --nproc-per-node 1 "
        f"launch/train.py trainer.out_dir={tmp_path / 'run'}"
    )
    out = tmp_path / "double.out"
    info = wait_final(slurm_env, sbatch_wrap(slurm_env, script, tasks=2, output=out))
    assert info["JobState"] == "FAILED"
    assert out.read_text().count("double launch: 2 Slurm tasks") >= 2


def test_two_torchrun_agents_rendezvous_like_two_nodes(slurm_env, one_process, tmp_path):
    """Two agents (--nnodes 2, c10d rendezvous), one rank each, as on two nodes."""
    run = tmp_path / "two_nodes"
    overrides = " ".join([*COMMON, f"trainer.out_dir={run}"])
    script = (
        f"srun -n 2 {sys.executable} -m torch.distributed.run --nnodes 2 --nproc-per-node 1 "
        "--rdzv-backend c10d --rdzv-endpoint 127.0.0.1:$((20000 + SLURM_JOB_ID % 20000)) "
        f"--rdzv-id $SLURM_JOB_ID launch/train.py {overrides}"
    )
    out = tmp_path / "two.out"
    info = wait_final(slurm_env, sbatch_wrap(slurm_env, script, tasks=2, output=out))
    assert info["JobState"] == "COMPLETED", out.read_text()
    ref = one_process(*COMMON)
    assert_same_losses(ref, run)
    assert_same_weights(ref, run, atol=ATOL)


def test_a_sweep_through_submitit_lands_in_two_run_directories(slurm_env, train_cli, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e .[slurm]")
    sweep = ["-m", "hydra/launcher=slurm", "hydra.launcher.tasks_per_node=2", "optim.lr=1e-3,3e-4"]
    short = [*COMMON[:-1], "trainer.max_steps=3", "trainer.eval_every=0"]
    train_cli(*sweep, *short, f"trainer.out_dir={tmp_path}", env=slurm_env)
    for point in ("0", "1"):
        records = [r for r in read_metrics(tmp_path / point) if "loss" in r]
        assert [r["step"] for r in records] == [1, 2, 3]
        assert exit_state(tmp_path / point)["reason"] == "done"
        assert exit_state(tmp_path / point)["job_id"]
