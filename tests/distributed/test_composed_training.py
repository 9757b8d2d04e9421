"""Composed layouts (PP x DP, TP x DP under ZeRO-0/1, TP x PP, TP x PP x DP) and reshards
between them match one process: loss per step within 1e-5, parameters after the run."""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_losses, assert_same_weights
from tests.distributed.test_pp_training import TINY


def reference(one_process, model: str):
    """The single-process run of `model` (the pipeline tests train the same one)."""
    return one_process(f"+model={model}", *TINY, "trainer.max_steps=6")


@pytest.mark.parametrize(
    ("model", "layout", "nproc"),
    [
        ("gpt_debug", ["parallel.pp=2", "parallel.zero=0"], 4),
        ("gpt_debug", ["parallel.pp=2", "parallel.zero=1"], 4),
        (
            "gpt_debug",
            [
                "parallel.pp=2",
                "parallel.zero=3",
                "parallel.pp_schedule=interleaved_1f1b",
                "parallel.virtual_stages=2",
                "parallel.activation_checkpointing=full",
            ],
            4,
        ),
        ("gpt_debug", ["parallel.tp=2", "parallel.zero=0"], 4),
        ("gpt_debug", ["parallel.tp=2", "parallel.zero=1"], 4),
        ("gpt_debug", ["parallel.tp=2", "parallel.pp=2", "parallel.sp=true"], 4),
        ("bert_debug", ["parallel.tp=2", "parallel.pp=2"], 4),
        # A later stage gets a slice of the sequence; GLM's mask still covers all of it.
        ("glm_debug", ["parallel.tp=2", "parallel.pp=2", "parallel.sp=true"], 4),
        ("glm_debug", ["parallel.tp=2", "parallel.pp=2", "parallel.zero=1"], 8),
    ],
)
def test_composed_layout_matches_one_process(
    train_cli, one_process, tmp_path, model, layout, nproc
):
    one = reference(one_process, model)
    out = tmp_path / "composed"
    common = [f"+model={model}", *TINY, "trainer.max_steps=6"]
    train_cli(*common, *layout, f"trainer.out_dir={out}", nproc=nproc)
    assert_same_losses(one, out)
    assert_same_weights(one, out)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ((["parallel.tp=2", "parallel.pp=2"], 4), (["parallel.zero=1"], 4)),  # -> dp4
        ((["parallel.tp=2", "parallel.pp=2"], 4), (["parallel.zero=3"], 2)),  # -> zero3 dp2
        ((["parallel.zero=1"], 4), (["parallel.tp=2", "parallel.pp=2"], 4)),
    ],
)
def test_checkpoint_reshards_between_composed_layouts(
    train_cli, one_process, tmp_path, first, second
):
    one = reference(one_process, "gpt_debug")
    out = tmp_path / "resharded"
    common = ["+model=gpt_debug", *TINY, f"trainer.out_dir={out}"]
    (layout_a, n_a), (layout_b, n_b) = first, second
    train_cli(*common, "trainer.max_steps=3", *layout_a, nproc=n_a)
    proc = train_cli(*common, "trainer.max_steps=6", *layout_b, nproc=n_b)
    assert "resumed from" in proc.stdout
    assert_same_losses(one, out)
    assert_same_weights(one, out)


def test_single_file_checkpoint_resumes_under_a_composed_layout(train_cli, one_process, tmp_path):
    """Saved by a pipeline, converted to the single-file form, resumed at pp2 x dp2 ZeRO-1:
    each pipeline rank takes its own entries of the full state."""
    import shutil
    import subprocess
    import sys

    from tests.conftest import ROOT

    one = reference(one_process, "gpt_debug")
    out = tmp_path / "run"
    common = ["+model=gpt_debug", *TINY, f"trainer.out_dir={out}"]
    train_cli(*common, "trainer.max_steps=3", "parallel.pp=2", nproc=2)
    ckpt, single = out / "checkpoints" / "step_3", tmp_path / "single"
    tool = [sys.executable, str(ROOT / "launch" / "convert_checkpoint.py")]
    subprocess.run([*tool, "--to-single", str(ckpt), str(single)], check=True)
    shutil.rmtree(ckpt)
    shutil.move(single, ckpt)
    proc = train_cli(*common, "trainer.max_steps=6", "parallel.pp=2", "parallel.zero=1", nproc=4)
    assert "resumed from" in proc.stdout
    assert_same_losses(one, out)
