"""Expert parallelism (and its compositions) on gloo processes trains like one process at the
same global batch: losses, gradient norms (clipping counts each expert once) and MoE
telemetry per step within 1e-5, final parameters within 1e-5, LAMB throughout; and a
checkpoint moves between expert-parallel degrees."""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_losses, assert_same_weights, read_metrics

# No router jitter: its noise would come from each rank's own generator, like dropout.
TINY = [
    "+model=gpt_moe_debug",
    "model.moe.jitter_eps=0",
    "model.n_layer=4",
    "model.d_model=64",
    "model.n_head=2",
    "model.max_seq_len=64",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.log_every=1",
    "trainer.eval_every=3",
    "trainer.eval_samples=6",
    "optim=lamb",
    "optim.warmup_steps=2",
    "optim.decay_steps=6",
    "trainer.save_every=3",
]


def assert_same_steps(one, other) -> None:
    """Gradient norms and MoE telemetry agree step by step (losses: assert_same_losses)."""
    a = [r for r in read_metrics(one) if "loss" in r]
    b = [r for r in read_metrics(other) if "loss" in r]
    assert len(a) == len(b) == 6
    for x, y in zip(a, b, strict=True):
        for key in ("grad_norm", "moe/aux_loss", "moe/z_loss", "moe/dropped_frac"):
            assert abs(x[key] - y[key]) < 1e-5, (x["step"], key, x[key], y[key])
        assert x["moe/load"] == y["moe/load"], x["step"]  # token counts: exact


@pytest.mark.parametrize(
    ("layout", "nproc"),
    [
        (["parallel.ep=2"], 2),
        (["parallel.ep=2"], 4),  # dp2 x ep2: experts replicated over two ep groups
        (["parallel.ep=2", "parallel.zero=1"], 2),
        (["parallel.ep=2", "parallel.zero=3"], 2),
        # recomputation repeats the all-to-all in backward; telemetry still counted once
        (["parallel.ep=2", "parallel.activation_checkpointing=full"], 2),
        (["parallel.ep=2", "parallel.pp=2"], 4),
        # the kept choices sorted by expert, their counts exchanged, instead of padded buffers
        (["parallel.ep=2", "model.moe.pad_to_capacity=false"], 2),
        # compiled blocks, all-to-all and recomputation inside each block's graph
        (["parallel.ep=2", "parallel.activation_checkpointing=full", "parallel.compile=true"], 2),
    ],
    ids=[
        "ep2",
        "dp2xep2",
        "ep2-zero1",
        "ep2-zero3",
        "ep2-recompute",
        "ep2xpp2",
        "ep2-sorted",
        "ep2-compiled-recompute",
    ],
)
def test_expert_parallel_training_matches_one_process(
    train_cli, one_process, tmp_path, layout, nproc
):
    one = one_process(*TINY, "trainer.max_steps=6")
    out = tmp_path / "ep"
    train_cli(*TINY, "trainer.max_steps=6", *layout, f"trainer.out_dir={out}", nproc=nproc)
    assert_same_losses(one, out)
    assert_same_steps(one, out)
    assert_same_weights(one, out)


def test_checkpoint_moves_between_expert_parallel_degrees(train_cli, one_process, tmp_path):
    """Saved at ep2 under ZeRO-3, resumed on one process, then at ep2 under ZeRO-1, then at
    ep4 (experts are stored by global id, optimizer state included): the same steps as
    never stopping."""
    no_eval = [*TINY, "trainer.eval_every=0", "trainer.save_every=2"]
    one = one_process(*no_eval, "trainer.max_steps=8")
    out = tmp_path / "moved"
    common = [*no_eval, f"trainer.out_dir={out}"]
    train_cli(*common, "trainer.max_steps=2", "parallel.ep=2", "parallel.zero=3", nproc=2)
    proc = train_cli(*common, "trainer.max_steps=4")
    assert "resumed from" in proc.stdout
    proc = train_cli(*common, "trainer.max_steps=6", "parallel.ep=2", "parallel.zero=1", nproc=2)
    assert "resumed from" in proc.stdout
    proc = train_cli(*common, "trainer.max_steps=8", "parallel.ep=4", nproc=4)
    assert "resumed from" in proc.stdout
    assert_same_losses(one, out)
    assert_same_weights(one, out)
