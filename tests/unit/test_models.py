"""Unit tests of the model library: sizes, masking, tying, dropout, FLOPs and a tiny overfit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from models import ModelConfig, build_model, flops_per_token, param_counts
from models.blocks import MultiHeadAttention, TransformerBlock, causal_mask
from models.flops import known_peak_flops
from models.gpt import GPT

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
MODEL_NAMES = ("gpt_debug", "gpt2_small", "gpt2_medium")


def load_model_config(name: str, **overrides) -> ModelConfig:
    """ModelConfig from conf/model/NAME.yaml, checked against the schema field by field."""
    schema = OmegaConf.structured(ModelConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(CONF_DIR / f"{name}.yaml")))
    return dataclasses.replace(cfg, **overrides)


def debug_model(vocab_size: int = 96, **overrides) -> GPT:
    torch.manual_seed(0)
    cfg = load_model_config("gpt_debug", vocab_size=vocab_size, **overrides)
    return build_model(cfg, vocab_size=cfg.padded_vocab_size())


def random_ids(vocab_size: int = 96, b: int = 2, t: int = 16, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (b, t), generator=gen)


# ---- configs and parameter counts ------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_yaml_sets_every_field_and_validates(name):
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{name}.yaml"))
    assert set(raw) == {f.name for f in dataclasses.fields(ModelConfig)}
    assert raw["name"] == name
    assert (CONF_DIR / f"{name}.yaml").read_text().splitlines()[0] == "# @package model"
    load_model_config(name).validate()


def test_yaml_lands_under_model_group_with_hydra():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR.parent), version_base=None):
        cfg = compose(overrides=["+model=gpt2_small"])
    assert cfg.model.name == "gpt2_small"
    assert cfg.model.n_layer == 12


@pytest.mark.parametrize(
    ("name", "expected"), [("gpt2_small", 124_439_808), ("gpt2_medium", 354_823_168)]
)
def test_published_gpt2_parameter_counts(name, expected):
    cfg = load_model_config(name)
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=cfg.padded_vocab_size())
    counts = param_counts(model)
    assert counts["total"] == expected
    v, d, p = 50257, cfg.d_model, cfg.max_seq_len
    assert counts["embedding"] == (v + p) * d
    assert counts["non_embedding"] == expected - (v + p) * d


def test_vocab_padding_adds_rows_times_width():
    base = load_model_config("gpt2_small")
    padded = dataclasses.replace(base, make_vocab_size_divisible_by=64)
    assert padded.padded_vocab_size() == 50304
    with torch.device("meta"):
        n_base = param_counts(build_model(base, vocab_size=base.padded_vocab_size()))["total"]
        n_pad = param_counts(build_model(padded, vocab_size=padded.padded_vocab_size()))["total"]
    assert n_pad - n_base == (50304 - 50257) * base.d_model


def test_untied_head_counts_as_non_embedding():
    tied = debug_model()
    untied = debug_model(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight
    extra = 96 * 128
    assert param_counts(untied)["total"] == param_counts(tied)["total"] + extra
    assert param_counts(untied)["embedding"] == param_counts(tied)["embedding"]


# ---- forward behaviour -----------------------------------------------------------------


def test_forward_shape_and_dtype():
    model = debug_model()
    logits = model(random_ids(b=3, t=20))
    assert logits.shape == (3, 20, 96)
    assert logits.dtype == torch.float32


def test_causality():
    model = debug_model().eval()
    ids = random_ids(t=24)
    t = 10
    changed = ids.clone()
    changed[:, t] = (changed[:, t] + 1) % 96
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t])
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_explicit_mask_is_combined_with_causal():
    """A block-diagonal document mask confines attention to each packed document."""
    model = debug_model().eval()
    ids = random_ids(b=1, t=16)
    doc_TT = torch.zeros(16, 16, dtype=torch.bool)
    doc_TT[:8, :8] = True
    doc_TT[8:, 8:] = True
    changed = ids.clone()
    changed[:, 2] = (changed[:, 2] + 1) % 96
    with torch.no_grad():
        a = model(ids, attn_mask=doc_TT)
        b = model(changed, attn_mask=doc_TT)
    torch.testing.assert_close(a[:, 8:], b[:, 8:])
    assert not torch.allclose(a[:, 2:8], b[:, 2:8])


def test_attention_bool_and_additive_masks_agree():
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4).eval()
    x_BTD = torch.randn(2, 6, 32)
    keep_BS = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    keep_B11S = keep_BS[:, None, None, :]
    additive_B11S = torch.zeros(2, 1, 1, 6).masked_fill(~keep_B11S, float("-inf"))
    torch.testing.assert_close(
        attn(x_BTD, attn_mask=keep_B11S), attn(x_BTD, attn_mask=additive_B11S)
    )
    torch.testing.assert_close(attn(x_BTD, is_causal=True), attn(x_BTD, attn_mask=causal_mask(6)))
    torch.testing.assert_close(
        attn(x_BTD, attn_mask=keep_B11S, is_causal=True),
        attn(x_BTD, attn_mask=additive_B11S, is_causal=True),
    )


def test_post_ln_block_runs():
    torch.manual_seed(0)
    block = TransformerBlock(32, 4, 64, pre_ln=False)
    y = block(torch.randn(2, 5, 32))
    assert y.shape == (2, 5, 32)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 5), atol=1e-5, rtol=0)


def test_tied_embeddings():
    model = debug_model()
    assert model.lm_head.weight is model.wte.weight
    with torch.device("meta"):
        meta_model = debug_model()
    meta_model.to_empty(device="cpu")
    assert meta_model.lm_head.weight is meta_model.wte.weight


def test_dropout_only_in_train_mode_and_seeded():
    model = debug_model(dropout=0.1)
    ids = random_ids()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids), model(ids), rtol=0, atol=0)
        model.train()
        torch.manual_seed(123)
        first = model(ids)
        torch.manual_seed(123)
        again = model(ids)
        other = model(ids)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert not torch.equal(first, other)


def test_too_long_sequence_raises():
    model = debug_model()
    with pytest.raises(ValueError, match=r"model\.max_seq_len"):
        model(random_ids(b=1, t=129))


def test_bf16_autocast_forward_on_cpu():
    model = debug_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(random_ids())
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits.float()).all()


# ---- init, meta device and build -------------------------------------------------------


def test_init_statistics():
    model = debug_model(vocab_size=4096)
    std = 0.02
    assert abs(model.wte.weight.std().item() - std) < 0.002
    residual = torch.cat([b.mlp.fc_out.weight.flatten() for b in model.blocks.values()])
    assert abs(residual.std().item() - std / (2 * 4) ** 0.5) < 0.001
    block = model.blocks["0"]
    assert torch.count_nonzero(block.attn.qkv.bias) == 0
    assert torch.equal(block.ln1.weight, torch.ones(128))


def test_meta_build_allocates_nothing_then_materialises():
    with torch.device("meta"):
        model = debug_model()
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    assert model(random_ids()).isfinite().all()


def test_unknown_family_raises():
    cfg = dataclasses.replace(load_model_config("gpt_debug"), family="rnn")
    with pytest.raises(ValueError, match=r"model\.family"):
        build_model(cfg, vocab_size=64)


# ---- FLOPs -----------------------------------------------------------------------------


def test_flops_per_token_debug_by_hand():
    cfg = load_model_config("gpt_debug")
    # Per layer: qkv + out = 4 * 128^2 = 65,536; MLP = 2 * 128 * 512 = 131,072.
    # N_matmul = 4 * 196,608 + 512 * 128 (output projection) = 851,968.
    # 6 * N = 5,111,808; attention = 12 * 4 * 128 * 128 = 786,432.
    assert flops_per_token(cfg, vocab_size=512, seq_len=128) == 5_898_240.0


def test_known_peak_flops():
    assert known_peak_flops("cpu", "bf16") is None
    assert known_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.5e12)
    assert known_peak_flops("NVIDIA H100 PCIe", "bf16") == pytest.approx(756e12)
    assert known_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == pytest.approx(19.5e12)
    assert known_peak_flops("NVIDIA A10G", "torch.bfloat16") == pytest.approx(125e12)
    assert known_peak_flops("NVIDIA L40S", "fp16") == pytest.approx(362e12)
    assert known_peak_flops("NVIDIA L4", "fp16") == pytest.approx(121e12)
    assert known_peak_flops("Tesla V100-SXM2-16GB", "bf16") is None
    with pytest.raises(ValueError, match="dtype"):
        known_peak_flops("NVIDIA H100 80GB HBM3", "int3")


# ---- gradients -------------------------------------------------------------------------


def test_debug_model_overfits_one_batch():
    model = debug_model(vocab_size=64)
    ids = random_ids(vocab_size=64, b=4, t=32)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(50):
        logits = model(inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
