"""How Loom's command-line programs end: flushed, with their status, without teardown."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from contextlib import suppress
from typing import NoReturn

__all__ = ["end_process", "exit_after", "exit_code"]


def exit_after(main: Callable[[], int | None]) -> NoReturn:
    """Run `main` and end the process with its status: what it returns (None: 0) or what it
    passes to sys.exit. Any other exception propagates with its traceback, as a bug should."""
    try:
        code = main() or 0
    except SystemExit as exc:
        code = exit_code(exc)
    end_process(code)


def exit_code(exc: SystemExit) -> int:
    """The status sys.exit(arg) asks for: 0 for None, the int, else 1 (the text printed)."""
    if exc.code is None or isinstance(exc.code, int):
        return exc.code or 0
    print(exc.code, file=sys.stderr)
    return 1


def end_process(code: int) -> NoReturn:
    """Exit with `code` once the output is flushed, without the interpreter's teardown.

    A program has written all it owes by then (a run: its checkpoint, metrics and exit
    state, and it has left its process groups). Teardown would only free modules while
    threads that libraries start outside Python are still alive (Arrow's thread pools,
    gloo's work queues); such a thread touching Python then (dropping the last reference
    to an object) is ended by pthread_exit inside C++ code that must not unwind, and a
    program that succeeded aborts with "terminate called without an active exception"
    (status -6) now and then.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):
            stream.flush()
    os._exit(code)
