"""launch/train.py with pipeline parallelism matches one process."""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_losses

TINY = [
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


@pytest.mark.parametrize(
    ("model", "extra"),
    [
        ("gpt_debug", ["parallel.pp_schedule=1f1b"]),
        ("gpt_debug", ["parallel.pp_schedule=gpipe"]),
        ("gpt_debug", ["parallel.pp_schedule=interleaved_1f1b", "parallel.virtual_stages=2"]),
        ("gpt_debug", ["parallel.pp_schedule=zero_bubble", "parallel.virtual_stages=2"]),
        ("bert_debug", ["parallel.pp_schedule=1f1b"]),
        ("glm_debug", ["parallel.pp_schedule=1f1b"]),
    ],
)
def test_pipeline_training_matches_one_process(train_cli, one_process, tmp_path, model, extra):
    common = [f"+model={model}", *TINY, "trainer.max_steps=6"]
    one = one_process(*common)
    train_cli(*common, "parallel.pp=2", *extra, f"trainer.out_dir={tmp_path / 'pp'}", nproc=2)
    assert_same_losses(one, tmp_path / "pp")


def test_pipeline_checkpoint_resumes_on_one_process_and_back(train_cli, one_process, tmp_path):
    common = ["+model=gpt_debug", *TINY]
    whole = one_process(*common, "trainer.max_steps=6")
    split = tmp_path / "split"
    train_cli(*common, "trainer.max_steps=3", "parallel.pp=2", f"trainer.out_dir={split}", nproc=2)
    train_cli(
        *common, "trainer.max_steps=6", "parallel.zero=3", f"trainer.out_dir={split}", nproc=2
    )
    assert_same_losses(whole, split)


def test_t5_pipeline_is_refused_by_name(train_cli, tmp_path):
    proc = train_cli(
        "+model=t5_debug",
        *TINY,
        "parallel.pp=2",
        f"trainer.out_dir={tmp_path}",
        nproc=2,
        check=False,
    )
    assert proc.returncode != 0 and "model.family='t5'" in proc.stdout + proc.stderr
