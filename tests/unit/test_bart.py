"""BART model (family bart): recipes, masking, tying, the post-LN block by hand, FLOPs, the
tensor-parallel plan and a tiny overfit. Logits against Hugging Face's BART are in
test_hf_bart.py."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from common.errors import ConfigError
from models.bart import Bart
from models.build import build_model, check_pipeline_split, param_counts
from models.config import ModelConfig
from models.flops import flops_per_token, t5_flops
from parallel.tensor_parallel import tp_plan
from tests.unit.helpers import one_thread, recipe  # noqa: F401 (one_thread: a fixture)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
VOCAB = 96


def load_cfg(name: str = "bart_debug", **overrides) -> ModelConfig:
    return recipe(name, **overrides)


def debug_bart(**overrides) -> Bart:
    torch.manual_seed(0)
    cfg = load_cfg(vocab_size=VOCAB, **overrides)
    return build_model(cfg, vocab_size=cfg.padded_vocab_size()).eval()


def ids(b: int, t: int, *, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# ---- recipes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layers", "d_model", "heads", "d_ff", "total"),
    [
        ("bart_base", 6, 768, 12, 3072, 139_417_344),
        ("bart_large", 12, 1024, 16, 4096, 406_287_360),
        ("mass_base", 6, 768, 12, 3072, 123_468_288),
    ],
)
def test_release_shapes_and_counts(name, layers, d_model, heads, d_ff, total):
    """Lewis et al. 2020 / facebook/bart-{base,large}: the counts are Hugging Face's less
    the two unused leading rows of each of its position tables (test_hf_bart.py). MASS-base
    (Song et al. 2019) is released as 6L-768H with 123M parameters."""
    cfg = load_cfg(name)
    cfg.validate()
    assert (cfg.n_layer, cfg.n_decoder_layer, cfg.d_model, cfg.n_head, cfg.ffn_size) == (
        layers,
        layers,
        d_model,
        heads,
        d_ff,
    )
    assert (cfg.activation, cfg.pre_ln) == ("gelu", False)
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=cfg.padded_vocab_size())
    assert param_counts(model)["total"] == total
    assert model.lm_head.weight is model.shared.weight


def test_debug_recipe_builds():
    model = debug_bart()
    assert len(model.encoder.blocks) == len(model.decoder.blocks) == 2
    assert not hasattr(model.encoder.blocks["0"], "cross_attn")
    assert hasattr(model.decoder.blocks["0"], "cross_attn")


# ---- the block by hand ------------------------------------------------------------------


def test_encoder_block_is_post_ln_attention_then_mlp():
    """One encoder layer written out: LayerNorm(x + attention(x)), then LayerNorm(h + MLP(h)),
    with scores scaled by 1/sqrt(head size) and exact GeLU."""
    model = debug_bart(n_layer=1, n_decoder_layer=1)
    block = model.encoder.blocks["0"]
    x = torch.randn(2, 7, 128, generator=torch.Generator().manual_seed(3))
    a = block.attn

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(2, 7, 4, 32).transpose(1, 2)

    q, k, v = heads(a.q(x)), heads(a.k(x)), heads(a.v(x))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32), dim=-1)
    attended = a.o((probs @ v).transpose(1, 2).reshape(2, 7, 128))
    h = F.layer_norm(x + attended, (128,), block.ln_attn.weight, block.ln_attn.bias, 1e-5)
    mlp = block.mlp.fc_out(F.gelu(block.mlp.fc_in(h)))
    want = F.layer_norm(h + mlp, (128,), block.ln_mlp.weight, block.ln_mlp.bias, 1e-5)
    torch.testing.assert_close(block(x), want)


def test_stack_adds_positions_and_normalises_the_embeddings():
    model = debug_bart()
    tokens = torch.randn(1, 5, 128)
    stack = model.encoder
    x = stack.emb_ln(tokens + stack.wpe.weight[:5])
    for block in stack.blocks.values():
        x = block(x)
    torch.testing.assert_close(stack(tokens), x)


# ---- masking ----------------------------------------------------------------------------


def test_decoder_is_causal():
    model = debug_bart()
    enc, dec = ids(2, 12, seed=1), ids(2, 10, seed=2)
    changed = dec.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % VOCAB
    a = model(enc, decoder_input_ids=dec)
    b = model(enc, decoder_input_ids=changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_encoder_padding_is_ignored_and_the_encoder_is_bidirectional():
    model = debug_bart()
    enc, dec = ids(2, 12, seed=1), ids(2, 5, seed=2)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[:, 9:] = False
    other = enc.clone()
    other[:, 9:] = (other[:, 9:] + 7) % VOCAB
    base = model(enc, decoder_input_ids=dec, attention_mask=mask)
    torch.testing.assert_close(base, model(other, decoder_input_ids=dec, attention_mask=mask))
    assert not torch.allclose(
        model(enc, decoder_input_ids=dec), model(other, decoder_input_ids=dec)
    )


def test_a_query_with_no_key_to_attend_stays_finite():
    """Left padding in the decoder leaves its first query no key: the finite mask fill keeps
    that row (and so the loss's gradient) free of NaN."""
    model = debug_bart()
    dec_mask = torch.ones(2, 6, dtype=torch.bool)
    dec_mask[:, :2] = False
    logits = model(
        ids(2, 8, seed=1), decoder_input_ids=ids(2, 6, seed=2), decoder_attention_mask=dec_mask
    )
    assert torch.isfinite(logits).all()


def test_shapes_and_lengths_are_checked():
    model = debug_bart()
    with pytest.raises(ValueError, match="attention_mask has shape"):
        model(
            ids(2, 8, seed=1), decoder_input_ids=ids(2, 4, seed=2), attention_mask=torch.ones(2, 7)
        )
    with pytest.raises(ValueError, match="decoder_input_ids must be"):
        model(ids(2, 8, seed=1), decoder_input_ids=ids(1, 8, seed=2)[0])
    with pytest.raises(ValueError, match="model.max_seq_len=128"):
        model(ids(1, 129, seed=1), decoder_input_ids=ids(1, 4, seed=2))


def test_chunked_loss_equals_the_logits_loss():
    model = debug_bart()
    enc, dec, labels = ids(2, 12, seed=1), ids(2, 10, seed=2), ids(2, 10, seed=3)
    labels[0, :3] = -100
    logits = model(enc, decoder_input_ids=dec)
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    model.loss_chunk_tokens = 4
    got = model(enc, decoder_input_ids=dec, labels=labels)["row_losses"]
    torch.testing.assert_close(got, want.view(2, 10).sum(1))


def test_autocast_bf16_forward_is_finite():
    model = debug_bart()
    enc, dec = ids(2, 12, seed=1), ids(2, 5, seed=2)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(enc, decoder_input_ids=dec, attention_mask=mask)
    full = model(enc, decoder_input_ids=dec, attention_mask=mask)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - full).abs().max() < 0.1 * full.abs().max()


