"""parallel.compile=true composed with tensor parallelism (T5, whose encoder and decoder
blocks see two lengths) and FSDP2 (ZeRO-3), each with activation checkpointing, and
pipelining (the zero-bubble schedule, which splits each backward in two): on gloo processes
the compiled blocks train like the eager single process at the same global batch (losses
within 1e-5; inductor's fusions differ from eager by fp32 rounding, seen at most 2.4e-7).
Expert parallelism compiled: tests/distributed/test_moe_training.py."""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_losses

TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=2",
    "trainer.max_steps=4",
    "trainer.log_every=1",
    "trainer.eval_every=2",
]


@pytest.mark.parametrize(
    "model, layout",
    [
        # T5's encoder and decoder blocks (two lengths) recomputed around DTensor parameters
        (["+model=t5_debug"], ["parallel.tp=2", "parallel.activation_checkpointing=full"]),
        ([], ["parallel.zero=3", "parallel.activation_checkpointing=full"]),
        # zero bubble: each backward in two passes (input, then weight gradients)
        ([], ["parallel.pp=2", "parallel.pp_schedule=zero_bubble"]),
    ],
    ids=["t5-tp2-recompute", "zero3-recompute", "pp2-zero-bubble"],
)
def test_compiled_layout_matches_eager_one_process(train_cli, one_process, tmp_path, model, layout):
    eager = one_process(*model, *TINY)
    out = tmp_path / "compiled"
    train_cli(*model, *TINY, *layout, "parallel.compile=true", f"trainer.out_dir={out}", nproc=2)
    assert_same_losses(eager, out)
