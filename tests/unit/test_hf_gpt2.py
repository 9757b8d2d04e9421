"""Loom GPT <-> transformers GPT2LMHeadModel: weights convert both ways with equal logits."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models import ModelConfig, build_model
from models import hf as hf_convert
from models.hf import gpt2

transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine oversubscribed
    threads slow these tests down by an order of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cfg(**overrides) -> ModelConfig:
    base = ModelConfig(
        name="tiny", vocab_size=100, n_layer=2, d_model=32, n_head=4, max_seq_len=24, dropout=0.0
    )
    return dataclasses.replace(base, **overrides)


@torch.no_grad()
def jitter(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move norms and biases off their init (ones, zeros) so a swap of them shows.

    Matrices keep their random init: the logits stay O(1), so fp32 agreement to 1e-5 is
    a fair bar.
    """
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 1:
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model.eval()


def random_hf(cfg: ModelConfig, *, vocab_size: int = 100) -> torch.nn.Module:
    torch.manual_seed(0)
    return jitter(transformers.GPT2LMHeadModel(gpt2.hf_config(cfg, vocab_size=vocab_size)))


def ids(vocab: int = 100, b: int = 2, t: int = 17) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(3))


def test_gpt2_small_from_transformers_gives_same_logits():
    """A random-weight GPT2LMHeadModel of GPT-2 small size, converted to Loom."""
    hf_cfg = transformers.GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    assert (hf_cfg.n_layer, hf_cfg.n_embd, hf_cfg.vocab_size) == (12, 768, 50257)
    # Built on meta and filled directly: transformers' own init of 124M weights is slow.
    with torch.device("meta"):
        hf = transformers.GPT2LMHeadModel(hf_cfg)
    hf.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.02 if p.dim() == 2 else 0.1, generator=gen)
            if p.dim() == 1:
                p.add_(1.0)  # norm gains near 1, and biases off zero
    hf.tie_weights()
    hf.eval()
    cfg = gpt2.loom_config(hf_cfg, name="gpt2_small")
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=cfg.padded_vocab_size())
    model.load_state_dict(gpt2.from_hf(hf.state_dict(), cfg), strict=True, assign=True)
    model.tie_weights()
    model.eval()
    x = ids(50257, b=1, t=16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False},
        {"activation": "gelu", "d_ff": 48},
        {"activation": "relu", "make_vocab_size_divisible_by": 64},
        {"position": "none"},
    ],
    ids=["default", "untied", "gelu_dff", "relu_padded", "no_positions"],
)
def test_loom_to_transformers_gives_same_logits(overrides):
    cfg = tiny_cfg(**overrides)
    torch.manual_seed(0)
    model = jitter(build_model(cfg, vocab_size=cfg.padded_vocab_size()))
    hf = transformers.GPT2LMHeadModel(gpt2.hf_config(cfg, vocab_size=100)).eval()
    hf.load_state_dict(gpt2.to_hf(model.state_dict(), cfg), strict=True)
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x)[..., :100], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False}, {"activation": "relu"}])
def test_round_trip_is_exact(overrides):
    cfg = tiny_cfg(**overrides)
    hf = random_hf(cfg)
    back = gpt2.to_hf(gpt2.from_hf(hf.state_dict(), cfg), cfg)
    reference = hf.state_dict()
    assert set(back) == set(reference)
    for key, value in reference.items():
        assert torch.equal(back[key], value), key


def test_qkv_layout_is_per_head():
    """Loom rows (H, 3, K) hold head h's q, k and v together; HF columns are [q; k; v]."""
    cfg = tiny_cfg(n_layer=1)
    hf = random_hf(cfg)
    c_attn = hf.state_dict()["transformer.h.0.attn.c_attn.weight"]  # (D, 3D), Conv1D
    qkv = gpt2.from_hf(hf.state_dict(), cfg)["blocks.0.attn.qkv.weight"]  # (3D, D)
    k_size, d = 8, 32
    head, part = 2, 1  # head 2's key
    loom_rows = qkv[(head * 3 + part) * k_size : (head * 3 + part + 1) * k_size]
    hf_cols = c_attn[:, part * d + head * k_size : part * d + (head + 1) * k_size]
    assert torch.equal(loom_rows, hf_cols.t())


