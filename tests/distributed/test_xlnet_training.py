"""XLNet (xlnet_debug, objective plm: two-stream attention over permutation masks) and
Transformer-XL (transformer_xl_debug, objective clm, with 32 positions of segment memory
carried from step to step) through launch/train.py on two ranks train as one process does:
train and validation losses within 1e-5 at every step and the same final weights, under
DP=2 and ZeRO-3. The permutation and its targets are drawn from (seed, sample id), and row
j of every global batch continues stream j whatever the layout, so neither depends on it;
a run saved on one process resumes on two with each stream's memory."""

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
        ("xlnet_debug", ["parallel.zero=0"]),
        ("xlnet_debug", ["parallel.zero=3"]),
        ("transformer_xl_debug", ["parallel.zero=0"]),
        ("transformer_xl_debug", ["parallel.zero=3"]),
    ],
    ids=["xlnet-ddp", "xlnet-zero3", "transformer-xl-ddp", "transformer-xl-zero3"],
)
def test_xlnet_on_two_ranks_matches_one_process(train_cli, one_process, tmp_path, model, layout):
    tiny = [f"+model={model}", *SHORT]
    one, out = one_process(*tiny), tmp_path / "two"
    train_cli(*tiny, *layout, f"trainer.out_dir={out}", nproc=2)
    assert_same_losses(one, out)
    assert_same_weights(one, out)


def test_memory_resumes_on_another_data_parallel_size(train_cli, one_process, tmp_path):
    """Saved at step 3 by one process, resumed by two ranks: each rank finds its streams'
    memory among the saved ones, and the run ends as the single process's does."""
    tiny = ["+model=transformer_xl_debug", *SHORT]
    one, out = one_process(*tiny), tmp_path / "grown"
    train_cli(*tiny, "trainer.max_steps=3", f"trainer.out_dir={out}")
    train_cli(*tiny, f"trainer.out_dir={out}", nproc=2)
    assert_same_losses(one, out)
    assert_same_weights(one, out)
