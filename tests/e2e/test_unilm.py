"""UniLM through launch/train.py: unilm_debug trains with falling loss from scratch, and
starts lower when trainer.init_from hands it a trained BERT's weights; under DP=2 and
ZeRO-3 it matches one process."""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_losses, assert_same_weights, read_metrics
from tests.distributed.test_pp_training import TINY
from tests.e2e.test_families import SHORT


def test_unilm_trains_from_scratch_and_from_bert(train_cli, tmp_path):
    bert, scratch, warm = tmp_path / "bert", tmp_path / "scratch", tmp_path / "warm"
    train_cli("+model=bert_debug", *SHORT, f"trainer.out_dir={bert}")
    train_cli("+model=unilm_debug", *SHORT, f"trainer.out_dir={scratch}")
    losses = [r["loss_lm"] for r in read_metrics(scratch)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    proc = train_cli(
        "+model=unilm_debug",
        *SHORT,
        "trainer.max_steps=5",
        f"trainer.init_from={bert}",
        f"trainer.out_dir={warm}",
    )
    assert "initialised from" in proc.stdout + proc.stderr
    assert "rows repeated in ['tte.weight']" in proc.stdout + proc.stderr
    first_warm = read_metrics(warm)[0]["loss_lm"]
    assert first_warm < losses[0] - 1.0, (first_warm, losses[0])


def test_init_from_a_missing_path_fails_before_training(train_cli, tmp_path):
    proc = train_cli(
        "+model=unilm_debug",
        f"trainer.init_from={tmp_path / 'nowhere'}",
        f"trainer.out_dir={tmp_path / 'run'}",
        check=False,
    )
    assert proc.returncode == 2
    assert "trainer.init_from=" in proc.stdout and "does not exist" in proc.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("layout", ["parallel.zero=1", "parallel.zero=3"])
def test_unilm_data_parallel_matches_one_process(train_cli, one_process, tmp_path, layout):
    common = ["+model=unilm_debug", *TINY, "trainer.max_steps=6"]
    one = one_process(*common)
    out = tmp_path / "two"
    train_cli(*common, layout, f"trainer.out_dir={out}", nproc=2)
    assert_same_losses(one, out)
    assert_same_weights(one, out)
