"""Transformer-XL's segment memory as a user runs it (transformer_xl_debug, mem_len 32): the
memory is saved with every checkpoint (one file per rank, by stream), and a run stopped and
resumed logs exactly what an uninterrupted one does."""

from __future__ import annotations

from tests.conftest import read_metrics

RUN = [
    "+model=transformer_xl_debug",
    "trainer.max_steps=6",
    "trainer.save_every=3",
    "trainer.log_every=1",
    "trainer.eval_every=3",
    "trainer.eval_samples=8",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",
]


def test_memory_is_used_saved_and_resumed_exactly(train_cli, tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train_cli(*RUN, f"trainer.out_dir={whole}")
    train_cli(*RUN, "trainer.max_steps=3", f"trainer.out_dir={resumed}")
    train_cli(*RUN, f"trainer.out_dir={resumed}")
    a, b = read_metrics(whole), read_metrics(resumed)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        key = "loss" if "loss" in x else "val_loss"
        assert x[key] == y[key], (x["step"], key, x[key], y[key])
    assert (whole / "checkpoints" / "step_3" / "memory_rank0.pt").is_file()
    import torch

    saved = torch.load(whole / "checkpoints" / "step_3" / "memory_rank0.pt")
    assert sorted(saved) == list(range(8))  # one entry per stream (row of the global batch)
    assert [tuple(m.shape) for m in saved[5]] == [(32, 128), (32, 128)]  # 32 positions, 2 layers
