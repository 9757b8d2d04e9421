"""Loom Bert <-> transformers.BertForPreTraining: weights convert both ways, logits agree."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from models import build_model, param_counts
from models.bert import Bert
from models.config import ModelConfig
from models.hf.bert import from_hf, hf_config, loom_config, to_hf

transformers = pytest.importorskip("transformers")

VOCAB = 101
SMALL = ModelConfig(
    name="bert_tiny",
    family="bert",
    objective="mlm_nsp",
    n_layer=2,
    d_model=48,
    n_head=4,
    d_ff=80,
    max_seq_len=32,
    layer_norm_eps=1e-12,
    pre_ln=False,
    activation="gelu",
    type_vocab_size=2,
)


CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter, biases and norms included, so none maps by luck."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def hf_model(cfg: ModelConfig) -> torch.nn.Module:
    config = hf_config(cfg, vocab_size=VOCAB, attn_implementation="eager")
    return transformers.BertForPreTraining(config).eval()


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 20), generator=gen)
    types = torch.zeros_like(ids)
    types[:, 9:] = 1
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[2, 6:] = 0
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def compare(hf, loom, inputs) -> None:
    with torch.no_grad():
        theirs = hf(**inputs)
        ours = loom(inputs["input_ids"], **{k: v for k, v in inputs.items() if k != "input_ids"})
    torch.testing.assert_close(ours["logits"], theirs.prediction_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        ours["nsp_logits"], theirs.seq_relationship_logits, rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_hf_weights_give_the_same_logits_in_loom(activation):
    cfg = dataclasses.replace(SMALL, activation=activation)
    hf = hf_model(cfg)
    randomise_(hf, seed=1)
    loom = Bert(cfg, vocab_size=VOCAB).eval()
    loom.load_state_dict(from_hf(hf.state_dict(), cfg), strict=True)
    compare(hf, loom, batch())


def test_loom_weights_give_the_same_logits_in_hf():
    loom = Bert(SMALL, vocab_size=VOCAB).eval()
    randomise_(loom, seed=2)
    hf = hf_model(SMALL)
    hf.load_state_dict(to_hf(loom.state_dict(), SMALL), strict=True)
    compare(hf, loom, batch(seed=3))


def test_untied_decoder_converts_both_ways():
    cfg = dataclasses.replace(SMALL, tie_embeddings=False)
    loom = Bert(cfg, vocab_size=VOCAB).eval()
    randomise_(loom, seed=4)
    assert loom.lm_head.weight is not loom.wte.weight
    hf = hf_model(cfg)
    hf.load_state_dict(to_hf(loom.state_dict(), cfg), strict=True)
    compare(hf, loom, batch(seed=5))
    back = from_hf(hf.state_dict(), cfg)
    torch.testing.assert_close(back["lm_head.weight"], loom.lm_head.weight, rtol=0, atol=0)


def test_round_trip_is_exact_and_qkv_is_split_per_head():
    loom = Bert(SMALL, vocab_size=VOCAB)
    randomise_(loom, seed=6)
    sd = loom.state_dict()
    back = from_hf(to_hf(sd, SMALL), SMALL)
    assert set(back) == set(sd)
    for key, value in sd.items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0)
    # qkv output rows are (head, {q,k,v}, head_dim): head 1's key rows are rows 1*3K + K..
    k = SMALL.d_model // SMALL.n_head
    hf_sd = to_hf(sd, SMALL)
    qkv = sd["blocks.0.attn.qkv.weight"]
    key_rows_head1 = hf_sd["bert.encoder.layer.0.attention.self.key.weight"][k : 2 * k]
    torch.testing.assert_close(key_rows_head1, qkv[3 * k + k : 3 * k + 2 * k], rtol=0, atol=0)


def test_hf_config_carries_the_architecture():
    config = hf_config(SMALL, vocab_size=VOCAB)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (VOCAB, 48, 2)
    assert (config.num_attention_heads, config.intermediate_size) == (4, 80)
    assert config.hidden_act == "gelu" and config.layer_norm_eps == 1e-12
    assert config.max_position_embeddings == 32 and config.type_vocab_size == 2
    assert config.pad_token_id is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("embedding_size", 16),
        ("share_layers", True),
        ("pre_ln", True),
        ("position", "rotary"),
        ("activation", "gated_gelu"),
        ("type_vocab_size", 0),
    ],
)
def test_architectures_without_an_hf_bert_twin_are_refused(field, value):
    cfg = dataclasses.replace(SMALL, **{field: value})
    with pytest.raises(ValueError, match=f"model.{field}"):
        hf_config(cfg, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=f"model.{field}"):
        to_hf({}, cfg)


def test_missing_and_unexpected_keys_are_named():
    sd = Bert(SMALL, vocab_size=VOCAB).state_dict()
    del sd["blocks.1.attn.qkv.bias"]
    with pytest.raises(ValueError, match="blocks.1.attn.qkv.bias"):
        to_hf(sd, SMALL)
    hf_sd = hf_model(SMALL).state_dict()
    hf_sd["bert.encoder.layer.2.output.dense.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected.*layer.2.output.dense.weight"):
        from_hf(hf_sd, SMALL)


def test_padded_vocabulary_rows_are_dropped_and_restored():
    cfg = dataclasses.replace(SMALL, vocab_size=VOCAB, make_vocab_size_divisible_by=64)
    rows = cfg.padded_vocab_size()
    assert rows == 128
    loom = Bert(cfg, vocab_size=rows).eval()
    randomise_(loom, seed=7)
    hf_sd = to_hf(loom.state_dict(), cfg)
    assert hf_sd["bert.embeddings.word_embeddings.weight"].shape[0] == VOCAB
    assert hf_sd["cls.predictions.bias"].shape == (VOCAB,)
    hf = hf_model(cfg)
    hf.load_state_dict(hf_sd, strict=True)
    inputs = batch(seed=8)
    with torch.no_grad():
        theirs = hf(**inputs).prediction_logits
        ours = loom(inputs["input_ids"], **{k: v for k, v in inputs.items() if k != "input_ids"})
    torch.testing.assert_close(ours["logits"][..., :VOCAB], theirs, rtol=0, atol=1e-5)
    back = from_hf(hf.state_dict(), cfg)
    assert back["wte.weight"].shape[0] == rows and back["lm_head.bias"].shape == (rows,)
    assert not back["wte.weight"][VOCAB:].any()
    Bert(cfg, vocab_size=rows).load_state_dict(back, strict=True)


def test_loom_config_inverts_hf_config():
    cfg = dataclasses.replace(SMALL, vocab_size=VOCAB, dropout=0.1, activation="gelu_tanh")
    back = loom_config(hf_config(cfg, vocab_size=VOCAB), name=cfg.name)
    assert back == cfg
    with pytest.raises(ValueError, match="position_embedding_type"):
        loom_config(transformers.BertConfig(position_embedding_type="relative_key"))


def test_family_dispatch_of_the_hf_package():
    from models import hf as hf_convert

    assert hf_convert.hf_model_class("bert") is transformers.BertForPreTraining
    loom = Bert(SMALL, vocab_size=VOCAB)
    with torch.device("meta"):
        hf = hf_convert.build_hf_model("bert", SMALL, vocab_size=VOCAB)
    converted = hf_convert.to_hf("bert", loom.state_dict(), SMALL)
    assert set(converted) == set(hf.state_dict())


@pytest.mark.parametrize(
    ("name", "expected"), [("bert_base", 110_106_428), ("bert_large", 336_226_108)]
)
def test_parameter_counts_match_hf_bert_for_pretraining(name, expected):
    schema = OmegaConf.structured(ModelConfig)
    cfg = OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(CONF_DIR / f"{name}.yaml")))
    with torch.device("meta"):
        ours = param_counts(build_model(cfg, vocab_size=cfg.padded_vocab_size()))
        theirs = transformers.BertForPreTraining(hf_config(cfg, vocab_size=cfg.vocab_size))
    # parameters() yields each tied tensor once, as param_counts does.
    assert ours["total"] == sum(p.numel() for p in theirs.parameters()) == expected
