"""Two gloo processes on CPU must train like one process with the same global batch."""

from __future__ import annotations

from tests.conftest import read_metrics

TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=2",
    "model.max_seq_len=64",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.max_steps=12",
    "trainer.log_every=1",
    "trainer.eval_every=6",
    "trainer.eval_samples=16",
    "trainer.save_every=0",
]


def test_two_process_ddp_matches_single_process(train_cli, tmp_path):
    train_cli(*TINY, f"trainer.out_dir={tmp_path / 'one'}")
    train_cli(*TINY, f"trainer.out_dir={tmp_path / 'two'}", nproc=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    train_one = [r for r in one if "loss" in r]
    train_two = [r for r in two if "loss" in r]
    assert len(train_one) == len(train_two) == 12
    for a, b in zip(train_one, train_two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, a["grad_norm"])
        assert a["consumed_samples"] == b["consumed_samples"]
    assert train_one[-1]["loss"] < train_one[0]["loss"]
