"""launch/export_hf.py on checkpoints as training writes them (sharded dcp/, sealed with
metadata.json), built here in one process: weights and tokenizer reach transformers, damaged
or incomplete checkpoints and bad configs are refused in one line with exit code 2."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from common.errors import CheckpointError, ConfigError
from data_pipeline.tokenizers import build_tokenizer
from models import ModelConfig
from parallel.state import write_sharded_from_full
from tests.unit.test_export_hf import perturbed_model
from trainer.checkpoint import seal

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf" / "model"


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_hf = _load_script("export_hf")
convert_checkpoint = _load_script("convert_checkpoint")


@pytest.fixture(autouse=True)
def offline_one_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("LOOM_DEBUG", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt(**overrides) -> ModelConfig:
    base = ModelConfig(name="tiny", n_layer=2, d_model=32, n_head=4, max_seq_len=64)
    return dataclasses.replace(base, **overrides)


def write_step(run: Path, model: torch.nn.Module, step: int) -> Path:
    """checkpoints/step_N as the trainer leaves it: dcp/, trainer.pt, metadata.json."""
    tmp = run / "checkpoints" / f".tmp_step_{step}"
    tmp.mkdir(parents=True)
    state = model.state_dict()
    optim = {"state": {}, "param_groups": [{"lr": 1e-3, "params": list(state)}]}
    with warnings.catch_warnings():  # "no process group: saving in one process"
        warnings.simplefilter("ignore", UserWarning)
        write_sharded_from_full({"model": state, "optim": optim}, tmp / "dcp")
    torch.save({"step": step}, tmp / "trainer.pt")
    seal(tmp, step=step)
    final = run / "checkpoints" / f"step_{step}"
    os.replace(tmp, final)
    return final


def make_run(tmp_path: Path, cfg: ModelConfig, *, rows: int, data: dict, steps=(2,)):
    model = perturbed_model(cfg, rows=rows)
    run = tmp_path / "run"
    run.mkdir()
    OmegaConf.save(
        OmegaConf.create({"model": dataclasses.asdict(cfg), "data": data}), run / "config.yaml"
    )
    return model, [write_step(run, model, step) for step in steps]


def fake_corpus(directory: Path, tokenizer) -> Path:
    """What export reads of a prepared corpus: the manifest's tokenizer entry and its file."""
    directory.mkdir(parents=True)
    entry = tokenizer.save(directory)
    (directory / "manifest.json").write_text(json.dumps({"tokenizer": entry}))
    return directory


def test_sharded_checkpoint_with_trained_tokenizer(tmp_path):
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)[:20]]
    tokenizer = build_tokenizer("bpe:500", train_texts=texts)
    corpus = fake_corpus(tmp_path / "corpus", tokenizer)
    cfg = tiny_gpt()
    rows = tokenizer.vocab_size
    model, (step,) = make_run(tmp_path, cfg, rows=rows, data={"path": str(corpus)})
    out = tmp_path / "hf"
    assert export_hf.main(["--checkpoint", str(step), "--output", str(out)]) == 0

    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    text = texts[3][:80]
    ids = hf_tok(text, return_tensors="pt")["input_ids"]
    assert ids.shape[1] <= cfg.max_seq_len
    assert ids[0].tolist() == tokenizer.encode(text)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids), atol=1e-5, rtol=1e-5)
    assert hf.config.eos_token_id == tokenizer.eos_id == hf.generation_config.eos_token_id
    assert hf.config.pad_token_id == tokenizer.pad_id
    readme = (out / "README.md").read_text()
    assert "sharded, step 2" in readme and "Tokenizer: bpe" in readme


def test_run_directory_takes_the_newest_intact_checkpoint(tmp_path, capsys):
    cfg = tiny_gpt()
    _, (older, newer) = make_run(
        tmp_path,
        cfg,
        rows=366,
        data={"tokenizer": "byte", "cache_dir": str(tmp_path)},
        steps=(2, 4),
    )
    shard = next((newer / "dcp").glob("*.distcp"))
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(blob)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        export_hf.export_to_hf(newer, tmp_path / "out")
    out = export_hf.export_to_hf(tmp_path / "run", tmp_path / "hf")
    assert "step 2" in (out / "README.md").read_text()
    # Nothing of the sample corpus is on disk: the byte tokenizer needs no file.
    assert "tokenizer: byte from data.tokenizer=byte" in capsys.readouterr().out
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok("ünï")["input_ids"] == list("ünï".encode())


