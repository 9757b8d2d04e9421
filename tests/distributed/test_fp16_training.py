"""fp16 loss scaling on gloo processes trains like one process: a scale so large that the
first two steps overflow, then backs off; every rank skips the same steps (the verdict is the
maximum over ranks, taken on the device), and losses, loss scales, skipped-step counts and
final parameters match the single-process run, under DDP, ZeRO-1, ZeRO-3 (FSDP2), TP and PP,
with LAMB and AdamW."""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_weights, read_metrics
from tests.distributed.test_zero import TINY

FP16 = [
    # Each test names its optimizer; the default warm-up keeps the learning rate low, so
    # fp16's rounding differences between layouts stay small in the weights.
    *(o for o in TINY if not o.startswith("optim")),
    "trainer.max_steps=8",
    "trainer.save_every=8",
    "precision=fp16",
    # 2^28, then 2^20 overflow in every layout; 2^12 is far below where any layout does.
    # (Where overflow starts depends on the layout: a rank of a data-parallel pair weighs
    # its loss twice, as DDP averages, so its local gradients are twice one process's.)
    "precision.initial_scale=268435456",
    "precision.backoff_factor=0.00390625",
    "precision.growth_interval=100",
]


def assert_same_fp16_steps(one, other, *, tol: float) -> None:
    a, b = read_metrics(one), read_metrics(other)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for x, y in zip(a, b, strict=True):
        assert (x["skipped_steps"], x["loss_scale"]) == (y["skipped_steps"], y["loss_scale"])
        assert (x["grad_norm"] is None) == (y["grad_norm"] is None), x["step"]
        assert abs(x["loss"] - y["loss"]) < tol, (x["step"], x["loss"], y["loss"])
    assert [r["skipped_steps"] for r in a] == [1, 2, 2, 2, 2, 2, 2, 2]
    assert [r["grad_norm"] is None for r in a] == [True, True] + [False] * 6
    assert a[-1]["loss_scale"] == 2**12


@pytest.mark.parametrize(
    ("optim", "layout"),
    [
        ("lamb", []),
        ("lamb", ["parallel.zero=1"]),
        ("lamb", ["parallel.zero=3"]),
        ("lamb", ["parallel.tp=2"]),
        ("lamb", ["parallel.pp=2"]),
        ("adamw", ["parallel.zero=3"]),
    ],
    ids=["ddp-lamb", "zero1-lamb", "zero3-lamb", "tp2-lamb", "pp2-lamb", "zero3-adamw"],
)
def test_fp16_overflow_skips_the_same_steps_as_one_process(
    train_cli, one_process, tmp_path, optim, layout
):
    one = one_process(*FP16, f"optim={optim}")
    out = tmp_path / "fp16"
    train_cli(*FP16, f"optim={optim}", *layout, f"trainer.out_dir={out}", nproc=2)
    assert_same_fp16_steps(one, out, tol=1e-3)
    # FSDP2 computes with fp16 copies of the parameters, one process with fp32 ones under
    # autocast: LAMB's normalised updates carry that rounding to about 3e-4.
    assert_same_weights(one, out, atol=1e-3 if "parallel.zero=3" in layout else 1e-4)


def test_fp16_zero_bubble_pipeline_skips_the_same_steps_as_one_process(
    train_cli, one_process, tmp_path
):
    """The zero-bubble schedule runs each backward in two passes (input gradients, then
    weight gradients), both from the last stage's scaled loss; four stages on two ranks."""
    common = [*(o for o in FP16 if not o.startswith("model.n_layer")), "model.n_layer=4"]
    one = one_process(*common, "optim=lamb")
    out = tmp_path / "fp16"
    zero_bubble = ["parallel.pp=2", "parallel.pp_schedule=zero_bubble", "parallel.virtual_stages=2"]
    train_cli(*common, "optim=lamb", *zero_bubble, f"trainer.out_dir={out}", nproc=2)
    assert_same_fp16_steps(one, out, tol=1e-3)
    assert_same_weights(one, out, atol=1e-4)
