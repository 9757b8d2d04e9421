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

Every end is recorded in `<run>/exit_state.json` (or the file LOOM_EXIT_STATE names; see
trainer/stop.py): done, preempted or time_limit (SIGTERM, the stop signal or the time limit:
saved, exit 0), failed (with the error, and retry false for exit code 2). In a multirun
(`-m`, local or through hydra-submitit-launcher) each point trains in its own directory,
<trainer.out_dir>/<point number>.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
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
from common.process import exit_after  # noqa: E402
from parallel.dist import world_size_from_env  # noqa: E402
from parallel.launch_env import launch_env  # noqa: E402
from trainer.config import (  # noqa: E402
    JobConfig,
    check_runnable,
    fit_micro_batch,
    load_job_config,
    register_configs,
    validate_job,
)
from trainer.stop import exit_state_path, write_exit_state  # noqa: E402

log = get_logger("loom")

# Read once at import: the entry point below sets HYDRA_FULL_ERROR for its own use.
DEBUG = debug_requested()
# How long a rank that leaves an error to rank 0 waits before it exits (it is normally
# stopped sooner, when rank 0 has exited).
SILENT_RANK_WAIT_S = 5.0
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
    The exit state records it as a failure a retry would only repeat.
    """
    if not (every_rank_alike and rank() != 0):
        line = one_line(text if text is not None else exc)
        if DEBUG:
            traceback.print_exception(type(exc), exc, exc.__traceback__)
        else:
            setup_logging()
            log.error("%s: %s", label, line)
        record_failure(f"{label}: {line}", retry=False)
    else:
        # Rank 0 reports it for every rank; a rank that left first would have the launcher
        # (torchrun ends every worker once one fails) stop rank 0 before it has printed it.
        time.sleep(SILENT_RANK_WAIT_S)
    sys.exit(USER_ERROR_EXIT)


# The exit state file once the run directory is known (LOOM_EXIT_STATE names it earlier).
EXIT_STATE: Path | None = (
    Path(os.environ["LOOM_EXIT_STATE"]) if os.environ.get("LOOM_EXIT_STATE") else None
)


def record_failure(error: str, *, retry: bool) -> None:
    """Write `failed` to the exit state, if its file is known (never raises)."""
    if EXIT_STATE is None:
        return
    with suppress(OSError, ValueError):
        env = launch_env()
        write_exit_state(EXIT_STATE, reason="failed", step=None, env=env, error=error, retry=retry)


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
        world = init_world(
            job.parallel,
            device_preference=job.trainer.device,
            deterministic=job.trainer.deterministic,
        )
    try:
        with user_errors(LoomError, every_rank_alike=False):
            return Trainer(job, world).fit()
    finally:  # also on exit_user_error's SystemExit
        shutdown(world)


def load_and_check(cfg: DictConfig) -> tuple[JobConfig, int]:
    """The typed job and the world size it describes; ValueError names a bad field."""
    global EXIT_STATE
    job = load_job_config(cfg)
    sweep_point_dir(job)
    EXIT_STATE = exit_state_path(job.trainer.out_dir)
    world_size = world_size_from_env()
    if job.trainer.dry_run:
        world_size = job.parallel.world_size_for_plan(world_size)
    note = fit_micro_batch(job, world_size=world_size)
    if note:
        log_rank0("%s", note)
    validate_job(job, world_size=world_size)
    if not job.trainer.dry_run:
        check_runnable(job, world_size=world_size)
    return job, world_size


def sweep_point_dir(job: JobConfig) -> None:
    """In a multirun, point N of the sweep trains in <trainer.out_dir>/N (conf/config.yaml
    sets hydra.sweep to that), so points never share checkpoints or metrics."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        job.trainer.out_dir = str(Path(job.trainer.out_dir) / str(HydraConfig.get().job.num))


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
    try:
        summary = run(job)
    except Exception as exc:  # a bug, or a lost peer: recorded, traceback kept
        record_failure(f"{type(exc).__name__}: {one_line(exc)}", retry=True)
        raise
    log_rank0(
        "%s: step %d%s%s",
        summary["reason"],
        summary["step"],
        f", loss {summary['loss']:.4f}" if "loss" in summary else "",
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


def entry() -> None:
    try:
        main()
    except CompactHydraException as exc:
        exit_user_error(
            exc, label="config error", every_rank_alike=True, text=compose_error_line(exc)
        )


if __name__ == "__main__":
    register_configs()
    # Composition (overrides merged into the typed schema) happens inside hydra.main,
    # before the task function; with HYDRA_FULL_ERROR set Hydra re-raises its errors
    # instead of printing them, so they are reported here like every other config error.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    exit_after(entry)
