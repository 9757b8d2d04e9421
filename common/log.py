"""The one logging helper: rank-prefixed records, rank-0-only messages, one-time warnings."""

from __future__ import annotations

import logging
import os
import sys

_warned: set[str] = set()


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def setup_logging(level: int = logging.INFO) -> None:
    """Send every logger's records to stdout as `[rank N] message`; safe to call twice."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[rank {rank()}] %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)


def get_logger(name: str = "loom") -> logging.Logger:
    return logging.getLogger(name)


def log_rank0(msg: str, *args: object, logger: logging.Logger | None = None) -> None:
    if rank() == 0:
        (logger or get_logger()).info(msg, *args)


def warn_once(msg: str, *, logger: logging.Logger | None = None) -> None:
    """Warn once per job: on rank 0, the first time this exact message is seen. Every rank
    usually reaches the same warning; one line says it (a rank-specific problem is logged
    with `get_logger().warning` instead)."""
    if rank() == 0 and msg not in _warned:
        _warned.add(msg)
        (logger or get_logger()).warning("warning: %s", msg)