def test_dropout_only_in_training():
    model = debug_bart(dropout=0.1)
    enc, dec = ids(2, 8, seed=1), ids(2, 4, seed=2)
    torch.testing.assert_close(model(enc, decoder_input_ids=dec), model(enc, decoder_input_ids=dec))
    model.train()
    assert not torch.allclose(model(enc, decoder_input_ids=dec), model(enc, decoder_input_ids=dec))


# ---- tying and initialisation -----------------------------------------------------------


def test_tied_after_to_empty_and_initialised_as_bart():
    cfg = load_cfg(vocab_size=VOCAB)
    with torch.device("meta"):
        model = Bart(cfg, vocab_size=VOCAB)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.shared.weight
    block = model.decoder.blocks["1"]
    assert block.cross_attn.q.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(block.cross_attn.q.bias, torch.zeros(128))
    assert torch.equal(block.ln_cross.weight, torch.ones(128))
    untied = debug_bart(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.shared.weight


# ---- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"pre_ln": True}, "model.pre_ln"),
        ({"norm": "rmsnorm"}, "model.norm"),
        ({"position": "rotary"}, "model.position"),
        ({"activation": "gated_gelu"}, "model.activation"),
        ({"type_vocab_size": 2}, "model.type_vocab_size"),
        ({"objective": "mlm"}, "objective mlm with model.family=bart"),
    ],
)
def test_unsupported_settings_name_the_field(override, field):
    cfg = load_cfg(vocab_size=VOCAB, **override)
    with pytest.raises(ConfigError, match=field):
        Bart(cfg, vocab_size=VOCAB)


def test_moe_and_pipelines_are_refused_by_name():
    cfg = load_cfg(vocab_size=VOCAB)
    with pytest.raises(
        ConfigError, match="model.moe.num_experts=4 is not supported by family=bart"
    ):
        dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=4)).validate()
    with pytest.raises(ConfigError, match="'bart' cannot be pipelined"):
        check_pipeline_split(cfg, pp=2, virtual_stages=1)


@pytest.mark.parametrize("objective", ["denoising", "mass", "span_corruption"])
def test_sequence_to_sequence_objectives_pair_with_encoder_decoders(objective):
    load_cfg(objective=objective).check_objective(objective)
    gpt = ModelConfig(family="gpt")
    with pytest.raises(ConfigError, match=f"objective {objective} with model.family=gpt"):
        gpt.check_objective(objective)


# ---- FLOPs and the tensor-parallel plan -------------------------------------------------


def test_flops_count_bart_as_a_t5_of_its_shape():
    cfg = load_cfg("bart_base")
    got = flops_per_token(cfg, vocab_size=50265, seq_len=1024, target_len=1024)
    assert got == t5_flops(cfg, vocab_size=50265, seq_len=1024, target_len=1024)
    # Encoder and decoder both see every token: about 6 x (the 139M parameters less the
    # position tables) plus attention over 1024 keys.
    assert 6 * 1.2e8 < got < 6 * 1.8e8


@pytest.mark.parametrize("sp", [False, True])
def test_tensor_parallel_plan_covers_every_parameter(sp):
    """Every parameter's module is matched by the plan (apply_tensor_parallel refuses plain
    parameters on two ranks, test_bart_training.py; here without a process group)."""
    from parallel.comm_model import _matches

    cfg = load_cfg(vocab_size=VOCAB, n_layer=3, n_decoder_layer=1)
    plan = tp_plan(cfg, sequence_parallel=sp)
    model = Bart(cfg, vocab_size=VOCAB)
    owners = {name.rpartition(".")[0] for name, _ in model.named_parameters()}
    assert [o for o in owners if not any(_matches(o, key) for key in plan)] == []
    if sp:
        assert "encoder.blocks.2" in plan and "decoder.blocks.0" in plan


# ---- training ----------------------------------------------------------------------------


def test_overfits_one_batch():
    model = debug_bart().train()
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
