"""Stop signals, the deadline, the ranks' agreement (gloo), the exit state and the watchdog."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch.multiprocessing as mp

from parallel.launch_env import LaunchEnv
from tests.conftest import ROOT, free_port, spawn_ranks
from trainer.stop import StopRequest, deadline_from, read_exit_state, write_exit_state


def test_signals_set_the_flag_and_name_the_reason():
    stop = StopRequest(user_signal="USR2", deadline=None, margin_s=0)
    stop.install()
    try:
        assert stop.local_reason() is None
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.local_reason() == "time_limit"  # the early warning before the limit
    finally:
        stop.uninstall()
    stop = StopRequest(user_signal=None, deadline=None, margin_s=0)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.local_reason() == "preempted"
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_copies_of_a_signal_are_one_request_and_a_later_one_exits_at_once():
    code = textwrap.dedent(
        """
        import os, signal, sys, time
        sys.path.insert(0, sys.argv[1])
        from trainer.stop import StopRequest
        stop = StopRequest(user_signal="USR2", deadline=None, margin_s=0)
        stop.install()
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)  # a copy (Slurm and torchrun both deliver)
        print(stop.local_reason(), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)  # a copy too, but the stronger reason
        print(stop.local_reason(), flush=True)
        time.sleep(5.5)
        os.kill(os.getpid(), signal.SIGTERM)  # a second request: no more grace
        time.sleep(30)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60
    )
    assert proc.stdout.split() == ["time_limit", "preempted"]
    assert proc.returncode == 128 + signal.SIGTERM


def test_deadline_leaves_room_for_the_next_step_and_a_save():
    now = time.time()
    stop = StopRequest(user_signal=None, deadline=now + 100, margin_s=10)
    assert stop.local_reason(lead_s=50) is None
    assert stop.local_reason(lead_s=95) == "time_limit"
    assert stop.local_reason(lead_s=95, progressed=False) is None  # nothing trained yet
    assert deadline_from(60, started=now, env={}) == now + 60
    end = {"SLURM_JOB_END_TIME": str(int(now) + 30)}
    assert deadline_from(60, started=now, env=end) == int(now) + 30
    assert deadline_from(None, started=now, env={}) is None


def _agree_worker(rank: int, port: int, signalled: int, queue) -> None:
    import torch.distributed as dist

    from parallel.dist import World, max_over_ranks

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=3)
    world = World(rank=rank, world_size=3, local_rank=rank, dp_rank=rank, dp_size=3, device=None)
    stop = StopRequest(user_signal="USR2", deadline=None, margin_s=0)
    stop.install()
    before = stop.agreed(lambda v: max_over_ranks(v, world))
    if rank == signalled:
        os.kill(os.getpid(), signal.SIGUSR2)
    dist.barrier()
    after_usr2 = stop.agreed(lambda v: max_over_ranks(v, world))
    if rank == 0:
        os.kill(os.getpid(), signal.SIGTERM)  # a second rank, a stronger reason
    dist.barrier()
    after_term = stop.agreed(lambda v: max_over_ranks(v, world))
    queue.put((rank, before, after_usr2, after_term))
    dist.destroy_process_group()


def test_ranks_agree_on_the_stop_one_rank_was_told_of():
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    spawn_ranks(_agree_worker, 3, free_port(), 2, queue)
    results = sorted(queue.get() for _ in range(3))
    assert results == [(r, None, "time_limit", "preempted") for r in range(3)]


def test_exit_state_is_atomic_and_keeps_the_first_failure(tmp_path):
    path = tmp_path / "exit_state.json"
    env = LaunchEnv(launcher="single", job_id="12", restart_count=1)
    write_exit_state(path, reason="failed", step=None, env=env, error="first", retry=False)
    write_exit_state(path, reason="failed", step=None, env=env, error="peer lost")
    state = read_exit_state(path)
    assert (state["reason"], state["error"], state["retry"]) == ("failed", "first", False)
    assert (state["job_id"], state["restart_count"]) == ("12", 1)
    write_exit_state(path, reason="preempted", step=7, env=env)
    assert json.loads(path.read_text())["reason"] == "preempted"
    assert read_exit_state(path)["retry"] is True
    requeued = LaunchEnv(launcher="single", job_id="12", restart_count=2)
    write_exit_state(path, reason="failed", step=None, env=requeued, error="again")
    assert read_exit_state(path)["error"] == "again"
    assert [p.name for p in tmp_path.iterdir()] == ["exit_state.json"]


@pytest.mark.parametrize("timeout", ["1.5", "None"])
def test_watchdog_writes_every_stack_and_exits(tmp_path, timeout):
    """No beat after the first: the stacks (the stuck function named) and the exit state
    are written and the process exits 1; with no fixed timeout, 20x the median step with
    a floor (here 1 s)."""
    code = textwrap.dedent(
        f"""
        import sys, threading, time
        sys.path.insert(0, {str(ROOT)!r})
        from trainer.watchdog import Watchdog
        dog = Watchdog({str(tmp_path)!r}, rank=3, timeout_s={timeout}, min_timeout_s=1.0,
                       poll_s=0.1, on_hang=lambda why: print("on_hang", why, flush=True))
        dog.start()
        for _ in range(3):
            dog.beat(0.01)
        with dog.paused_for():
            time.sleep(2.5)  # a long save is not a hang
        print("after save", flush=True)

        def stuck_in_a_collective():
            time.sleep(60)

        threading.Thread(target=time.sleep, args=(60,), name="side", daemon=True).start()
        stuck_in_a_collective()
        """
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert time.monotonic() - start < 20
    assert "after save" in proc.stdout and "on_hang hang: no progress" in proc.stdout
    stacks = (tmp_path / "hang" / "rank3.txt").read_text()
    assert (
        "stuck_in_a_collective" in stacks and stacks.count("hread 0x") == 3
    )  # main, side, watchdog
