"""Errors a user can cause and fix: a bad config, corpus, shard or checkpoint.

Each is raised with a one-line message naming the file, field or value at fault. The
launchers report a `LoomError` as that one line and exit with code 2 (no traceback unless
LOOM_DEBUG=1 or HYDRA_FULL_ERROR=1); any other exception is a bug and keeps its
traceback. They subclass the built-in types callers already catch (`ValueError`,
`RuntimeError`), so existing handlers keep working.
"""

from __future__ import annotations


class LoomError(Exception):
    """Base of every anticipated, user-fixable failure."""


class ConfigError(LoomError, ValueError):
    """A config field or a combination of fields that cannot run."""


class DataError(LoomError, ValueError):
    """A corpus, manifest, shard or row that cannot be read as Loom data."""


class CheckpointError(LoomError, RuntimeError):
    """A checkpoint that is missing, incomplete, damaged or of another model."""
