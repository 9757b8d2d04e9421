"""parallel.compile=true (regional torch.compile of each block, inductor on CPU) trains like
eager and compiles once: the only recompilation is evaluation's (grad mode off)."""

from __future__ import annotations

from tests.conftest import read_metrics

TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=2",
    "trainer.max_steps=8",
    "trainer.log_every=1",
    "trainer.eval_every=3",
]


def test_compiled_blocks_train_like_eager_and_do_not_recompile_per_step(train_cli, tmp_path):
    # inductor fuses differently: fp32 rounding only (seen: at most 5e-7)
    check_compiled_matches_eager(train_cli, tmp_path, *TINY, tolerance=1e-5)


def check_compiled_matches_eager(train_cli, tmp_path, *overrides: str, tolerance: float) -> None:
    """Losses of the compiled run within `tolerance` of eager's at every logged step and
    evaluation, and at most one recompilation (evaluation's); tests/gpu reuses it."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train_cli(*overrides, f"trainer.out_dir={eager}")
    proc = train_cli(
        *overrides,
        "parallel.compile=true",
        f"trainer.out_dir={compiled}",
        env={"TORCH_LOGS": "recompiles"},
    )
    a, b = read_metrics(eager), read_metrics(compiled)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        key = "loss" if "loss" in x else "val_loss"
        assert abs(x[key] - y[key]) < tolerance, (x["step"], key, x[key], y[key])
    recompiles = proc.stderr.count("Recompiling function")
    assert recompiles <= 1, proc.stderr[-3000:]  # 8 steps, 3 evaluations