def test_incomplete_and_missing_checkpoints(tmp_path):
    cfg = tiny_gpt()
    _, (step,) = make_run(tmp_path, cfg, rows=366, data={})
    (step / "metadata.json").unlink()
    with pytest.raises(CheckpointError, match="metadata.json: missing"):
        export_hf.export_to_hf(step, tmp_path / "out")
    (step / "dcp").rename(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="neither dcp/ nor model.pt"):
        export_hf.export_to_hf(step, tmp_path / "out")
    with pytest.raises(CheckpointError, match="nor checkpoints/step_N"):
        export_hf.export_to_hf(tmp_path, tmp_path / "out")


def test_t5_export_takes_the_tokenizer_ids(tmp_path):
    schema = OmegaConf.structured(ModelConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(CONF_DIR / "t5_debug.yaml")))
    cfg = dataclasses.replace(
        cfg, d_model=32, n_head=2, d_kv=16, d_ff=64, n_layer=1, n_decoder_layer=1
    )
    tokenizer = build_tokenizer("byte")
    model, (step,) = make_run(tmp_path, cfg, rows=tokenizer.vocab_size, data={})
    out = export_hf.export_to_hf(step, tmp_path / "hf", tokenizer="byte")
    hf = transformers.T5ForConditionalGeneration.from_pretrained(out, local_files_only=True).eval()
    pad, eos = tokenizer.pad_id, tokenizer.eos_id
    config = hf.config
    assert (config.pad_token_id, config.eos_token_id, config.decoder_start_token_id) == (
        pad,
        eos,
        pad,
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids = hf_tok("a text", return_tensors="pt")["input_ids"]
    assert ids[0].tolist() == [*tokenizer.encode("a text"), eos]
    decoder_ids = torch.tensor([[pad, 5, 6]])
    with torch.no_grad():
        expected = model(ids, decoder_input_ids=decoder_ids)
        got = hf(input_ids=ids, decoder_input_ids=decoder_ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    cfg = tiny_gpt()
    _, (step,) = make_run(tmp_path, cfg, rows=366, data={})

    def fails(args: list[str], *, tool=export_hf, match: str) -> None:
        assert tool.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err

    out = ["--output", str(tmp_path / "out")]
    fails(["--checkpoint", str(tmp_path / "nowhere"), *out], match="nowhere does not exist")
    fails(["--checkpoint", str(step), *out, "--tokenizer", "nope"], match="--tokenizer nope")
    glm = tmp_path / "glm.yaml"
    OmegaConf.save(OmegaConf.create({"model": {"family": "glm", "name": "g"}}), glm)
    fails(["--checkpoint", str(step), *out, "--config", str(glm)], match="model.family='glm'")
    (tmp_path / "run" / "config.yaml").unlink()
    fails(["--checkpoint", str(step), *out], match="run" + os.sep + "config.yaml does not exist")
    fails(["--to-loom", "--checkpoint", str(tmp_path), *out], match="config.json does not exist")

    single = tmp_path / "single"
    fails(
        [str(tmp_path / "nowhere"), str(single), "--to-single"],
        tool=convert_checkpoint,
        match="does not exist",
    )
    fails(
        [str(step), str(single), "--to-sharded"], tool=convert_checkpoint, match="already sharded"
    )
    fails([str(step), str(step), "--to-single"], tool=convert_checkpoint, match="exists; choose")
    assert convert_checkpoint.main(["--to-single", str(step), str(single)]) == 0
    # The single-file form exports too, and gives the same weights.
    a = export_hf.read_model_state(step)[0]
    b, facts = export_hf.read_model_state(single)
    assert facts["form"] == "single-file" and facts["verified"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_command_line_error_has_no_traceback_unless_loom_debug(tmp_path):
    cmd = [sys.executable, str(ROOT / "launch" / "export_hf.py"), "--checkpoint", str(tmp_path)]
    cmd += ["--output", str(tmp_path / "out")]
    env = {k: v for k, v in os.environ.items() if k != "LOOM_DEBUG"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"export_hf: error: {tmp_path} holds neither dcp/ nor model.pt, nor checkpoints/step_N "
        "(expected RUN_DIR/checkpoints/step_N or a run directory)"
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**env, "LOOM_DEBUG": "1"}, timeout=120
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "CheckpointError" in proc.stderr


def test_errors_are_loom_errors():
    """What the command line reports in one line is a LoomError; the ValueError and
    FileNotFoundError that callers already catch still match."""
    assert issubclass(export_hf.MissingCheckpointError, CheckpointError)
    assert issubclass(export_hf.MissingCheckpointError, FileNotFoundError)
    with pytest.raises(ConfigError):
        export_hf.load_model_config(Path("/nonexistent/config.yaml"))
