"""Stopping on purpose and failing visibly, as launch/train.py does for a user: a signal to
one rank saves and stops every rank and the resumed run ends bit-identical to an
uninterrupted one; the time limit saves first; a killed rank, a config error and a double
launch end in an exit state that says so; sweep points train in their own directories."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import torch
import yaml

from tests.conftest import ROOT, final_weights, read_metrics, train_command, worker_pids

TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=2",
    "model.max_seq_len=64",
    "model.dropout=0.1",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.log_every=1",
    "trainer.eval_every=4",
    "trainer.eval_samples=16",
    "optim.warmup_steps=2",
    "optim.decay_steps=40",
]


def exit_state(run_dir: Path) -> dict:
    return json.loads((run_dir / "exit_state.json").read_text())


def start_and_signal(
    train_env, overrides, out: Path, *, nproc: int, at_step: int, sig, rank=1, torchrun_args=()
):
    """Start a run, send `sig` to one rank's process once `at_step` is logged; wait."""
    proc = subprocess.Popen(
        train_command(
            *overrides, f"trainer.out_dir={out}", nproc=nproc, torchrun_args=torchrun_args
        ),
        cwd=ROOT,
        env=train_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 300
    metrics = out / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(
            r.get("step", 0) >= at_step for r in map(json.loads, metrics.read_text().splitlines())
        ):
            break
        time.sleep(0.05)
    pids = worker_pids(out)
    assert rank in pids, (pids, proc.poll())
    sent = time.monotonic()
    os.kill(pids[rank], sig)
    output, _ = proc.communicate(timeout=300)
    return proc.returncode, output, time.monotonic() - sent


def test_sigterm_to_one_rank_saves_every_rank_and_resumes_bit_exact(train_cli, train_env, tmp_path):
    common = [*TINY, "trainer.max_steps=14", "trainer.save_every=100"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train_cli(*common, f"trainer.out_dir={whole}", nproc=2)
    code, output, _ = start_and_signal(
        train_env, common, split, nproc=2, at_step=5, sig=signal.SIGTERM
    )
    assert code == 0, output
    state = exit_state(split)
    stopped = state["step"]
    assert state["reason"] == "preempted" and state["retry"] and 5 <= stopped < 14, state
    assert [p.name for p in (split / "checkpoints").iterdir()] == [f"step_{stopped}"]
    assert f"stopping at step {stopped}: preempted" in output

    proc = train_cli(*common, f"trainer.out_dir={split}", nproc=2)
    assert f"resumed from {split / 'checkpoints' / f'step_{stopped}'}" in proc.stdout
    assert exit_state(split)["reason"] == "done" and exit_state(split)["step"] == 14
    a, b = read_metrics(whole), read_metrics(split)
    train_a = [(r["step"], r["loss"], r["grad_norm"]) for r in a if "loss" in r]
    train_b = [(r["step"], r["loss"], r["grad_norm"]) for r in b if "loss" in r]
    assert [s for s, _, _ in train_b] == list(range(1, 15))  # no gap, no duplicate
    assert train_a == train_b
    # An evaluation the stop interrupted is dropped; every other one is the same.
    val_a = {r["step"]: r["val_loss"] for r in a if "val_loss" in r}
    val_b = {r["step"]: r["val_loss"] for r in b if "val_loss" in r}
    assert val_b and all(val_a[s] == v for s, v in val_b.items())
    assert set(val_a) - set(val_b) <= {stopped}
    wa, wb = final_weights(whole), final_weights(split)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_time_limit_saves_and_stops_before_it(train_cli, tmp_path):
    out = tmp_path / "limited"
    start = time.monotonic()
    train_cli(
        *TINY,
        "trainer.max_steps=100000",
        "trainer.time_limit=6",
        "trainer.stop_margin_s=1",
        f"trainer.out_dir={out}",
    )
    assert time.monotonic() - start < 60
    state = exit_state(out)
    assert state["reason"] == "time_limit" and state["step"] > 0, state
    assert (out / "checkpoints" / f"step_{state['step']}" / "dcp").is_dir()
    assert read_metrics(out)[-1]["step"] == state["step"]


def test_a_killed_rank_fails_the_job_within_seconds(train_env, tmp_path):
    out = tmp_path / "killed"
    common = [*TINY, "trainer.max_steps=100000", "trainer.eval_every=0"]
    code, output, seconds = start_and_signal(
        train_env, common, out, nproc=2, at_step=3, sig=signal.SIGKILL
    )
    assert code != 0 and seconds < 30, (code, seconds, output[-2000:])
    state = exit_state(out)
    assert state["reason"] == "failed" and state["retry"] is True, state


def test_config_errors_are_recorded_as_not_worth_a_retry(train_cli, tmp_path):
    state = tmp_path / "state.json"
    env = {"LOOM_EXIT_STATE": str(state)}
    proc = train_cli("trainer.max_steps=-1", env=env, check=False)
    assert proc.returncode == 2
    recorded = json.loads(state.read_text())
    assert recorded["reason"] == "failed" and recorded["retry"] is False
    assert "trainer.max_steps=-1" in recorded["error"]
    state.unlink()
    proc = train_cli("+model=no_such_model", env=env, check=False)
    assert proc.returncode == 2 and "no_such_model" in json.loads(state.read_text())["error"]


def test_double_launch_is_refused_with_its_name(train_cli, tmp_path):
    """What each of `srun -n 2 torchrun --standalone --nproc_per_node 1 ...` sees."""
    env = {
        "TORCHELASTIC_RUN_ID": "x",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "GROUP_WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        "SLURM_JOB_ID": "5",
        "SLURM_STEP_NUM_TASKS": "2",
    }
    proc = train_cli(f"trainer.out_dir={tmp_path}", env=env, check=False)
    assert proc.returncode == 2
    assert "double launch: 2 Slurm tasks" in proc.stderr + proc.stdout


def test_sweep_points_train_in_their_own_directories(train_cli, tmp_path):
    train_cli(
        "-m", "optim.lr=1e-3,3e-4", *TINY, "trainer.max_steps=3", f"trainer.out_dir={tmp_path}"
    )
    for point, lr in (("0", 1e-3), ("1", 3e-4)):
        run = tmp_path / point
        assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]
        assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == lr
        assert exit_state(run)["reason"] == "done"
