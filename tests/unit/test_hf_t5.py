"""Hugging Face T5 interop: parameter counts, configs and logits through converted weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from models.build import build_model, param_counts
from models.config import ModelConfig
from models.t5 import T5
from tests.unit.helpers import one_thread, recipe  # noqa: F401 (one_thread: a fixture)

transformers = pytest.importorskip("transformers")
from models.hf.t5 import build_hf_model, from_hf, hf_config, loom_config, to_hf  # noqa: E402

VOCAB = 200


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("t5_small", 60_506_624),
        ("t5_base", 222_903_552),
        ("t5_large", 737_668_096),
        ("t5_3b", 2_851_598_336),
        ("t5_11b", 11_307_321_344),
        ("t5_v1_1_base", 247_577_856),
    ],
)
def test_parameter_counts_match_transformers(name, expected):
    cfg = recipe(name)
    with torch.device("meta"):
        ours = build_model(cfg, vocab_size=cfg.padded_vocab_size())
        theirs = build_hf_model(cfg, vocab_size=cfg.vocab_size)
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert param_counts(ours)["total"] == n_theirs == expected


def test_hf_config_fields():
    v10 = hf_config(recipe("t5_3b"), vocab_size=32128)
    assert (v10.d_model, v10.d_kv, v10.num_heads, v10.d_ff) == (1024, 128, 32, 16384)
    assert v10.feed_forward_proj == "relu" and v10.dense_act_fn == "relu"
    assert v10.layer_norm_epsilon == 1e-6 and v10.relative_attention_num_buckets == 32
    v11 = hf_config(recipe("t5_v1_1_base"), vocab_size=32128)
    assert v11.is_gated_act and v11.dense_act_fn == "gelu_new"
    # transformers 5 always ties and keeps the v1.1 flag as "no output rescaling"
    assert getattr(v11, "scale_decoder_outputs", v11.tie_word_embeddings) is False


def _pair(name: str, **overrides) -> tuple[ModelConfig, T5, torch.nn.Module]:
    """A Loom model and a Hugging Face model with random (different) weights."""
    cfg = recipe(name, vocab_size=VOCAB, n_decoder_layer=3, d_model=64, n_head=4, d_kv=24)
    cfg = dataclasses.replace(cfg, **overrides)
    torch.manual_seed(0)
    ours = T5(cfg, vocab_size=VOCAB).eval()
    torch.manual_seed(1)
    theirs = build_hf_model(cfg, vocab_size=VOCAB).eval()
    return cfg, ours, theirs


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, 29:] = 0
    return {
        "input_ids": torch.randint(0, VOCAB, (2, 37), generator=gen),
        "decoder_input_ids": torch.randint(0, VOCAB, (2, 11), generator=gen),
        "attention_mask": mask,
    }


def _ours(model: T5, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(
        batch["input_ids"],
        decoder_input_ids=batch["decoder_input_ids"],
        attention_mask=batch["attention_mask"].bool(),
    )


@pytest.mark.parametrize("name", ["t5_debug", "t5_v1_1_debug"])
def test_hf_to_loom_logits_match(name):
    cfg, ours, theirs = _pair(name)
    batch = _inputs()
    ours.load_state_dict(from_hf(theirs.state_dict(), cfg), strict=True)
    with torch.no_grad():
        expected = theirs(**batch).logits
        got = _ours(ours, batch)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert (ours.lm_head.weight is ours.shared.weight) == cfg.tie_embeddings


@pytest.mark.parametrize("name", ["t5_debug", "t5_v1_1_debug"])
def test_loom_to_hf_logits_match(name):
    cfg, ours, theirs = _pair(name)
    batch = _inputs()
    with torch.no_grad():
        before = theirs(**batch).logits
        theirs.load_state_dict(to_hf(ours.state_dict(), cfg), strict=True)
        expected = _ours(ours, batch)
        got = theirs(**batch).logits
    assert not torch.allclose(before, got)  # the weights really were replaced
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_round_trip_is_identity():
    cfg, ours, _ = _pair("t5_v1_1_debug")
    state = ours.state_dict()
    back = from_hf(to_hf(state, cfg), cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_missing_and_unexpected_keys_are_named():
    cfg, ours, theirs = _pair("t5_debug")
    state = theirs.state_dict()
    del state["decoder.block.2.layer.1.EncDecAttention.k.weight"]
    with pytest.raises(ValueError, match="decoder.block.2.layer.1.EncDecAttention.k.weight"):
        from_hf(state, cfg)
    extra = {**ours.state_dict(), "encoder.blocks.9.attn.q.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="encoder.blocks.9.attn.q.weight"):
        to_hf(extra, cfg)


def test_untied_head_without_rescaling_only():
    cfg = recipe("t5_debug", scale_logits=False)
    with pytest.raises(ValueError, match="model.scale_logits=False"):
        hf_config(cfg, vocab_size=VOCAB)


def test_padded_vocabulary_rows_are_dropped_and_restored():
    cfg, ours, theirs = _pair("t5_v1_1_debug", make_vocab_size_divisible_by=64)
    rows = cfg.padded_vocab_size()
    ours = T5(cfg, vocab_size=rows).eval()
    assert rows == 256
    hf_state = to_hf(ours.state_dict(), cfg)
    assert hf_state["shared.weight"].shape[0] == hf_state["lm_head.weight"].shape[0] == VOCAB
    theirs.load_state_dict(hf_state, strict=True)
    batch = _inputs()
    with torch.no_grad():
        expected = _ours(ours, batch)[..., :VOCAB]
        torch.testing.assert_close(theirs(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    back = from_hf(theirs.state_dict(), cfg)
    assert back["shared.weight"].shape[0] == rows
    assert not back["lm_head.weight"][VOCAB:].any()
    T5(cfg, vocab_size=rows).load_state_dict(back, strict=True)
    with pytest.raises(ValueError, match="model.vocab_size=300"):
        from_hf(theirs.state_dict(), dataclasses.replace(cfg, vocab_size=300))


@pytest.mark.parametrize("name", ["t5_3b", "t5_v1_1_base"])
def test_loom_config_inverts_hf_config(name):
    cfg = recipe(name)
    back = loom_config(hf_config(cfg, vocab_size=32128), name=name)
    same = ("vocab_size", "n_layer", "n_decoder_layer", "d_model", "n_head", "d_kv", "d_ff")
    same += ("activation", "tie_embeddings", "scale_logits", "layer_norm_eps", "dropout")
    assert {k: getattr(back, k) for k in same} == {k: getattr(cfg, k) for k in same}
