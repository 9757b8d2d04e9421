from __future__ import annotations

import logging

from trainer.metrics import MetricsLogger


def progress_line(caplog, tmp_path, **record) -> str:
    metrics = MetricsLogger(tmp_path, enabled=True, tensorboard=False, max_steps=10, start_step=0)
    base = {"step": 2, "loss": 5.25, "lr": 1e-4, "tokens_per_s": 4300.0, "mfu": 0.412}
    with caplog.at_level(logging.INFO, logger="loom.metrics"):
        metrics.progress({**base, **record}, seconds_per_step=1.5)
    (line,) = [r.getMessage() for r in caplog.records]
    return line


def test_the_progress_line_reports_each_figure(caplog, tmp_path):
    line = progress_line(caplog, tmp_path, grad_norm=0.8125, loss_scale=65536.0)
    assert line == (
        "step 2/10 | loss 5.2500 | lr 1.000e-04 | grad 0.812 | 4.3k tok/s | mfu 41.2% | "
        "scale 65536 | ETA 0:00:12"
    )


def test_a_step_skipped_for_an_fp16_overflow_is_still_reported(caplog, tmp_path):
    """Its gradient norm is None (the step was skipped on the device)."""
    line = progress_line(caplog, tmp_path, grad_norm=None, loss_scale=1048576.0)
    assert "| grad - (skipped) |" in line and "scale 1.04858e+06" in line
