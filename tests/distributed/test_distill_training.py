"""Distillation through launch/train.py on two ranks trains as one process does: DistilBERT's
mix (distilbert_debug student) under DP=2 and ZeRO-3, TinyBERT's (tinybert_debug student,
half the teacher's width, with projections; every term, soft targets and attention scores
included) under DP=2, ZeRO-3 (the teacher sharded too) and TP=2 (student and teacher split
by heads and vocabulary). Train and validation losses within 1e-5 at every step and the
same final weights."""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_losses, assert_same_weights
from tests.e2e.test_distill import TEACHER, student_overrides


@pytest.mark.parametrize(
    ("student", "layout"),
    [
        ("distilbert", ["parallel.zero=0"]),
        ("distilbert", ["parallel.zero=3"]),
        ("tinybert", ["parallel.zero=0"]),
        ("tinybert", ["parallel.zero=3"]),
        ("tinybert", ["parallel.tp=2"]),
    ],
    ids=["distilbert-ddp", "distilbert-zero3", "tinybert-ddp", "tinybert-zero3", "tinybert-tp2"],
)
def test_distillation_on_two_ranks_matches_one_process(
    one_process, train_cli, tmp_path, student, layout
):
    teacher = one_process(*TEACHER)
    # LAMB: Adam's update of a gradient that is zero but for rounding (the attention's key
    # bias) is as large as any other, which would make layouts differ by that rounding.
    tiny = student_overrides(student, teacher, "optim=lamb", "optim.decay_steps=6")
    one, out = one_process(*tiny), tmp_path / "two"
    train_cli(*tiny, *layout, f"trainer.out_dir={out}", nproc=2)
    assert_same_losses(one, out)
    assert_same_weights(one, out)
