#!/usr/bin/env python
"""Loom's training entry point.

python launch/train.py                              # tiny GPT, built-in corpus, CPU
python launch/train.py +model=gpt2_small optim=lamb precision=bf16 trainer.max_steps=50
torchrun --nproc_per_node 2 launch/train.py         # data parallel over 2 processes
python launch/train.py +model=gpt2_small --cfg job  # print the composed config

A mistake the user can fix (a config field, a corpus, a checkpoint: ValueError while the
config is checked, common.errors.LoomError at any time) is reported as one line naming the
field, file or value, with exit code 2; LOOM_DEBUG=1 or HYDRA_FULL_ERROR=1 shows its
traceback instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a plain checkout too
    sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from hydra.errors import CompactHydraException, MissingConfigException, OverrideParseException  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from common.errors import (  # noqa: E402
    USER_ERROR_EXIT,
    CheckpointError,
    ConfigError,
    DataError,
    LoomError,
    debug_requested,
    one_line,
)
from common.log import get_logger, log_rank0, rank, setup_logging  # noqa: E402
from parallel.dist import world_size_from_env  # noqa: E402
from trainer.config import (  # noqa: E402
    JobConfig,
    check_runnable,
    load_job_config,
    register_configs,
    validate_job,
)

log = get_logger("loom")

# Read once at import: the entry point below sets HYDRA_FULL_ERROR for its own use.
DEBUG = debug_requested()
LABELS = (
    (ConfigError, "config error"),
    (DataError, "data error"),
    (CheckpointError, "checkpoint error"),
    (LoomError, "error"),
    (ValueError, "config error"),  # raised by the config checks, before any work
)


def exit_user_error(
    exc: BaseException, *, label: str, every_rank_alike: bool, text: str | None = None
) -> None:
    """Report an anticipated error as one line, `label: text` (by default the exception's
    message; its traceback under DEBUG), and exit 2.

    every_rank_alike: every rank runs the same checks and hits the same error (nothing is
    distributed yet), so rank 0 speaks for all; otherwise the rank that hit it reports it.
    """
    if not (every_rank_alike and rank() != 0):
        if DEBUG:
            traceback.print_exception(type(exc), exc, exc.__traceback__)
        else:
            setup_logging()
            log.error("%s: %s", label, one_line(text if text is not None else exc))
    sys.exit(USER_ERROR_EXIT)


@contextmanager
def user_errors(*kinds: type[Exception], every_rank_alike: bool) -> Iterator[None]:
    """Turn the anticipated `kinds` of error into exit_user_error; others keep propagating."""
    try:
        yield
    except kinds as exc:
        label = next(name for kind, name in LABELS if isinstance(exc, kind))
        exit_user_error(exc, label=label, every_rank_alike=every_rank_alike)


def run(job: JobConfig) -> dict:
    # Imported once the config is known good: a config error or `--cfg job` needs neither
    # the process group nor the engines (about 2 s of imports).
    from parallel.dist import init_world, shutdown
    from trainer.loop import Trainer

    # init_world checks the device and the layout before it creates any process group.
    with user_errors(ValueError, LoomError, every_rank_alike=True):
        world = init_world(job.parallel, device_preference=job.trainer.device)
    try:
        with user_errors(LoomError, every_rank_alike=False):
            return Trainer(job, world).fit()
    finally:  # also on exit_user_error's SystemExit
        shutdown(world)


def load_and_check(cfg: DictConfig) -> tuple[JobConfig, int]:
    """The typed job and the world size it describes; ValueError names a bad field."""
    job = load_job_config(cfg)
    world_size = world_size_from_env()
    if job.trainer.dry_run:
        world_size = job.parallel.world_size_for_plan(world_size)
    validate_job(job, world_size=world_size)
    if not job.trainer.dry_run:
        check_runnable(job, world_size=world_size)
    return job, world_size


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    setup_logging()
    # Config errors are handled here, inside the task function, so that Hydra never wraps
    # them in its own report; every rank finds the same ones before any process group.
    with user_errors(ValueError, LoomError, every_rank_alike=True):
        job, world_size = load_and_check(cfg)
    if job.trainer.dry_run:
        # A dry run only describes the config (no process group, no data read): its
        # ValueErrors name a field, as the checks above do.
        from trainer.dry_run import dry_run

        with user_errors(ValueError, LoomError, every_rank_alike=True):
            dry_run(job, world_size=world_size)
        return
    summary = run(job)
    log_rank0(
        "done: step %d, loss %.4f%s",
        summary["step"],
        summary.get("loss", float("nan")),
        f", val loss {summary['val_loss']:.4f}" if "val_loss" in summary else "",
    )


def compose_error_line(exc: CompactHydraException) -> str:
    """One line for an error Hydra raises while composing: a bad override or a typo."""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and exc.options:
        return f"no config {exc.missing_cfg_file!r} in conf/; choose one of {exc.options}"
    text = one_line(exc)
    if isinstance(exc, OverrideParseException) and exc.override:
        text = f"{exc.override}: {text}"
    cause = str(exc.__cause__ or "").splitlines()
    if cause:  # OmegaConf's reason (wrong type, unknown key); its first line names it
        text = f"{text} ({cause[0].strip()})"
    return text


if __name__ == "__main__":
    register_configs()
    # Composition (overrides merged into the typed schema) happens inside hydra.main,
    # before the task function; with HYDRA_FULL_ERROR set Hydra re-raises its errors
    # instead of printing them, so they are reported here like every other config error.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except CompactHydraException as exc:
        exit_user_error(
            exc, label="config error", every_rank_alike=True, text=compose_error_line(exc)
        )
