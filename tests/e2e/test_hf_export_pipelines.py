"""A user's path to transformers: `launch/train.py` writes a run, `launch/export_hf.py` exports
its checkpoint exactly as the README shows, and `transformers.pipeline` uses the folder offline
(text generation from GPT, fill-mask from BERT and RoBERTa), agreeing with the Loom model."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from data_pipeline.tokenizers import ByteTokenizer
from models import ModelConfig, build_model

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
# Two steps of a small model on the built-in corpus (byte tokenizer); the run saves its last step.
SHORT = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=2",
    "model.max_seq_len=64",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.max_steps=2",
    "trainer.save_every=0",
    "trainer.eval_every=0",
]


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def train_and_export(train_cli, loom_cache: Path, tmp_path: Path, model: str) -> tuple:
    run = tmp_path / "run"
    train_cli(f"+model={model}", *SHORT, f"trainer.out_dir={run}")
    step = run / "checkpoints" / "step_2"
    assert (step / "dcp").is_dir() and not (step / "model.pt").exists()
    out = tmp_path / "hf"
    cmd = [sys.executable, str(ROOT / "launch" / "export_hf.py")]
    cmd += ["--checkpoint", str(step), "--output", str(out)]
    env = {**os.environ, "LOOM_CACHE": str(loom_cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "tokenizer: byte from the built-in corpus" in proc.stdout
    return run, out


def loom_model(run: Path) -> torch.nn.Module:
    """The run's model with its final weights, read back the way training wrote them."""
    from parallel.state import read_full

    job = OmegaConf.load(run / "config.yaml")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), job.model)
    cfg = OmegaConf.to_object(merged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        state = read_full(run / "checkpoints" / "step_2" / "dcp")["model"]
    model = build_model(cfg, vocab_size=state[next(iter(state))].shape[0])
    model.load_state_dict(state)
    return model.eval()


def test_gpt_run_generates_with_text_generation_pipeline(train_cli, loom_cache, tmp_path):
    run, out = train_and_export(train_cli, loom_cache, tmp_path, "gpt_debug")
    generate = transformers.pipeline("text-generation", model=str(out), device="cpu")
    prompt = "The Python"
    text = generate(prompt, max_new_tokens=6, do_sample=False)[0]["generated_text"]

    # Loom's greedy continuation of the same ids is the same text.
    tokenizer, model = ByteTokenizer(), loom_model(run)
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        for _ in range(6):
            next_id = int(model(torch.tensor([ids]))[0, -1].argmax())
            if next_id == tokenizer.eos_id:
                break
            ids.append(next_id)
    assert text == tokenizer.decode(ids)
    assert text.startswith(prompt)


@pytest.mark.parametrize(
    ("model", "hf_class"),
    [("bert_debug", "BertForPreTraining"), ("roberta_debug", "RobertaForMaskedLM")],
)
def test_bert_run_fills_masks_with_fill_mask_pipeline(
    train_cli, loom_cache, tmp_path, model, hf_class
):
    run, out = train_and_export(train_cli, loom_cache, tmp_path, model)
    fill = transformers.pipeline("fill-mask", model=str(out), device="cpu")
    assert fill.model.config.architectures == [hf_class]
    predictions = fill("The [MASK] statement", top_k=3)
    assert len(predictions) == 3

    # Loom's own scores at the [MASK] of [CLS] text [SEP] rank the same token first.
    tokenizer, model = ByteTokenizer(), loom_model(run)
    special = tokenizer.special_tokens
    ids = [special["[CLS]"], *tokenizer.encode("The "), special["[MASK]"]]
    ids += [*tokenizer.encode(" statement"), special["[SEP]"]]
    with torch.no_grad():
        logits = model(
            torch.tensor([ids]), token_type_ids=torch.zeros(1, len(ids), dtype=torch.long)
        )
    probs = logits["logits"][0, ids.index(special["[MASK]"])].softmax(-1)
    top = probs.topk(3)
    assert [p["token"] for p in predictions] == top.indices.tolist()
    torch.testing.assert_close(
        torch.tensor([p["score"] for p in predictions]), top.values, atol=1e-5, rtol=1e-4
    )
