"""Loom Bert without token types or pair head (the distilbert_* recipes) <->
transformers.DistilBertForMaskedLM: parameter counts, logits both ways, exact round trips,
refusals, registry selection, training-only keys and launch/export_hf.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from models import build_model, param_counts
from models.bert import Bert
from models.config import ModelConfig
from models.hf import distilbert
from models.hf.distilbert import from_hf, hf_config, loom_config, to_hf
from tests.unit.helpers import randomise_, recipe

transformers = pytest.importorskip("transformers")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
VOCAB = 101
SMALL = ModelConfig(
    name="distilbert_tiny",
    family="bert",
    objective="mlm",
    n_layer=2,
    d_model=48,
    n_head=4,
    d_ff=80,
    max_seq_len=32,
    layer_norm_eps=1e-12,
    pre_ln=False,
    activation="gelu",
    type_vocab_size=0,
    pair_head=False,
)


def hf_model(cfg: ModelConfig, vocab: int = VOCAB) -> torch.nn.Module:
    config = hf_config(cfg, vocab_size=vocab, attn_implementation="eager")
    return transformers.DistilBertForMaskedLM(config).eval()


def padded_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (3, 20) and an attention mask with two right-padded rows."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[2, 6:] = 0
    return ids, mask


def loom_logits(model: torch.nn.Module, ids: torch.Tensor, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask)["logits"]


def hf_logits(model: torch.nn.Module, ids: torch.Tensor, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# ---- recipes and parameter counts ---------------------------------------------------------


def test_parameter_count_equals_distilbert_for_masked_lm():
    """distilbert_base has every tensor of DistilBertForMaskedLM and nothing else."""
    cfg = recipe("distilbert_base")
    with torch.device("meta"):
        ours = param_counts(build_model(cfg, vocab_size=cfg.padded_vocab_size()))["total"]
        theirs = transformers.DistilBertForMaskedLM(hf_config(cfg, vocab_size=cfg.vocab_size))
        released = transformers.DistilBertForMaskedLM(transformers.DistilBertConfig())
    # parameters() yields each tied tensor once, as param_counts does.
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert n_theirs == sum(p.numel() for p in released.parameters()) == 66_985_530
    assert ours == n_theirs


def test_distilbert_base_is_bert_base_at_half_depth_without_types_and_pair_head():
    with torch.device("meta"):
        bert = param_counts(build_model(recipe("bert_base"), vocab_size=30522))["total"]
        ours = param_counts(build_model(recipe("distilbert_base"), vocab_size=30522))["total"]
    d, f = 768, 3072
    block = (3 * d * d + 3 * d) + (d * d + d) + (2 * d * f + f + d) + 2 * 2 * d
    assert bert - ours == 6 * block + 2 * d + (d * d + d) + (2 * d + 2)


def test_distilbert_recipes_are_the_released_config_and_its_tiny_twin():
    assert loom_config(transformers.DistilBertConfig(), name="distilbert_base") == recipe(
        "distilbert_base"
    )
    debug = recipe("distilbert_debug")
    debug.validate()
    assert (debug.n_layer, debug.d_model, debug.n_head, debug.ffn_size) == (2, 128, 4, 512)
    assert debug.vocab_size is None and debug.type_vocab_size == 0 and not debug.has_pair_head
    hf_config(debug, vocab_size=VOCAB)  # converts


# ---- logits and round trips ---------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_hf_weights_give_the_same_logits_in_loom(activation):
    cfg = dataclasses.replace(SMALL, activation=activation)
    hf = hf_model(cfg)
    randomise_(hf, seed=1)
    loom = Bert(cfg, vocab_size=VOCAB).eval()
    loom.load_state_dict(from_hf(hf.state_dict(), cfg), strict=True)
    ids, mask = padded_batch(seed=2)
    torch.testing.assert_close(
        loom_logits(loom, ids, mask), hf_logits(hf, ids, mask), rtol=0, atol=1e-5
    )


def test_loom_weights_give_the_same_logits_in_hf():
    loom = Bert(SMALL, vocab_size=VOCAB).eval()
    randomise_(loom, seed=3)
    hf = hf_model(SMALL)
    hf.load_state_dict(to_hf(loom.state_dict(), SMALL), strict=True)
    ids, mask = padded_batch(seed=4)
    torch.testing.assert_close(
        loom_logits(loom, ids, mask), hf_logits(hf, ids, mask), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(loom_logits(loom, ids), hf_logits(hf, ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"tie_embeddings": False}, {"vocab_size": VOCAB, "make_vocab_size_divisible_by": 64}],
    ids=["tied", "untied", "padded_rows"],
)
def test_round_trip_loom_hf_loom_is_exact(overrides):
    cfg = dataclasses.replace(SMALL, **overrides)
    rows = cfg.padded_vocab_size(VOCAB)
    loom = Bert(cfg, vocab_size=rows)
    randomise_(loom, seed=5)
    if rows > VOCAB:  # rows beyond the vocabulary are not exported; Loom's own are zero
        with torch.no_grad():
            loom.wte.weight[VOCAB:] = 0
            loom.lm_head.bias[VOCAB:] = 0
    sd = loom.state_dict()
    hf_sd = to_hf(sd, cfg)
    assert hf_sd["distilbert.embeddings.word_embeddings.weight"].shape[0] == VOCAB
    positions = hf_sd["distilbert.embeddings.position_embeddings.weight"]
    assert torch.equal(positions, sd["wpe.weight"])  # same rows, position p at row p
    hf_model(cfg).load_state_dict(hf_sd, strict=True)
    back = from_hf(hf_sd, cfg)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value), key


def test_qkv_is_split_per_head():
    """Loom's qkv rows are (head, {q,k,v}, K): head 1's key rows are rows 3K + K .. 3K + 2K."""
    loom = Bert(SMALL, vocab_size=VOCAB)
    randomise_(loom, seed=6)
    sd = loom.state_dict()
    k = SMALL.head_dim
    key_rows = to_hf(sd, SMALL)["distilbert.transformer.layer.1.attention.k_lin.weight"]
    assert torch.equal(key_rows[k : 2 * k], sd["blocks.1.attn.qkv.weight"][4 * k : 5 * k])


def test_hf_config_and_loom_config_invert_each_other():
    config = hf_config(SMALL, vocab_size=VOCAB, token_ids={"[CLS]": 7, "<pad>": 9})
    assert config.model_type == "distilbert"
    assert (config.vocab_size, config.dim, config.n_layers, config.n_heads) == (VOCAB, 48, 2, 4)
    assert (config.hidden_dim, config.max_position_embeddings) == (80, SMALL.max_seq_len)
    assert config.activation == "gelu" and config.sinusoidal_pos_embds is False
    assert config.pad_token_id is None
    cfg = dataclasses.replace(SMALL, vocab_size=VOCAB, dropout=0.1, activation="relu")
    assert loom_config(hf_config(cfg, vocab_size=VOCAB), name=cfg.name) == cfg


# ---- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pair_head", None),
        ("type_vocab_size", 1),
        ("pre_ln", True),
        ("position", "rotary"),
        ("activation", "gelu_tanh"),
        ("layer_norm_eps", 1e-5),
        ("d_kv", 16),  # 4 heads of 16 != d_model 48
        ("embedding_size", 16),
        ("share_layers", True),
        ("norm", "rmsnorm"),
        ("bias", False),
        ("sbo_max_targets", 15),
    ],
)
def test_architectures_without_an_hf_distilbert_twin_are_refused(field, value):
    cfg = dataclasses.replace(SMALL, **{field: value})
    with pytest.raises(ValueError, match=f"model.{field}"):
        hf_config(cfg, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=f"model.{field}"):
        to_hf({}, cfg)
    with pytest.raises(ValueError, match=f"model.{field}"):
        from_hf({}, cfg)


def test_hf_configs_and_weights_loom_cannot_read_are_named():
    with pytest.raises(ValueError, match="sinusoidal_pos_embds=True"):
        loom_config(transformers.DistilBertConfig(sinusoidal_pos_embds=True))
    with pytest.raises(ValueError, match="activation='gelu_new'"):
        loom_config(transformers.DistilBertConfig(activation="gelu_new"))
    with pytest.raises(ValueError, match="model.moe.num_experts=2"):
        hf_config(
            dataclasses.replace(SMALL, moe=dataclasses.replace(SMALL.moe, num_experts=2)),
            vocab_size=VOCAB,
        )
    hf_sd = hf_model(SMALL).state_dict()
    with pytest.raises(ValueError, match="32 rows but model.max_seq_len=16"):
        from_hf(hf_sd, dataclasses.replace(SMALL, max_seq_len=16))
    hf_sd["distilbert.transformer.layer.2.ffn.lin2.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected.*layer.2.ffn.lin2.weight"):
        from_hf(hf_sd, SMALL)


# ---- registry -----------------------------------------------------------------------------


def test_registry_picks_bert_roberta_or_distilbert_from_the_config():
    from models import hf as hf_convert

    bert = dataclasses.replace(SMALL, objective="mlm_nsp", pair_head=None, type_vocab_size=2)
    roberta = dataclasses.replace(SMALL, type_vocab_size=1)
    picked = {
        name: hf_convert.hf_model_class("bert", cfg)
        for name, cfg in (("bert", bert), ("roberta", roberta), ("distilbert", SMALL))
    }
    assert picked == {
        "bert": transformers.BertForPreTraining,
        "roberta": transformers.RobertaForMaskedLM,
        "distilbert": transformers.DistilBertForMaskedLM,
    }
    config = transformers.DistilBertConfig()
    assert hf_convert.family_of(config) == "bert"
    assert hf_convert.hf_model_class("bert", hf_cfg=config) is transformers.DistilBertForMaskedLM
    derived = hf_convert.loom_config("bert", hf_config(SMALL, vocab_size=VOCAB))
    assert dataclasses.replace(derived, name=SMALL.name) == dataclasses.replace(
        SMALL, vocab_size=VOCAB
    )
    assert hf_convert.token_conventions("bert", SMALL) is distilbert.TOKENS
    loom = Bert(SMALL, vocab_size=VOCAB)
    with torch.device("meta"):
        hf = hf_convert.build_hf_model("bert", SMALL, vocab_size=VOCAB)
    assert type(hf) is transformers.DistilBertForMaskedLM
    assert set(hf_convert.to_hf("bert", loom.state_dict(), SMALL)) == set(hf.state_dict())


@pytest.mark.parametrize("model", ["bert", "roberta", "distilbert"])
def test_to_hf_drops_training_only_distillation_projections(model):
    """A student's `distill_proj.*` modules exist for training only: the dispatcher drops
    them for every HF model of family bert, and nothing else."""
    from models import hf as hf_convert

    cfg = {
        "bert": dataclasses.replace(SMALL, objective="mlm_nsp", pair_head=None, type_vocab_size=2),
        "roberta": dataclasses.replace(SMALL, type_vocab_size=1),
        "distilbert": SMALL,
    }[model]
    sd = Bert(cfg, vocab_size=VOCAB).state_dict()
    extra = {"distill_proj.0.weight": torch.zeros(4, 48), "distill_proj.0.bias": torch.zeros(4)}
    expected = hf_convert.to_hf("bert", sd, cfg)
    got = hf_convert.to_hf("bert", sd | extra, cfg)
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="unexpected.*distill_projection"):
        hf_convert.to_hf("bert", sd | {"distill_projection.weight": torch.zeros(1)}, cfg)


# ---- launch/export_hf.py ------------------------------------------------------------------


def test_export_of_a_distilbert_debug_run_reloads_in_transformers(tmp_path, monkeypatch):
    """distilbert_debug's checkpoint (byte tokenizer, and a distillation projection that is
    left out) -> an HF folder that AutoModelForMaskedLM, AutoTokenizer and the fill-mask
    pipeline load offline, with Loom's logits and ids; --to-loom gives it back."""
    from data_pipeline.tokenizers import ByteTokenizer
    from tests.unit.test_export_hf import export_hf, fake_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = ByteTokenizer()
    cfg = dataclasses.replace(recipe("distilbert_debug"), vocab_size=tok.vocab_size)
    model, step = fake_run(tmp_path, cfg)
    # A distilled student's checkpoint also holds its training-only projections.
    state = torch.load(step / "model.pt", weights_only=True)
    state["distill_proj.hidden.weight"] = torch.ones(4, cfg.d_model)
    torch.save(state, step / "model.pt")
    out = tmp_path / "hf"
    export_hf.main(["--checkpoint", str(step), "--output", str(out), "--tokenizer", "byte"])

    hf = transformers.AutoModelForMaskedLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf) is transformers.DistilBertForMaskedLM
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    special = tok.special_tokens
    text = "Loom distils BERT."
    expected = [special["[CLS]"], *tok.encode(text), special["[SEP]"]]
    assert hf_tok(text)["input_ids"] == expected
    assert "token_type_ids" not in hf_tok(text)
    assert hf_tok.mask_token_id == special["[MASK]"]
    ids = torch.tensor([expected])
    torch.testing.assert_close(hf_logits(hf, ids), loom_logits(model, ids), rtol=0, atol=1e-5)

    fill = transformers.pipeline("fill-mask", model=str(out), top_k=3)
    masked = [special["[CLS]"], *tok.encode("Loom "), special["[MASK]"], special["[SEP]"]]
    where = masked.index(special["[MASK]"])
    best = loom_logits(model, torch.tensor([masked]))[0, where, : tok.vocab_size].topk(3)
    got = fill(f"Loom {fill.tokenizer.mask_token}")
    assert [g["token"] for g in got] == best.indices.tolist()

    loom_dir = tmp_path / "loom"
    export_hf.main(["--to-loom", "--checkpoint", str(out), "--output", str(loom_dir)])
    derived = export_hf.load_model_config(loom_dir / "config.yaml")
    assert derived == dataclasses.replace(cfg, name=derived.name)
    state = torch.load(loom_dir / "model.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
