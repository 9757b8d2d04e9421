"""ZeRO-1/2/3 on 2 gloo processes train exactly like one process, LAMB included."""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_losses, assert_same_weights, read_metrics

TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=2",
    "model.max_seq_len=64",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "optim=lamb",
    "optim.warmup_steps=2",
]


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_lamb_under_zero_matches_single_process(train_cli, one_process, tmp_path, zero):
    # Evaluations come before checkpoints: ZeRO-2 leaves a unit gathered after a forward
    # with no backward, and the state saved must still be the sharded one.
    common = [*TINY, "trainer.max_steps=6", "trainer.eval_every=3", "trainer.eval_samples=8"]
    one, two = one_process(*common), tmp_path / "two"
    train_cli(*common, f"trainer.out_dir={two}", f"parallel.zero={zero}", nproc=2)
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 3, 4, 5, 6, 6]
    assert_same_losses(one, two)
    assert_same_weights(one, two)


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("roberta_debug", []),
        ("structbert_debug", []),
        ("spanbert_debug", []),
        ("ernie_debug", ["data.mlm.unit=knowledge"]),
    ],
)
def test_recipe_under_zero3_on_two_ranks_matches_single_process(
    train_cli, one_process, tmp_path, model, extra
):
    """A family recipe with its own objective and heads (RoBERTa: mlm, no pair head; ERNIE:
    knowledge masking in stages) sharded by ZeRO-3 over DP=2: losses within 1e-5 of one
    process, and the same final weights."""
    common = [f"+model={model}", *TINY, "trainer.max_steps=6", *extra]
    one, two = one_process(*common), tmp_path / "two"
    train_cli(*common, "parallel.zero=3", f"trainer.out_dir={two}", nproc=2)
    assert_same_losses(one, two)
    assert_same_weights(one, two)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (["parallel.zero=3"], []),  # saved sharded on 2 ranks, resumed on 1
        ([], ["parallel.zero=2"]),  # saved on 1, resumed sharded on 2
        (["parallel.zero=1"], ["parallel.zero=3"]),
    ],
)
def test_checkpoint_reloads_under_another_layout(train_cli, one_process, tmp_path, first, second):
    split = tmp_path / "split"
    common = [*TINY, "optim.decay_steps=8", "trainer.save_every=4"]
    whole = one_process(*common, "trainer.max_steps=8")
    train_cli(
        *common, "trainer.max_steps=4", f"trainer.out_dir={split}", *first, nproc=2 if first else 1
    )
    proc = train_cli(
        *common,
        "trainer.max_steps=8",
        f"trainer.out_dir={split}",
        *second,
        nproc=2 if second else 1,
    )
    assert "resumed from" in proc.stdout
    a, b = read_metrics(whole), read_metrics(split)
    assert [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x["step"], x["loss"], y["loss"])
