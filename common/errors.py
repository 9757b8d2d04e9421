"""Errors a user can cause and fix: a bad config, corpus, shard or checkpoint.

Each is raised with a one-line message naming the file, field or value at fault. The
launchers report a `LoomError` as that one line and exit with code 2 (no traceback unless
LOOM_DEBUG=1 or HYDRA_FULL_ERROR=1); any other exception is a bug and keeps its
traceback. They subclass the built-in types callers already catch (`ValueError`,
`RuntimeError`), so existing handlers keep working.
"""

from __future__ import annotations

import os
import sys

USER_ERROR_EXIT = 2
"""Exit code of a run stopped by a user-fixable error (1 is left to bugs and crashes)."""


class LoomError(Exception):
    """Base of every anticipated, user-fixable failure."""


class ConfigError(LoomError, ValueError):
    """A config field or a combination of fields that cannot run."""


class DataError(LoomError, ValueError):
    """A corpus, manifest, shard or row that cannot be read as Loom data."""


class CheckpointError(LoomError, RuntimeError):
    """A checkpoint that is missing, incomplete, damaged or of another model."""


def debug_requested() -> bool:
    """LOOM_DEBUG=1 (or Hydra's HYDRA_FULL_ERROR=1): show tracebacks, not one line."""
    return any(os.environ.get(name) == "1" for name in ("LOOM_DEBUG", "HYDRA_FULL_ERROR"))


def one_line(error: BaseException | str) -> str:
    """An error's message on one line. An error raised in a DataLoader worker arrives with
    the worker's traceback in its message; the worker's own message is kept."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if any(line.startswith("Original Traceback") for line in lines):
        return lines[-1].partition(": ")[2] or lines[-1]  # "module.Class: message"
    return " ".join(lines)


def report(error: BaseException, *, prog: str, code: int = USER_ERROR_EXIT) -> int:
    """For command-line tools: print `prog: error: message` on stderr and return the exit
    code; under debug_requested() re-raise the error with its traceback instead."""
    if debug_requested():
        raise error
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
    return code
