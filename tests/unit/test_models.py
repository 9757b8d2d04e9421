"""Unit tests of the model library: sizes, masking, tying, dropout, FLOPs and a tiny overfit."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

import models.flops
from models import ModelConfig, build_model, flops_per_token, param_counts
from models.blocks import (
    MLP,
    MultiHeadAttention,
    RotaryEmbedding,
    TransformerBlock,
    apply_rotary,
    causal_mask,
)
from models.flops import known_peak_flops
from models.gpt import GPT

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
GPT2_NAMES = ("gpt2_small", "gpt2_medium", "gpt2_large", "gpt2_xl")
GPT3_NAMES = ("gpt3_1.3b", "gpt3_2.7b", "gpt3_6.7b", "gpt3_13b", "gpt3_175b")
MODEL_NAMES = ("gpt_debug", "gpt_rotary_debug", *GPT2_NAMES, *GPT3_NAMES)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine oversubscribed
    threads slow these tests down by an order of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
def test_yaml_sets_model_fields_and_validates(name):
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{name}.yaml")) or {}
    assert set(raw) <= {f.name for f in dataclasses.fields(ModelConfig)}
    assert (CONF_DIR / f"{name}.yaml").read_text().splitlines()[0] == "# @package model"
    cfg = load_model_config(name)
    assert cfg.name == name
    cfg.validate()
    assert (cfg.family, cfg.objective) == ("gpt", "clm")


def test_yaml_lands_under_model_group_with_hydra():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR.parent), version_base=None):
        cfg = compose(overrides=["+model=gpt2_small"])
    assert cfg.model.name == "gpt2_small"
    assert cfg.model.n_layer == 12
    # A dot in the option name must not be read as a nested key.
    with initialize_config_dir(config_dir=str(CONF_DIR.parent), version_base=None):
        cfg = compose(overrides=["+model=gpt3_1.3b"])
    assert (cfg.model.name, cfg.model.d_model) == ("gpt3_1.3b", 2048)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gpt2_small", 124_439_808),
        ("gpt2_medium", 354_823_168),
        ("gpt2_large", 774_030_080),
        ("gpt2_xl", 1_557_611_200),
    ],
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


@pytest.mark.parametrize("name", GPT2_NAMES)
def test_gpt2_counts_equal_transformers(name):
    """The same GPT2Config built by transformers has exactly as many parameters."""
    transformers = pytest.importorskip("transformers")
    from models.hf.gpt2 import hf_config

    cfg = load_model_config(name)
    with torch.device("meta"):
        ours = param_counts(build_model(cfg, vocab_size=cfg.padded_vocab_size()))["total"]
        theirs = transformers.GPT2LMHeadModel(hf_config(cfg, vocab_size=cfg.vocab_size))
    assert ours == theirs.num_parameters()


# Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1.
# name: (n_layers, d_model, n_heads, d_head, n_params)
GPT3_PUBLISHED = {
    "gpt3_1.3b": (24, 2048, 16, 128, 1.3e9),
    "gpt3_2.7b": (32, 2560, 32, 80, 2.7e9),
    "gpt3_6.7b": (32, 4096, 32, 128, 6.7e9),
    "gpt3_13b": (40, 5140, 40, 128, 13.0e9),
    "gpt3_175b": (96, 12288, 96, 128, 175.0e9),
}


@pytest.mark.parametrize("name", GPT3_NAMES)
def test_gpt3_sizes_within_3_percent_of_table_2_1(name):
    n_layer, d_model, n_head, d_head, published = GPT3_PUBLISHED[name]
    cfg = load_model_config(name)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.head_dim) == (
        n_layer,
        d_model,
        n_head,
        d_head,
    )
    assert (cfg.max_seq_len, cfg.vocab_size) == (2048, 50257)
    with torch.device("meta"):
        total = param_counts(build_model(cfg, vocab_size=cfg.padded_vocab_size()))["total"]
    assert abs(total - published) / published < 0.03, total


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


# ---- rotary positions ------------------------------------------------------------------


def test_apply_rotary_matches_complex_rotation():
    """Channels (i, i + K/2) form the complex number x_i + j x_{i+K/2}, turned by pos * freq_i."""
    k, t, base = 8, 5, 100.0
    x_BHTK = torch.randn(2, 3, t, k, dtype=torch.float64)
    pos_T = torch.tensor([0, 1, 2, 7, 3])
    got = apply_rotary(x_BHTK, RotaryEmbedding(k, base=base)(pos_T))
    freq_R = base ** (-torch.arange(k // 2, dtype=torch.float64) / (k // 2))
    z = torch.complex(x_BHTK[..., : k // 2], x_BHTK[..., k // 2 :])
    turned = z * torch.polar(torch.ones(t, k // 2, dtype=torch.float64), pos_T[:, None] * freq_R)
    expected = torch.cat([turned.real, turned.imag], dim=-1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_rotary_scores_depend_on_relative_position_only():
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq: int, pk: int) -> torch.Tensor:
        q_rot = apply_rotary(q, rope(torch.tensor([pq])))
        k_rot = apply_rotary(k, rope(torch.tensor([pk])))
        return (q_rot * k_rot).sum()

    torch.testing.assert_close(score(5, 2), score(103, 100))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_rotary_gpt_has_no_position_table():
    model = debug_model(position="rotary")
    assert model.wpe is None and model.rotary is not None
    assert not any("wpe" in name for name in model.state_dict())
    assert param_counts(model)["embedding"] == 96 * 128
    assert load_model_config("gpt_rotary_debug").position == "rotary"


def test_rotary_gpt_is_invariant_to_shifted_positions():
    """RoPE sees only offsets, so adding a constant to every position changes nothing."""
    ids = random_ids(t=12)
    shifted = torch.arange(12).expand(2, 12) + 37
    rotary = debug_model(position="rotary").eval()
    learned = debug_model().eval()
    with torch.no_grad():
        torch.testing.assert_close(
            rotary(ids, position_ids=shifted), rotary(ids), atol=1e-5, rtol=0
        )
        assert not torch.allclose(learned(ids, position_ids=shifted), learned(ids), atol=1e-3)
        # Offsets do matter: a gap after position 5 changes the later outputs, not earlier ones.
        gapped = torch.arange(12) + 5 * (torch.arange(12) >= 6)
        out = rotary(ids, position_ids=gapped.expand(2, 12))
        torch.testing.assert_close(out[:, :6], rotary(ids)[:, :6], atol=1e-5, rtol=0)
        assert not torch.allclose(out[:, 6:], rotary(ids)[:, 6:], atol=1e-3)


@pytest.mark.parametrize("position", ["rotary", "learned"])
def test_packed_document_restarts_positions(position):
    """With a document mask and restarted position ids, a packed document equals it alone."""
    model = debug_model(position=position).eval()
    ids = random_ids(b=1, t=16)
    doc_TT = torch.zeros(16, 16, dtype=torch.bool)
    doc_TT[:6, :6] = True
    doc_TT[6:, 6:] = True
    pos_BT = torch.cat([torch.arange(6), torch.arange(10)])[None]
    with torch.no_grad():
        packed = model(ids, position_ids=pos_BT, attn_mask=doc_TT)
        alone = model(ids[:, 6:])
        torch.testing.assert_close(packed[:, 6:], alone, atol=1e-5, rtol=0)
        unrestarted = model(ids, attn_mask=doc_TT)
    if position == "learned":
        assert not torch.allclose(unrestarted[:, 6:], alone, atol=1e-4)
    else:  # rotary sees only offsets, so restarting changes nothing
        torch.testing.assert_close(unrestarted[:, 6:], alone, atol=1e-5, rtol=0)


def test_rotary_causal_and_autocast():
    model = debug_model(position="rotary").eval()
    ids = random_ids(t=20)
    changed = ids.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 96
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[:, :9], model(changed)[:, :9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
    assert logits.dtype == torch.bfloat16 and logits.float().isfinite().all()


def test_attention_rope_argument_is_optional():
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4).eval()
    x_BTD = torch.randn(2, 6, 32)
    zero = RotaryEmbedding(8)(torch.zeros(6, dtype=torch.long))  # angle 0: identity
    torch.testing.assert_close(attn(x_BTD, rope=zero, is_causal=True), attn(x_BTD, is_causal=True))
    turned = RotaryEmbedding(8)(torch.arange(6))
    assert not torch.allclose(attn(x_BTD, rope=turned, is_causal=True), attn(x_BTD, is_causal=True))


# ---- other architecture options ---------------------------------------------------------


def test_mlp_activations():
    torch.manual_seed(0)
    x_BTD = torch.randn(2, 3, 16) * 3
    mlp = MLP(16, 32)
    h = mlp.fc_in(x_BTD)
    torch.testing.assert_close(mlp(x_BTD), mlp.fc_out(F.gelu(h, approximate="tanh")))
    for name, fn in (("gelu", F.gelu), ("relu", F.relu)):
        other = MLP(16, 32, activation=name)
        other.load_state_dict(mlp.state_dict())
        torch.testing.assert_close(other(x_BTD), mlp.fc_out(fn(h)))
    gated = MLP(16, 32, activation="gated_gelu")
    expected = gated.fc_out(F.gelu(gated.fc_gate(x_BTD), approximate="tanh") * gated.fc_in(x_BTD))
    torch.testing.assert_close(gated(x_BTD), expected)
    with pytest.raises(ValueError, match="activation='swish'"):
        MLP(16, 32, activation="swish")


def test_gpt_honours_activation_bias_and_norm():
    relu = debug_model(activation="relu")
    assert isinstance(relu.blocks["0"].mlp.act, torch.nn.ReLU)
    no_bias = debug_model(bias=False, tie_embeddings=False)
    assert not [n for n, _ in no_bias.named_parameters() if n.endswith("bias")]
    # Per layer: qkv, out, fc_in, fc_out and two LayerNorm biases; plus ln_f's.
    n_bias = 4 * (3 * 128 + 128 + 512 + 128 + 2 * 128) + 128
    untied = debug_model(tie_embeddings=False)
    assert param_counts(untied)["total"] - param_counts(no_bias)["total"] == n_bias
    rms = debug_model(norm="rmsnorm")
    assert isinstance(rms.ln_f, torch.nn.RMSNorm)
    for model in (relu, no_bias, rms, debug_model(activation="gated_gelu")):
        assert model(random_ids()).isfinite().all()


def test_explicit_head_size():
    cfg = load_model_config("gpt_debug", vocab_size=96, d_model=96, n_head=4, d_kv=16)
    model = build_model(cfg, vocab_size=96)
    attn = model.blocks["0"].attn
    assert attn.qkv.weight.shape == (3 * 4 * 16, 96) and attn.out.weight.shape == (96, 64)
    assert model(random_ids()).shape == (2, 16, 96)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("position", "relative"),
        ("type_vocab_size", 2),
        ("share_layers", True),
        ("embedding_size", 64),
        ("pre_ln", False),
    ],
)
def test_gpt_refuses_other_families_options(field, value):
    with pytest.raises(ValueError, match=rf"model\.{field}"):
        debug_model(**{field: value})


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


def test_flops_variants():
    base = load_model_config("gpt_debug")
    ref = flops_per_token(base, vocab_size=512, seq_len=128)
    rotary = dataclasses.replace(base, position="rotary")
    assert flops_per_token(rotary, vocab_size=512, seq_len=128) == ref
    gated = dataclasses.replace(base, activation="gated_gelu")
    # One more 128 x 512 matrix per layer, 6 FLOPs per weight.
    assert flops_per_token(gated, vocab_size=512, seq_len=128) == ref + 6 * 4 * 128 * 512
    narrow = dataclasses.replace(base, d_kv=16)  # attention width 64 instead of 128
    expected = ref - 6 * 4 * 4 * 128 * 64 - 12 * 4 * 64 * 128
    assert flops_per_token(narrow, vocab_size=512, seq_len=128) == expected


def test_flops_dispatch_to_family_count(monkeypatch):
    calls = []

    def fake(cfg, *, vocab_size, seq_len):
        calls.append((cfg.family, vocab_size, seq_len))
        return 42

    monkeypatch.setitem(models.flops.FAMILY_FLOPS, "bert", fake)
    cfg = dataclasses.replace(load_model_config("gpt_debug"), family="bert")
    assert flops_per_token(cfg, vocab_size=100, seq_len=64) == 42.0
    assert calls == [("bert", 100, 64)]
    monkeypatch.delitem(models.flops.FAMILY_FLOPS, "glm")
    with pytest.raises(ValueError, match=r"model\.family='glm' has no FLOP count"):
        flops_per_token(dataclasses.replace(cfg, family="glm"), vocab_size=100, seq_len=64)
    with pytest.raises(ValueError, match="target_len"):
        flops_per_token(dataclasses.replace(cfg, family="t5"), vocab_size=100, seq_len=64)


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
