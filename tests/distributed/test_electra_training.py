"""ELECTRA (electra_debug: generator, samples, discriminator) through launch/train.py under
DP=2 (DDP), ZeRO-3 (FSDP2 and DeepSpeed) and TP=2 with sequence parallelism trains as
one process does: train and validation losses
within 1e-5 at every step and the same final weights. The generator samples with the
objective's per-position noise (a function of seed and sample id), so its samples, and the
discriminator's input, do not depend on the layout."""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_losses, assert_same_weights

TINY = [
    "+model=electra_debug",
    "model.max_seq_len=64",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.log_every=1",
    "trainer.eval_every=3",
    "trainer.eval_samples=6",
    "trainer.save_every=3",
    "trainer.max_steps=6",
    "optim=lamb",
    "optim.warmup_steps=2",
    "optim.decay_steps=6",
]


@pytest.mark.parametrize(
    "layout",
    [
        ["parallel.zero=0"],
        ["parallel.zero=3"],
        ["parallel.engine=deepspeed", "parallel.zero=3"],
        ["parallel.tp=2", "parallel.sp=true"],
    ],
    ids=["ddp", "zero3", "deepspeed-zero3", "tp2-sp"],
)
def test_electra_on_two_ranks_matches_one_process(train_cli, one_process, tmp_path, layout):
    one, out = one_process(*TINY), tmp_path / "two"
    train_cli(*TINY, *layout, f"trainer.out_dir={out}", nproc=2)
    assert_same_losses(one, out)
    assert_same_weights(one, out)
