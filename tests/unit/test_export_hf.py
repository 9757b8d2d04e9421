"""launch/export_hf.py: a Loom run's checkpoint -> HF folder loadable offline, and back."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from models import ModelConfig, build_model

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "export_hf.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("export_hf", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_hf = _load_script()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine oversubscribed
    threads slow these tests down by an order of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def tiny_cfg(**overrides) -> ModelConfig:
    base = ModelConfig(name="tiny", n_layer=2, d_model=32, n_head=4, max_seq_len=24)
    return dataclasses.replace(base, **overrides)


def perturbed_model(cfg: ModelConfig, *, rows: int, seed: int = 0) -> torch.nn.Module:
    """A model in eval mode whose norms and biases are off their initial values."""
    torch.manual_seed(seed)
    model = build_model(cfg, vocab_size=rows).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def fake_run(tmp_path: Path, cfg: ModelConfig, *, rows: int | None = None, seed: int = 0):
    """A run directory as the trainer leaves it: config.yaml and checkpoints/step_1/model.pt."""
    rows = rows or cfg.padded_vocab_size()
    model = perturbed_model(cfg, rows=rows, seed=seed)
    run = tmp_path / "run"
    step = run / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    job = {"model": dataclasses.asdict(cfg), "trainer": {"seed": 1, "max_steps": 1}}
    OmegaConf.save(OmegaConf.create(job), run / "config.yaml")
    torch.save(model.state_dict(), step / "model.pt")
    return model, step


def ids(vocab: int, t: int = 13) -> torch.Tensor:
    return torch.randint(0, vocab, (2, t), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize(
    ("overrides", "rows", "hf_vocab"),
    [
        ({"vocab_size": 100}, 100, 100),
        # vocab_size unset: the HF model keeps every checkpoint row, padding included.
        ({"vocab_size": None, "make_vocab_size_divisible_by": 64}, 128, 128),
        # vocab_size set: the padded rows are dropped.
        (
            {"vocab_size": 100, "make_vocab_size_divisible_by": 64, "tie_embeddings": False},
            128,
            100,
        ),
    ],
    ids=["plain", "rows_kept", "rows_dropped_untied"],
)
def test_export_loads_offline_with_same_logits(tmp_path, overrides, rows, hf_vocab):
    cfg = tiny_cfg(**overrides)
    model, step = fake_run(tmp_path, cfg, rows=rows)
    out = tmp_path / "hf"
    export_hf.main(["--checkpoint", str(step), "--output", str(out)])
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["vocab_size"] == hf_vocab

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    x = ids(hf_vocab)
    with torch.no_grad():
        expected = model(x)[..., :hf_vocab]
        torch.testing.assert_close(hf(x).logits, expected, atol=1e-5, rtol=1e-5)


def test_to_loom_round_trip(tmp_path):
    cfg = tiny_cfg(vocab_size=100, make_vocab_size_divisible_by=64)
    model, step = fake_run(tmp_path, cfg, rows=128)
    hf_dir, loom_dir = tmp_path / "hf", tmp_path / "loom"
    export_hf.main(["--checkpoint", str(step), "--output", str(hf_dir)])
    yaml = tmp_path / "run" / "config.yaml"
    args = ["--to-loom", "--checkpoint", str(hf_dir), "--output", str(loom_dir)]
    export_hf.main([*args, "--model-config", str(yaml)])

    back_cfg = export_hf.load_model_config(loom_dir / "config.yaml")
    assert back_cfg == cfg
    state = torch.load(loom_dir / "model.pt", weights_only=True)
    original = model.state_dict()
    assert set(state) == set(original)
    for key, value in original.items():
        if key in ("wte.weight", "lm_head.weight"):  # padded rows come back as zeros
            assert torch.equal(state[key][:100], value[:100]), key
            assert torch.count_nonzero(state[key][100:]) == 0
        else:
            assert torch.equal(state[key], value), key

    # Without a Loom config, the GPT-2 config is translated; the weights load strictly.
    export_hf.main([*args[:-1], str(tmp_path / "derived"), "--name", "from_hf"])
    derived = export_hf.load_model_config(tmp_path / "derived" / "config.yaml")
    assert (derived.name, derived.vocab_size, derived.n_layer) == ("from_hf", 100, 2)
    rebuilt = build_model(derived, vocab_size=derived.padded_vocab_size())
    rebuilt.load_state_dict(torch.load(tmp_path / "derived" / "model.pt", weights_only=True))
    x = ids(100)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model(x)[..., :100], atol=1e-5, rtol=0)


def test_command_line_starts_from_any_directory(tmp_path):
    """The script finds the repository's packages by itself (conversion runs in-process above)."""
    cmd = [sys.executable, str(SCRIPT), "--help"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--to-loom" in proc.stdout


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pt"):
        export_hf.export_to_hf(tmp_path / "nowhere", tmp_path / "out")
    _, step = fake_run(tmp_path, tiny_cfg(vocab_size=50, position="rotary"))
    with pytest.raises(ValueError, match=r"model\.position='rotary'"):
        export_hf.export_to_hf(step, tmp_path / "out")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layr: 3\n")
    with pytest.raises(ValueError, match="n_layr"):
        export_hf.load_model_config(bad)
    wrong = tmp_path / "wrong.yaml"
    OmegaConf.save(OmegaConf.create({"model": dataclasses.asdict(tiny_cfg(n_layer=3))}), wrong)
    with pytest.raises(ValueError, match="does not match model config"):
        export_hf.export_to_hf(step, tmp_path / "out", config=wrong)
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_hf.export_to_loom(tmp_path, tmp_path / "out")


def test_export_is_verified_by_reloading(tmp_path, monkeypatch):
    """A folder that does not reload to the converted weights is reported, naming the tensor."""
    from safetensors.torch import load_file, save_file

    _, step = fake_run(tmp_path, tiny_cfg(vocab_size=50))
    real_save = transformers.GPT2LMHeadModel.save_pretrained

    def lossy_save(self, directory, **kwargs):
        real_save(self, directory, **kwargs)
        path = Path(directory) / "model.safetensors"
        tensors = load_file(path)
        tensors["transformer.ln_f.bias"] = torch.zeros_like(tensors["transformer.ln_f.bias"])
        save_file(tensors, path, metadata={"format": "pt"})

    monkeypatch.setattr(transformers.GPT2LMHeadModel, "save_pretrained", lossy_save)
    with pytest.raises(ValueError, match=r"transformer\.ln_f\.bias"):
        export_hf.export_to_hf(step, tmp_path / "out")
    export_hf.export_to_hf(step, tmp_path / "unchecked", verify=False)