def test_padded_rows_are_dropped_and_restored():
    cfg = tiny_cfg(make_vocab_size_divisible_by=64)
    hf = random_hf(cfg)
    loom = gpt2.from_hf(hf.state_dict(), cfg)
    assert loom["wte.weight"].shape == (128, 32)
    assert torch.count_nonzero(loom["wte.weight"][100:]) == 0
    assert gpt2.to_hf(loom, cfg)["transformer.wte.weight"].shape == (100, 32)
    # With vocab_size unset the HF model keeps every row of the checkpoint.
    unset = dataclasses.replace(cfg, vocab_size=None)
    assert gpt2.to_hf(loom, unset)["lm_head.weight"].shape == (128, 32)


def test_base_model_keys_and_legacy_buffers_are_accepted():
    cfg = tiny_cfg()
    hf = random_hf(cfg)
    base = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    del base["lm_head.weight"]
    base["h.0.attn.bias"] = torch.ones(1, 1, 24, 24)  # causal buffer of old checkpoints
    loom = gpt2.from_hf(base, cfg)
    assert loom["lm_head.weight"] is loom["wte.weight"]
    torch.testing.assert_close(loom["ln_f.bias"], hf.transformer.ln_f.bias.detach())


def test_loom_config_matches_hf_config():
    cfg = tiny_cfg(d_ff=48, activation="relu", layer_norm_eps=1e-6, tie_embeddings=False)
    back = gpt2.loom_config(gpt2.hf_config(cfg, vocab_size=100), name="tiny")
    assert back == cfg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("position", "rotary"),
        ("norm", "rmsnorm"),
        ("bias", False),
        ("activation", "gated_gelu"),
        ("family", "bert"),
    ],
)
def test_unconvertible_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"model\.{field}"):
        gpt2.hf_config(tiny_cfg(**{field: value}), vocab_size=100)


def test_mismatched_state_dict_names_keys():
    cfg = tiny_cfg()
    hf = random_hf(cfg)
    with pytest.raises(ValueError, match=r"missing \['transformer\.h\.2\."):
        gpt2.from_hf(hf.state_dict(), dataclasses.replace(cfg, n_layer=3))
    with pytest.raises(ValueError, match="model.vocab_size=90"):
        gpt2.from_hf(hf.state_dict(), dataclasses.replace(cfg, vocab_size=90))
    loom = gpt2.from_hf(hf.state_dict(), cfg)
    with pytest.raises(ValueError, match="model.vocab_size=200 exceeds"):
        gpt2.to_hf(loom, dataclasses.replace(cfg, vocab_size=200))


def test_dispatch_by_family():
    cfg = tiny_cfg()
    assert hf_convert.hf_model_class("gpt") is transformers.GPT2LMHeadModel
    assert hf_convert.hf_model_class("bert") is transformers.BertForPreTraining
    assert hf_convert.hf_model_class("t5") is transformers.T5ForConditionalGeneration
    hf = random_hf(cfg)
    via_dispatch = hf_convert.from_hf("gpt", hf.state_dict(), cfg)
    assert torch.equal(
        via_dispatch["blocks.1.attn.qkv.weight"],
        gpt2.from_hf(hf.state_dict(), cfg)["blocks.1.attn.qkv.weight"],
    )
    assert hf_convert.hf_config("gpt", cfg, vocab_size=100).n_embd == 32
    assert hf_convert.family_of(hf.config) == "gpt"
    with pytest.raises(ValueError, match="GLM"):
        hf_convert.to_hf("glm", {}, cfg)
    with pytest.raises(ValueError, match="model.family='rnn'"):
        hf_convert.hf_model_class("rnn")
