"""launch/train.py run in a subprocess, exactly as a user runs it."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from tests.conftest import read_metrics

TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=2",
    "model.max_seq_len=64",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.eval_samples=16",
]


# 2^28 and 2^20 overflow, 2^12 does not.
FP16_SKIPS = [
    "precision=fp16",
    "precision.initial_scale=268435456",
    "precision.backoff_factor=0.00390625",
]


def test_default_run_with_no_arguments(train_cli, tmp_path):
    proc = train_cli(cwd=tmp_path)
    run = tmp_path / "runs" / "gpt_debug"
    records = [r for r in read_metrics(run) if "loss" in r]
    assert [r["step"] for r in records] == list(range(10, 301, 10))
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 1.0, (first, last)  # visibly falls (bytes: ~4 -> <2.5)
    for key in ("step", "loss", "lr", "grad_norm", "loss_scale", "tokens_per_s", "mfu", "elapsed"):
        assert key in records[-1]
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["name"] == "gpt_debug"
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_200", "step_300"]
    line = next(x for x in proc.stdout.splitlines() if "step 300/300" in x)
    for part in ("loss", "lr", "tok/s", "ETA"):
        assert part in line


# MoE: the router's jitter draws come from the generator state the checkpoint keeps; it
# runs with deterministic kernels too (tests/gpu repeats this on CUDA, where they matter).
@pytest.mark.parametrize(
    "model",
    [
        [],
        ["+model=gpt_moe_debug", "trainer.deterministic=true"],
        # fp16: two skipped steps first; the scale, its counts and the optimizer's device
        # step counts are restored too
        [*FP16_SKIPS, "optim=lamb"],
        [*FP16_SKIPS, "optim=adamw"],
    ],
    ids=["dense", "moe", "fp16-lamb", "fp16-adamw"],
)
def test_resume_is_bit_exact(train_cli, tmp_path, model):
    check_resume_is_bit_exact(train_cli, tmp_path, *model, *TINY)


def check_resume_is_bit_exact(train_cli, tmp_path, *overrides: str) -> None:
    """40 steps in one run log the same losses and norms, to the bit, as 20 steps stopped
    and resumed to 40 (dropout on, so the restored RNG states count); tests/gpu reuses it."""
    common = [
        *overrides,
        "model.dropout=0.1",
        "optim.decay_steps=40",
        "optim.warmup_steps=5",
        "trainer.log_every=1",
        "trainer.save_every=20",
        "trainer.eval_every=0",
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train_cli(*common, "trainer.max_steps=40", f"trainer.out_dir={whole}")
    train_cli(*common, "trainer.max_steps=20", f"trainer.out_dir={split}")
    proc = train_cli(*common, "trainer.max_steps=40", f"trainer.out_dir={split}")
    assert "resumed from" in proc.stdout
    a = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(whole)]
    b = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(split)]
    assert len(a) == 40 and a == b  # identical to the bit, steps 1..40
    if "precision=fp16" in overrides:
        assert [r["skipped_steps"] for r in read_metrics(split)][:3] == [1, 2, 2]


def test_corrupt_latest_checkpoint_falls_back(train_cli, tmp_path):
    common = [
        *TINY,
        "trainer.save_every=5",
        "trainer.keep=3",
        "trainer.eval_every=0",
        f"trainer.out_dir={tmp_path}",
    ]
    train_cli(*common, "trainer.max_steps=10")
    shard = tmp_path / "checkpoints" / "step_10" / "dcp" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    proc = train_cli(*common, "trainer.max_steps=12")
    assert "step_10" in proc.stdout and "resumed from" in proc.stdout
    assert "step_5" in proc.stdout.split("resumed from")[1].splitlines()[0]
    assert read_metrics(tmp_path)[-1]["step"] == 12


def test_fp16_overflow_skips_steps_and_backs_off(train_cli, tmp_path):
    train_cli(
        *TINY,
        "precision=fp16",
        "precision.initial_scale=1e12",
        "trainer.max_steps=30",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        f"trainer.out_dir={tmp_path}",
    )
    records = read_metrics(tmp_path)
    assert records[0]["grad_norm"] is None and records[0]["skipped_steps"] == 1
    assert records[-1]["skipped_steps"] >= 3
    assert records[-1]["loss_scale"] < 1e12
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_lamb_and_precision_overrides_train(train_cli, tmp_path, dtype):
    train_cli(
        *TINY,
        "optim=lamb",
        f"precision={dtype}",
        "trainer.max_steps=30",
        "trainer.eval_every=15",
        f"trainer.out_dir={tmp_path}",
    )
    records = read_metrics(tmp_path)
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    assert [r["step"] for r in records if "val_loss" in r] == [15, 30]
    saved = json.loads(json.dumps(records))  # plain JSON, no NaN
    assert saved == records


def test_cfg_job_prints_composed_model(train_cli):
    proc = train_cli("+model=gpt2_small", "--cfg", "job")
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["model"]["name"] == "gpt2_small" and cfg["model"]["n_layer"] == 12


def test_cfg_job_prints_every_field_defaults_included(train_cli):
    """The YAML files list only what differs from the schemas; `--cfg job` shows it all."""
    from tests.unit.test_conf_compose import SCHEMA_KEYS, leaf_keys

    cfg = yaml.safe_load(train_cli("+model=t5_debug", "optim=lamb", "--cfg", "job").stdout)
    assert leaf_keys(cfg) == SCHEMA_KEYS
    assert (cfg["model"]["norm"], cfg["model"]["rotary_base"]) == ("rmsnorm", 10000.0)
    assert (cfg["optim"]["name"], cfg["optim"]["beta2"], cfg["precision"]["dtype"]) == (
        "lamb",
        0.999,
        "fp32",
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_steps=-5", "trainer.max_steps=-5"),
        ("model.n_head=3", "model.n_head=3 does not divide model.d_model=128"),
        ("+trainer.max_stepz=5", "trainer.max_stepz"),
        ("optim.name=rmsprop", "optim.name='rmsprop'"),
        ("data.path=/nonexistent/corpus", "/nonexistent/corpus"),
    ],
)
def test_bad_config_fails_before_work_with_named_field(train_cli, tmp_path, override, message):
    proc = train_cli(override, f"trainer.out_dir={tmp_path}/run", check=False)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dry_run_writes_report_and_trains_nothing(train_cli, tmp_path):
    proc = train_cli(
        "+model=gpt2_medium",
        "trainer.dry_run=true",
        "parallel.tp=2",
        "parallel.dp=4",
        "parallel.zero=1",
        "trainer.global_batch_size=32",
        f"trainer.out_dir={tmp_path}",
    )
    report = json.loads((tmp_path / "dry_run.json").read_text())
    assert report["params_total"] == 354_823_168 and report["world_size"] == 8
    assert "FLOPs per token" in proc.stdout
    assert not (tmp_path / "checkpoints").exists()


def test_sharded_and_single_file_checkpoints_convert_and_resume(train_cli, tmp_path):
    import shutil
    import subprocess
    import sys

    import torch

    from parallel.state import read_full
    from tests.conftest import ROOT

    common = [
        *TINY,
        "optim.decay_steps=12",
        "optim.warmup_steps=2",
        "trainer.save_every=10",
        "trainer.eval_every=0",
        "trainer.log_every=1",
    ]
    whole, split = tmp_path / "whole", tmp_path / "split"
    train_cli(*common, "trainer.max_steps=12", f"trainer.out_dir={whole}")
    train_cli(*common, "trainer.max_steps=10", f"trainer.out_dir={split}")
    ckpt = split / "checkpoints" / "step_10"
    single, back = tmp_path / "single", tmp_path / "back"
    tool = [sys.executable, str(ROOT / "launch" / "convert_checkpoint.py")]
    subprocess.run([*tool, "--to-single", str(ckpt), str(single)], check=True)
    subprocess.run([*tool, "--to-sharded", str(single), str(back)], check=True)
    model = torch.load(single / "model.pt", weights_only=True)
    again = read_full(back / "dcp")["model"]
    assert model.keys() == again.keys()
    assert all(torch.equal(model[k], again[k]) for k in model)
    shutil.rmtree(ckpt)
    shutil.move(single, ckpt)  # resume from the single-file form
    train_cli(*common, "trainer.max_steps=12", f"trainer.out_dir={split}")
    a = [(r["step"], r["loss"]) for r in read_metrics(whole)]
    b = [(r["step"], r["loss"]) for r in read_metrics(split)]
    assert a == b and len(a) == 12


def test_corpus_without_validation_trains_with_eval_off(train_cli, tmp_path):
    """A corpus prepared with --val-fraction 0 trains with trainer.eval_every=0, and asking
    for evaluation on it is one line naming the field to change."""
    from data_pipeline.prepare import prepare_corpus

    docs = [f"document {i}: the quick brown fox jumps over the lazy dog." * 3 for i in range(64)]
    corpus = tmp_path / "corpus"
    prepare_corpus(docs, corpus, tokenizer_spec="byte", seq_len=64, val_fraction=0.0)
    common = [*TINY, f"data.path={corpus}", "trainer.max_steps=2"]
    run = tmp_path / "run"
    train_cli(*common, "trainer.eval_every=0", f"trainer.out_dir={run}")
    assert [r["step"] for r in read_metrics(run)] == [2]
    proc = train_cli(*common, f"trainer.out_dir={tmp_path / 'asks'}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    assert "no validation split" in proc.stdout and "trainer.eval_every=0" in proc.stdout
