"""parallel.compile=true composed with tensor parallelism and FSDP2 (ZeRO-3), each with
activation checkpointing, and pipelining: on gloo processes the compiled blocks train like
the eager single process at the same global batch (losses within 1e-5; inductor's fusions
differ from eager by fp32 rounding, seen at most 2.4e-7). Expert parallelism compiled:
tests/distributed/test_moe_training.py."""

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
    "layout",
    [
        # the recomputation inside each compiled block, around DTensor parameters
        ["parallel.tp=2", "parallel.activation_checkpointing=full"],
        ["parallel.zero=3", "parallel.activation_checkpointing=full"],
        ["parallel.pp=2"],
    ],
    ids=["tp2-recompute", "zero3-recompute", "pp2"],
)
def test_compiled_layout_matches_eager_one_process(train_cli, one_process, tmp_path, layout):
    eager = one_process(*TINY)
    out = tmp_path / "compiled"
    train_cli(*TINY, *layout, "parallel.compile=true", f"trainer.out_dir={out}", nproc=2)
    assert_same_losses(eager, out)
