"""BART (bart_debug, objective denoising) and MASS (mass_debug, objective mass) through
launch/train.py on two ranks train as one process does: train and validation losses
within 1e-5 at every step and the same final weights. Both objectives draw their noise
from (seed, sample id), so a sample's source and target do not depend on the layout.
BART runs under DP=2 (DDP), ZeRO-3 and TP=2 with sequence parallelism; MASS, the same
model with another objective, under DP=2 and ZeRO-3."""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_losses, assert_same_weights

SHORT = [
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
    ("model", "layout"),
    [
        ("bart_debug", ["parallel.zero=0"]),
        ("bart_debug", ["parallel.zero=3"]),
        ("bart_debug", ["parallel.tp=2", "parallel.sp=true"]),
        ("mass_debug", ["parallel.zero=0"]),
        ("mass_debug", ["parallel.zero=3"]),
    ],
    ids=["bart-ddp", "bart-zero3", "bart-tp2-sp", "mass-ddp", "mass-zero3"],
)
def test_encoder_decoder_on_two_ranks_matches_one_process(
    train_cli, one_process, tmp_path, model, layout
):
    tiny = [f"+model={model}", *SHORT]
    one, out = one_process(*tiny), tmp_path / "two"
    train_cli(*tiny, *layout, f"trainer.out_dir={out}", nproc=2)
    assert_same_losses(one, out)
    assert_same_weights(one, out)
