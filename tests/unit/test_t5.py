"""T5 model: configs, relative position buckets, masking, tying, FLOPs and a tiny overfit."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from data_pipeline.objectives.span_corruption import t5_lengths
from models.build import build_model
from models.config import ModelConfig
from models.flops import flops_per_token
from models.flops import t5_matmul_params as matmul_params
from models.t5 import T5, relative_position_bucket

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
T5_NAMES = (
    "t5_debug",
    "t5_v1_1_debug",
    "t5_small",
    "t5_base",
    "t5_large",
    "t5_3b",
    "t5_11b",
    "t5_v1_1_base",
)
VOCAB = 96


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: extra intra-op threads only add synchronisation, which
    dominates (30x here) when the CI machine is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load_cfg(name: str, **overrides) -> ModelConfig:
    schema = OmegaConf.structured(ModelConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(CONF_DIR / f"{name}.yaml")))
    return dataclasses.replace(cfg, **overrides)


def debug_t5(name: str = "t5_debug", **overrides) -> T5:
    torch.manual_seed(0)
    cfg = load_cfg(name, vocab_size=VOCAB, **overrides)
    return build_model(cfg, vocab_size=cfg.padded_vocab_size()).eval()


def ids(b: int, t: int, *, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# ---- configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", T5_NAMES)
def test_yaml_sets_model_fields_and_validates(name):
    path = CONF_DIR / f"{name}.yaml"
    raw = OmegaConf.to_container(OmegaConf.load(path))
    assert set(raw) <= {f.name for f in dataclasses.fields(ModelConfig)}
    assert path.read_text().splitlines()[0] == "# @package model"
    cfg = load_cfg(name)
    cfg.validate()
    assert cfg.name == name and cfg.family == "t5" and cfg.objective == "span_corruption"
    assert (cfg.position, cfg.norm, cfg.bias) == ("relative", "rmsnorm", False)
    v1_1 = "v1_1" in name
    assert cfg.activation == ("gated_gelu" if v1_1 else "relu")
    assert cfg.tie_embeddings is cfg.scale_logits is (not v1_1)


@pytest.mark.parametrize(
    ("name", "layers", "d_model", "d_ff", "heads", "d_kv"),
    [
        ("t5_small", 6, 512, 2048, 8, 64),
        ("t5_base", 12, 768, 3072, 12, 64),
        ("t5_large", 24, 1024, 4096, 16, 64),
        ("t5_3b", 24, 1024, 16384, 32, 128),
        ("t5_11b", 24, 1024, 65536, 128, 128),
        ("t5_v1_1_base", 12, 768, 2048, 12, 64),
    ],
)
def test_release_shapes(name, layers, d_model, d_ff, heads, d_kv):
    cfg = load_cfg(name)
    got = (cfg.n_layer, cfg.n_decoder_layer, cfg.d_model, cfg.ffn_size, cfg.n_head, cfg.head_dim)
    assert got == (layers, layers, d_model, d_ff, heads, d_kv)
    assert cfg.padded_vocab_size() == 32128 and cfg.max_seq_len == 512


# ---- relative position buckets ---------------------------------------------------------


def test_bidirectional_buckets_by_hand():
    # 32 buckets: 16 per side, 8 exact distances, log-spaced buckets 8..15 up to distance 128.
    # distance 16: 8 + int(log(16/8) / log(128/8) * 8) = 8 + int(2.0) = 10.
    offsets = torch.tensor([0, -1, -7, -8, -16, -127, -128, -1000, 1, 7, 16, 128])
    expected = [0, 1, 7, 8, 10, 15, 15, 15, 17, 23, 26, 31]
    got = relative_position_bucket(offsets, bidirectional=True, num_buckets=32, max_distance=128)
    assert got.tolist() == expected


def test_causal_buckets_by_hand():
    # 32 buckets for past keys only: 16 exact distances, log-spaced 16..31 up to distance 128.
    # distance 32: 16 + int(log(2) / log(8) * 16) = 16 + int(5.33) = 21.
    offsets = torch.tensor([5, 1, 0, -1, -15, -16, -32, -64, -127, -128, -500])
    expected = [0, 0, 0, 1, 15, 16, 21, 26, 31, 31, 31]
    got = relative_position_bucket(offsets, bidirectional=False, num_buckets=32, max_distance=128)
    assert got.tolist() == expected


def test_one_relative_table_per_stack():
    names = [n for n, _ in debug_t5().named_parameters() if "relative" in n]
    assert names == ["encoder.relative_bias.table.weight", "decoder.relative_bias.table.weight"]


# ---- forward ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["t5_debug", "t5_v1_1_debug"])
def test_forward_shapes(name):
    model = debug_t5(name)
    logits = model(ids(3, 40, seed=1), decoder_input_ids=ids(3, 9, seed=2))
    assert logits.shape == (3, 9, VOCAB) and torch.isfinite(logits).all()


def test_head_size_independent_of_width():
    model = debug_t5(d_model=64, n_head=4, d_kv=48, n_decoder_layer=3)
    attn = model.decoder.blocks["2"].cross_attn
    assert attn.q.weight.shape == (192, 64) and attn.o.weight.shape == (64, 192)
    assert len(model.decoder.blocks) == 3 and len(model.encoder.blocks) == 2
    assert model(ids(2, 7, seed=1), decoder_input_ids=ids(2, 5, seed=2)).shape == (2, 5, VOCAB)


@pytest.mark.parametrize("name", ["t5_debug", "t5_v1_1_debug"])
def test_decoder_is_causal(name):
    model = debug_t5(name)
    enc, dec = ids(2, 12, seed=1), ids(2, 10, seed=2)
    changed = dec.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % VOCAB
    a = model(enc, decoder_input_ids=dec)
    b = model(enc, decoder_input_ids=changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_encoder_is_bidirectional_and_padding_is_ignored():
    model = debug_t5()
    enc, dec = ids(2, 12, seed=1), ids(2, 5, seed=2)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 9:] = False
    other = enc.clone()
    other[:, 9:] = (other[:, 9:] + 7) % VOCAB
    base = model(enc, decoder_input_ids=dec, attention_mask=mask)
    torch.testing.assert_close(base, model(other, decoder_input_ids=dec, attention_mask=mask))
    # Without the mask the same change must matter (the last tokens are seen by all).
    assert not torch.allclose(
        model(enc, decoder_input_ids=dec), model(other, decoder_input_ids=dec)
    )


def test_decoder_padding_mask_hides_padded_keys():
    model = debug_t5()
    enc, dec = ids(1, 8, seed=1), ids(1, 6, seed=2)
    dec_mask = torch.tensor([[True, True, False, True, True, True]])
    other = dec.clone()
    other[0, 2] = (other[0, 2] + 1) % VOCAB
    a = model(enc, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    b = model(enc, decoder_input_ids=other, decoder_attention_mask=dec_mask)
    keep = [0, 1, 3, 4, 5]  # position 2 is a query too; only what others see must not change
    torch.testing.assert_close(a[:, keep], b[:, keep])


def test_mask_shape_is_checked():
    with pytest.raises(ValueError, match="attention_mask has shape"):
        debug_t5()(
            ids(2, 8, seed=1), decoder_input_ids=ids(2, 4, seed=2), attention_mask=torch.ones(2, 7)
        )


def test_autocast_bf16_forward_is_finite():
    model = debug_t5()
    enc, dec = ids(2, 12, seed=1), ids(2, 5, seed=2)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(enc, decoder_input_ids=dec, attention_mask=mask)
    full = model(enc, decoder_input_ids=dec, attention_mask=mask)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - full).abs().max() < 0.1 * full.abs().max()


def test_dropout_only_in_training():
    model = debug_t5(dropout=0.1)
    enc, dec = ids(2, 8, seed=1), ids(2, 4, seed=2)
    torch.testing.assert_close(model(enc, decoder_input_ids=dec), model(enc, decoder_input_ids=dec))
    model.train()
    assert not torch.allclose(model(enc, decoder_input_ids=dec), model(enc, decoder_input_ids=dec))


# ---- tying, scaling, initialisation ----------------------------------------------------


def test_v1_0_ties_and_v1_1_does_not():
    tied, untied = debug_t5("t5_debug"), debug_t5("t5_v1_1_debug")
    assert tied.lm_head.weight is tied.shared.weight
    assert untied.lm_head.weight is not untied.shared.weight
    cfg = load_cfg("t5_debug", vocab_size=VOCAB)
    with torch.device("meta"):
        model = T5(cfg, vocab_size=VOCAB)
    model.to_empty(device="cpu")
    assert model.lm_head.weight is model.shared.weight


def test_scale_logits_multiplies_by_inverse_sqrt_width():
    scaled = debug_t5()
    plain = debug_t5(scale_logits=False)
    plain.load_state_dict(scaled.state_dict())
    enc, dec = ids(2, 8, seed=1), ids(2, 4, seed=2)
    expected = plain(enc, decoder_input_ids=dec) * 128**-0.5
    torch.testing.assert_close(scaled(enc, decoder_input_ids=dec), expected)


def test_initialisation_follows_fan_in():
    model = debug_t5(d_model=128, d_ff=512, n_head=4, d_kv=32, init_std=1.0)
    block = model.encoder.blocks["0"]
    assert model.shared.weight.std().item() == pytest.approx(1.0, rel=0.05)
    assert block.attn.q.weight.std().item() == pytest.approx((128 * 32) ** -0.5, rel=0.05)
    assert block.attn.k.weight.std().item() == pytest.approx(128**-0.5, rel=0.05)
    assert block.mlp.wo.weight.std().item() == pytest.approx(512**-0.5, rel=0.05)
    assert torch.equal(block.ln_attn.weight, torch.ones(128))
    untied = debug_t5("t5_v1_1_debug")
    assert untied.lm_head.weight.std().item() == pytest.approx(128**-0.5, rel=0.1)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"norm": "layernorm"}, "model.norm"),
        ({"bias": True}, "model.bias"),
        ({"position": "learned"}, "model.position"),
        ({"activation": "gated_relu"}, "model.activation"),
    ],
)
def test_unsupported_settings_name_the_field(override, field):
    cfg = load_cfg("t5_debug", vocab_size=VOCAB, **override)
    with pytest.raises(ValueError, match=field):
        T5(cfg, vocab_size=VOCAB)


# ---- FLOPs -----------------------------------------------------------------------------


def test_flops_per_token_by_hand():
    cfg = load_cfg("t5_debug", d_model=8, n_head=2, d_kv=6, d_ff=16, n_layer=2, n_decoder_layer=3)
    # HK = 12. Encoder token: 2 * (4*8*12 + 2*8*16) + cross k,v 3 * 2*8*12 = 1856.
    # Decoder token: 3 * (6*8*12 + 2*8*16) = 2496; head 10*8 = 80. r = 5/20.
    assert matmul_params(cfg, vocab_size=10) == (1856, 2496, 80)
    matmul = 1856 + 0.25 * (2496 + 80)
    attention = 12 * 12 * (2 * 20 + 0.25 * 3 * (5 + 20))
    got = flops_per_token(cfg, vocab_size=10, seq_len=20, target_len=5)
    assert got == pytest.approx(6 * matmul + attention)


def test_flops_default_target_follows_span_corruption():
    cfg = load_cfg("t5_base")
    # The trainer passes the target length of the configured span corruption.
    _, target_len = t5_lengths(512, noise_density=0.15, mean_span=3.0)
    default = flops_per_token(cfg, vocab_size=32128, seq_len=512, target_len=target_len)
    assert default == flops_per_token(cfg, vocab_size=32128, seq_len=512, target_len=114)
    # 6N of the 220M-parameter model is ~1.3 GFLOP per (input + target) token pair; per
    # input token with 114/512 targets it lands in between the encoder- and decoder-only cost.
    assert 6.0e8 < default < 1.0e9


# ---- training --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["t5_debug", "t5_v1_1_debug"])
def test_overfits_one_batch(name):
    model = debug_t5(name).train()
    enc, labels = ids(4, 32, seed=1), ids(4, 8, seed=2)
    dec = torch.cat([torch.zeros(4, 1, dtype=torch.long), labels[:, :-1]], dim=1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        logits = model(enc, decoder_input_ids=dec)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 * math.log(VOCAB)
    assert losses[-1] < 0.05
