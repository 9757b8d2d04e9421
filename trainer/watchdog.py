"""Hang detection: a thread that ends the process when training stops making progress.

The loop calls `beat()` after every step and evaluation batch. When none comes for
`timeout_s` (by default 20x the median step so far, at least `min_timeout_s`), the thread
writes the stack of every thread of this process to `<run>/hang/rank<R>.txt`, calls
`on_hang` (which records the failure in the exit state) and exits the process with code 1.
Every rank runs its own watchdog, so a rank waiting on a stuck peer and the stuck peer
both leave their stacks. It is not armed before the first step (start-up is bounded by
parallel.init_timeout_s) and is paused around checkpoint saves (bounded by the
collective timeout).
"""

from __future__ import annotations

import faulthandler
import os
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from common.log import get_logger

__all__ = ["Watchdog"]

log = get_logger("loom.watchdog")


class Watchdog:
    def __init__(
        self,
        run_dir: Path,
        *,
        rank: int,
        timeout_s: float | None,
        min_timeout_s: float = 120.0,
        on_hang: Callable[[str], None] = lambda reason: None,
        poll_s: float = 1.0,
    ):
        self.path = Path(run_dir) / "hang" / f"rank{rank}.txt"
        self.fixed, self.min_timeout_s = timeout_s, min_timeout_s
        self.on_hang, self.poll_s = on_hang, poll_s
        self.steps: list[float] = []
        self.last: float | None = None  # armed once the first beat comes
        self.paused = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loom-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()

    def beat(self, step_seconds: float | None = None) -> None:
        """Progress: a step (its duration feeds the default timeout) or a smaller unit."""
        if step_seconds is not None:
            self.steps = (self.steps + [step_seconds])[-100:]
        self.last = time.monotonic()

    @contextmanager
    def paused_for(self):
        """Not a hang while inside (a checkpoint save); the clock restarts after."""
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1
            self.last = time.monotonic() if self.last is not None else None

    def timeout(self) -> float:
        if self.fixed is not None:
            return self.fixed
        median = statistics.median(self.steps) if self.steps else 0.0
        return max(self.min_timeout_s, 20 * median)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            last = self.last
            if last is None or self.paused:
                continue
            waited = time.monotonic() - last
            if waited > self.timeout():
                self._fire(waited)

    def _fire(self, waited: float) -> None:
        reason = (
            f"hang: no progress for {waited:.0f} s (trainer.hang_timeout_s "
            f"{self.timeout():.0f} s); every thread's stack is in {self.path}"
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            f.write(reason + "\n\n")
            f.flush()
            faulthandler.dump_traceback(file=f, all_threads=True)
        log.error("%s", reason)
        try:
            self.on_hang(reason)
        finally:
            os._exit(1)
