"""The training step leaves its results on the device: losses and the gradient norm come
back as tensors, read only when a step is logged (on CUDA, tests/gpu proves no call in a
step synchronises)."""

from __future__ import annotations

import torch

from parallel.dist import init_world
from trainer.config import compose_job
from trainer.loop import Trainer, host_values


def test_a_step_returns_tensors_that_logging_reads(loom_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOM_CACHE", str(loom_cache))
    job = compose_job(
        [
            "+model=bert_debug",
            "model.n_layer=2",
            "trainer.tensorboard=false",
            f"trainer.out_dir={tmp_path}",
        ]
    )
    trainer = Trainer(job, init_world(job.parallel, device_preference="cpu"))
    record = trainer.train_step(0)
    tasks = ("loss", "loss_lm", "loss_nsp")
    for key in (*tasks, "grad_norm"):
        assert isinstance(record[key], torch.Tensor) and record[key].dim() == 0, key
    host = host_values(record)
    assert host["loss"] == host["loss_lm"] + host["loss_nsp"]
    assert all(isinstance(host[k], float) for k in (*tasks, "grad_norm"))
