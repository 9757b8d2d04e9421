#!/usr/bin/env python
"""Loom's training entry point.

python launch/train.py                              # tiny GPT, built-in corpus, CPU
python launch/train.py +model=gpt2_small optim=lamb precision=bf16 trainer.max_steps=50
torchrun --nproc_per_node 2 launch/train.py         # data parallel over 2 processes
python launch/train.py +model=gpt2_small --cfg job  # print the composed config
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a plain checkout too
    sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from common.log import get_logger, log_rank0, setup_logging  # noqa: E402
from parallel.dist import init_world, shutdown, world_size_from_env  # noqa: E402
from trainer.config import JobConfig, load_job_config, register_configs, validate_job  # noqa: E402
from trainer.dry_run import dry_run  # noqa: E402
from trainer.loop import Trainer  # noqa: E402

log = get_logger("loom")


def run(job: JobConfig) -> dict:
    world = init_world(job.parallel, device_preference=job.trainer.device)
    try:
        return Trainer(job, world).fit()
    finally:
        shutdown(world)


@hydra.main(version_base=None, config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    setup_logging()
    try:
        job = load_job_config(cfg)
        world_size = world_size_from_env()
        if job.trainer.dry_run:
            world_size = job.parallel.world_size_for_plan(world_size)
        validate_job(job, world_size=world_size)
        if not job.trainer.dry_run:
            job.parallel.check_available(world_size=world_size)
    except ValueError as exc:
        log.error("config error: %s", exc)
        sys.exit(2)
    if job.trainer.dry_run:
        dry_run(job, world_size=world_size)
        return
    summary = run(job)
    log_rank0(
        "done: step %d, loss %.4f%s",
        summary["step"],
        summary.get("loss", float("nan")),
        f", val loss {summary['val_loss']:.4f}" if "val_loss" in summary else "",
    )


if __name__ == "__main__":
    register_configs()
    main()
