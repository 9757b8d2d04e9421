"""Stopping a run on purpose: signals, the time limit, the ranks' agreement, the exit state.

Slurm ends a job with SIGTERM (preemption, the time limit; SIGKILL follows after KillWait)
and, with `--signal=USR2@T`, warns T seconds before the time limit. `StopRequest` turns
either signal into a flag and nothing else: the loop asks at every step boundary (and
between evaluation batches) whether any rank has it, with one collective, so every rank
stops at the same step, saves the same checkpoint and exits 0. A second signal exits at
once, unless it comes within REPEAT_S of the first: Slurm signals every process of a job
step and torchrun forwards the signal again, so copies arrive within moments. Without
any signal, a deadline (`trainer.time_limit` seconds from the start, or the Slurm job's
end time, SLURM_JOB_END_TIME) stops the run when the next step and a save would no
longer fit before it.

`<run>/exit_state.json` says why the run stopped (LOOM_EXIT_STATE names another file):

    {"reason": "preempted" | "time_limit" | "done" | "failed", "step": N, "retry": bool,
     "job_id": ..., "restart_count": ..., "attempt": ..., "error": ..., "time": ...}

preempted and time_limit: a checkpoint of `step` is on disk, resume it (requeue); done:
max_steps reached; failed: an exception (its one-line `error`), a hang, or a config
error; `retry` is false for the errors a rerun would only repeat (exit code 2).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from parallel.launch_env import LaunchEnv

__all__ = ["REASONS", "StopRequest", "exit_state_path", "read_exit_state", "write_exit_state"]

REASONS = ("done", "time_limit", "preempted", "failed")
_SIGNALS = {"USR1": signal.SIGUSR1, "USR2": signal.SIGUSR2}
# What each signal means: SIGTERM is preemption (or the end itself); the user signal is the
# early warning `--signal=USR2@T` sends before the time limit.
_REASON_CODE = {None: 0, "time_limit": 1, "preempted": 2}
REPEAT_S = 5.0  # a signal again within this many seconds is a copy of the first


class StopRequest:
    """The local wish to stop (a signal received, a deadline near) and its agreement.

    `deadline`: a time.time() by which the process must have saved and exited, or None.
    """

    def __init__(self, *, user_signal: str | None, deadline: float | None, margin_s: float):
        if user_signal is not None and user_signal not in _SIGNALS:
            raise ValueError(f"trainer.stop_signal={user_signal!r} must be USR1, USR2 or null")
        self.signals = [signal.SIGTERM] + ([_SIGNALS[user_signal]] if user_signal else [])
        self.deadline, self.margin_s = deadline, margin_s
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Handle the stop signals (main thread only, where Python runs handlers)."""
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.received is not None:
            # Slurm signals every process of a job step and torchrun forwards the signal
            # again: copies within REPEAT_S are the same request; a later one ends at once.
            if now - self._received_at > REPEAT_S:
                os._exit(128 + signum)
            if signum == signal.SIGTERM:  # preemption outranks an earlier warning
                self.received = signum
            return
        self.received, self._received_at = signum, now

    def local_reason(
        self, *, lead_s: float = 0.0, progressed: bool = True, deadline: bool = True
    ) -> str | None:
        """Why this rank wants to stop now, if it does: a signal, or (with `deadline`) the
        deadline closer than `lead_s` (the next step and a save) plus the margin. Until
        this process has trained a step (`progressed`), only preemption counts: a time limit
        too close to train anything would otherwise requeue the job forever."""
        if self.received == signal.SIGTERM:
            return "preempted"
        if not progressed:
            return None
        if self.received is not None:
            return "time_limit"
        near = self.deadline is not None and time.time() + lead_s + self.margin_s >= self.deadline
        return "time_limit" if deadline and near else None

    def agreed(self, max_over_ranks, **when) -> str | None:
        """The reason to stop that some rank has (preempted outranks time_limit), the same
        on every rank: `max_over_ranks(int) -> int` is one collective; `when` as for
        local_reason."""
        local = self.local_reason(**when)
        code = max_over_ranks(_REASON_CODE[local])
        return next(reason for reason, c in _REASON_CODE.items() if c == code)


def deadline_from(time_limit_s: float | None, *, started: float, env: dict | None = None):
    """The earlier of `started + time_limit_s` and the Slurm job's end time (epoch seconds in
    SLURM_JOB_END_TIME), or None."""
    env = os.environ if env is None else env
    candidates = []
    if time_limit_s:
        candidates.append(started + time_limit_s)
    end = env.get("SLURM_JOB_END_TIME", "")
    if end.isdigit() and int(end) > 0:
        candidates.append(float(end))
    return min(candidates) if candidates else None


def exit_state_path(run_dir: Path | str) -> Path:
    return Path(os.environ.get("LOOM_EXIT_STATE") or Path(run_dir) / "exit_state.json")


def attempt_id(env: LaunchEnv) -> str:
    """One attempt of a job: the same on every rank, new after each requeue or restart."""
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if env.job_id:
        return f"slurm:{env.job_id}:{env.restart_count}:{run}"
    if run:
        return f"torchrun:{run}:{env.restart_count}"
    return f"pid:{os.getpid()}"


def read_exit_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_exit_state(
    path: Path,
    *,
    reason: str,
    step: int | None,
    env: LaunchEnv,
    error: str | None = None,
    retry: bool = True,
) -> None:
    """Write the exit state atomically (a reader sees the old file or the new one). A failure
    never replaces another failure of the same attempt: the first rank to fail says why,
    not the ranks that lost their peer afterwards."""
    assert reason in REASONS, reason
    attempt = attempt_id(env)
    if reason == "failed":
        old = read_exit_state(path)
        if old and old.get("reason") == "failed" and old.get("attempt") == attempt:
            return
    state = {
        "reason": reason,
        "step": step,
        "retry": retry if reason == "failed" else reason != "done",
        "job_id": env.job_id,
        "restart_count": env.restart_count,
        "attempt": attempt,
        "error": error,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    os.replace(tmp, path)
