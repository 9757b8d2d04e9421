"""launch/train.py reports a user's mistake as one line and exit code 2, without a traceback.

Each case fails before training: a config error before any data is read, a missing corpus
when the data is opened, another model's checkpoint when the run resumes. LOOM_DEBUG=1 (or
HYDRA_FULL_ERROR=1) shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.fixture()
def train(loom_cache, tmp_path):
    """Run launch/train.py with `overrides` and extra environment; returns CompletedProcess."""

    def run(*overrides: str, **env: str) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if k not in ("LOOM_DEBUG", "HYDRA_FULL_ERROR")}
        cmd = [
            sys.executable,
            str(ROOT / "launch" / "train.py"),
            *overrides,
            f"trainer.out_dir={tmp_path / 'run'}",
        ]
        return subprocess.run(
            cmd,
            cwd=ROOT,
            env={**base, "LOOM_CACHE": str(loom_cache), "PYTHONUNBUFFERED": "1", **env},
            capture_output=True,
            text=True,
            timeout=300,
        )

    return run


def lines_with(proc: subprocess.CompletedProcess, text: str) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if text in line]


def assert_one_line_error(proc: subprocess.CompletedProcess, text: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "HYDRA_FULL_ERROR" not in proc.stdout + proc.stderr
    (line,) = lines_with(proc, text)
    return line


def test_config_error_is_one_line(train, tmp_path):
    line = assert_one_line_error(train("model.n_head=3"), "model.n_head")
    assert line == "[rank 0] config error: model.n_head=3 does not divide model.d_model=128"
    # Hydra makes the run dir; nothing is in it but the exit state naming the error, as one
    # a rerun would only repeat (a Slurm job does not retry it).
    run = tmp_path / "run"
    assert [p.name for p in run.iterdir()] == ["exit_state.json"]
    state = json.loads((run / "exit_state.json").read_text())
    assert (state["reason"], state["retry"]) == ("failed", False)
    assert state["error"] == line.removeprefix("[rank 0] ")


def test_missing_corpus_is_one_line_naming_the_path(train, tmp_path):
    line = assert_one_line_error(train("data.path=/nonexistent/corpus"), "/nonexistent/corpus")
    assert line.startswith("[rank 0] ")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("override", "text"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps"),  # wrong type: refused while composing
        ("+trainer.max_stepz=5", "trainer.max_stepz"),  # unknown key
        ("optim=sgd", "optim/sgd"),  # no such file in the group
    ],
)
def test_composition_errors_are_one_line(train, override, text):
    assert_one_line_error(train(override), text)


def test_only_rank_0_reports_an_error_every_rank_finds(train):
    """Before any process group exists every rank runs the same checks: one speaks."""
    proc = train("model.n_head=3", RANK="1")
    assert proc.returncode == 2
    assert not lines_with(proc, "model.n_head")


@pytest.mark.parametrize("variable", ["LOOM_DEBUG", "HYDRA_FULL_ERROR"])
@pytest.mark.parametrize(
    ("override", "error"),
    [
        ("model.n_head=3", "common.errors.ConfigError: model.n_head=3"),
        ("data.path=/nonexistent/corpus", "/nonexistent/corpus does not exist"),
    ],
)
def test_debug_shows_the_traceback(train, variable, override, error):
    proc = train(override, **{variable: "1"})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback (most recent call last)" in output
    assert error in output.rstrip().splitlines()[-1]  # the traceback ends with the error


def test_under_torchrun_a_config_error_is_printed_once(train_cli, tmp_path):
    proc = train_cli("model.n_head=3", f"trainer.out_dir={tmp_path}", nproc=2, check=False)
    assert proc.returncode != 0  # torchrun's own exit code and report follow ours
    assert lines_with(proc, "model.n_head") == [
        "[rank 0] config error: model.n_head=3 does not divide model.d_model=128"
    ]
    assert re.search(r"exitcode\s*:\s*2\b", proc.stdout + proc.stderr)  # torchrun's report


def test_data_error_in_a_loader_worker_is_one_line(train, tmp_path):
    """A DataLoader worker's error comes back with the worker's traceback in its message;
    the report keeps the worker's own one-line message."""
    text = tmp_path / "docs.txt"
    text.write_text("".join(f"document {i}: " + "lorem ipsum " * 40 + "\n" for i in range(300)))
    corpus = tmp_path / "corpus"
    prepare = [sys.executable, str(ROOT / "launch" / "prepare_data.py"), "--input", str(text)]
    options = ["--split-lines", "--tokenizer", "byte", "--seq-len", "128", "--quiet"]
    subprocess.run([*prepare, *options, "--output", str(corpus)], check=True, capture_output=True)
    shard = corpus / "train-00000.arrow"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2  # inside the token column: ids 0xffff, beyond the vocabulary
    data[middle : middle + 64] = b"\xff" * 64
    shard.write_bytes(bytes(data))
    proc = train(f"data.path={corpus}", "data.num_workers=1")
    line = assert_one_line_error(proc, "outside the vocabulary")
    assert line.startswith(f"[rank 0] data error: shard {shard}, row ")
    assert "Original Traceback" not in proc.stdout + proc.stderr


def test_another_models_checkpoint_is_one_line(train, tmp_path):
    """A run directory holding a GPT checkpoint, resumed as BERT: the sharded load fails on
    every rank (torch's collective error), and the report names the checkpoint and the
    first state it lacks."""
    tiny = ["model.n_layer=1", "model.d_model=32", "model.n_head=2", "trainer.tensorboard=false"]
    assert train(*tiny, "trainer.max_steps=1", "trainer.eval_every=0").returncode == 0
    proc = train("+model=bert_debug", *tiny, "trainer.max_steps=2")
    line = assert_one_line_error(proc, "does not load into this model")
    step = tmp_path / "run" / "checkpoints" / "step_1"
    assert line.startswith(f"[rank 0] checkpoint error: {step}: does not load into this model")
    assert "Missing key in checkpoint state_dict: model." in line
