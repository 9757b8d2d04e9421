"""Loom Bert without a pair head (the roberta_* recipes) <-> transformers.RobertaForMaskedLM:
parameter counts, logits both ways, exact round trips, dispatch and launch/export_hf.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from models import build_model, param_counts
from models.bert import Bert
from models.config import ModelConfig
from models.hf import roberta
from models.hf.roberta import from_hf, hf_config, loom_config, to_hf

transformers = pytest.importorskip("transformers")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
VOCAB = 101
PAD = roberta.PAD_ID
SMALL = ModelConfig(
    name="roberta_tiny",
    family="bert",
    objective="mlm",
    n_layer=2,
    d_model=48,
    n_head=4,
    d_ff=80,
    max_seq_len=32,
    pre_ln=False,
    activation="gelu",
    type_vocab_size=1,
    pair_head=False,
)


def recipe(name: str) -> ModelConfig:
    schema = OmegaConf.structured(ModelConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(CONF_DIR / f"{name}.yaml")))


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter, biases and norms included, so none maps by luck."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def hf_model(cfg: ModelConfig, vocab: int = VOCAB) -> torch.nn.Module:
    config = hf_config(cfg, vocab_size=vocab, attn_implementation="eager")
    return transformers.RobertaForMaskedLM(config).eval()


def unpadded(seed: int) -> torch.Tensor:
    """Token ids without RoBERTa's padding id, which HF would number as padding."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(PAD + 1, VOCAB, (3, 20), generator=gen)


def loom_logits(model: torch.nn.Module, ids: torch.Tensor, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask)["logits"]


def hf_logits(model: torch.nn.Module, ids: torch.Tensor, mask=None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# ---- parameter counts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hf_expected", "loom_expected"),
    [("roberta_base", 124_697_433, 124_695_897), ("roberta_large", 355_412_057, 355_410_009)],
)
def test_parameter_counts_against_roberta_for_masked_lm(name, hf_expected, loom_expected):
    """Loom has every tensor of RobertaForMaskedLM but HF's two position rows before
    position 0 (models/hf/roberta.py): the counts differ by exactly 2 x d_model."""
    cfg = recipe(name)
    reference = transformers.RobertaConfig(
        vocab_size=50265,
        max_position_embeddings=514,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        **(
            {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16}
            | {"intermediate_size": 4096}
            if name == "roberta_large"
            else {}
        ),
    )
    with torch.device("meta"):
        ours = param_counts(build_model(cfg, vocab_size=cfg.padded_vocab_size()))["total"]
        theirs = transformers.RobertaForMaskedLM(hf_config(cfg, vocab_size=cfg.vocab_size))
        released = transformers.RobertaForMaskedLM(reference)
    # parameters() yields each tied tensor once, as param_counts does.
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert n_theirs == sum(p.numel() for p in released.parameters()) == hf_expected
    assert ours == loom_expected == hf_expected - 2 * cfg.d_model


def test_no_pair_head_drops_exactly_the_pooler_and_classifier():
    """roberta_base is bert_base with one token type, RoBERTa's vocabulary and no pair head."""
    bert = dataclasses.replace(recipe("bert_base"), vocab_size=50265, type_vocab_size=1)
    with torch.device("meta"):
        with_head = param_counts(build_model(bert, vocab_size=50265))["total"]
        ours = param_counts(build_model(recipe("roberta_base"), vocab_size=50265))["total"]
    d = 768
    assert with_head - ours == (d * d + d) + (2 * d + 2)


def test_roberta_base_recipe_is_the_released_config():
    released = transformers.RobertaConfig(
        vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5
    )
    assert loom_config(released, name="roberta_base") == recipe("roberta_base")


# ---- logits and round trips ---------------------------------------------------------------


def test_hf_weights_give_the_same_logits_in_loom():
    hf = hf_model(SMALL)
    randomise_(hf, seed=1)
    loom = Bert(SMALL, vocab_size=VOCAB).eval()
    loom.load_state_dict(from_hf(hf.state_dict(), SMALL), strict=True)
    ids = unpadded(seed=2)
    diff = (loom_logits(loom, ids) - hf_logits(hf, ids)).abs().max().item()
    assert diff <= 1e-5, diff


def test_padded_rows_agree_on_their_real_tokens():
    """Right padding with RoBERTa's pad id and an attention mask: HF numbers the pads apart
    (they read its padding row), Loom masks them; the real tokens agree."""
    hf = hf_model(SMALL)
    randomise_(hf, seed=3)
    loom = Bert(SMALL, vocab_size=VOCAB).eval()
    loom.load_state_dict(from_hf(hf.state_dict(), SMALL), strict=True)
    ids = unpadded(seed=4)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[2, 6:] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    ours, theirs = loom_logits(loom, ids, mask), hf_logits(hf, ids, mask)
    real = mask.bool()
    diff = (ours[real] - theirs[real]).abs().max().item()
    assert diff <= 1e-5, diff


def test_loom_weights_give_the_same_logits_in_hf():
    loom = Bert(SMALL, vocab_size=VOCAB).eval()
    randomise_(loom, seed=5)
    hf = hf_model(SMALL)
    hf.load_state_dict(to_hf(loom.state_dict(), SMALL), strict=True)
    ids = unpadded(seed=6)
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
    randomise_(loom, seed=7)
    if rows > VOCAB:  # rows beyond the vocabulary are not exported; Loom's own are zero
        with torch.no_grad():
            loom.wte.weight[VOCAB:] = 0
            loom.lm_head.bias[VOCAB:] = 0
    sd = loom.state_dict()
    hf_sd = to_hf(sd, cfg)
    # HF's position table: the padding row and the unused row 0, then Loom's positions.
    table = hf_sd["roberta.embeddings.position_embeddings.weight"]
    assert table.shape == (cfg.max_seq_len + 2, cfg.d_model) and not table[:2].any()
    assert torch.equal(table[2:], sd["wpe.weight"])
    assert hf_sd["roberta.embeddings.word_embeddings.weight"].shape[0] == VOCAB
    hf_model(cfg).load_state_dict(hf_sd, strict=True)
    back = from_hf(hf_sd, cfg)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value), key


def test_hf_config_and_loom_config_invert_each_other():
    config = hf_config(SMALL, vocab_size=VOCAB, token_ids={"[CLS]": 7, "[SEP]": 8, "<pad>": 9})
    assert config.model_type == "roberta"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (VOCAB, 48, 2)
    assert config.max_position_embeddings == SMALL.max_seq_len + 2
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (PAD, 7, 8)
    assert config.type_vocab_size == 1 and config.layer_norm_eps == 1e-5
    cfg = dataclasses.replace(SMALL, vocab_size=VOCAB, dropout=0.1)
    assert loom_config(hf_config(cfg, vocab_size=VOCAB), name=cfg.name) == cfg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pair_head", None),
        ("embedding_size", 16),
        ("share_layers", True),
        ("pre_ln", True),
        ("position", "rotary"),
        ("type_vocab_size", 0),
        ("activation", "gelu_tanh"),  # RobertaLMHead applies the exact GELU whatever hidden_act
    ],
)
def test_architectures_without_an_hf_roberta_twin_are_refused(field, value):
    cfg = dataclasses.replace(SMALL, **{field: value})
    with pytest.raises(ValueError, match=f"model.{field}"):
        hf_config(cfg, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=f"model.{field}"):
        to_hf({}, cfg)


def test_hf_configs_and_weights_loom_cannot_read_are_named():
    with pytest.raises(ValueError, match="pad_token_id=0"):
        loom_config(transformers.RobertaConfig(pad_token_id=0))
    with pytest.raises(ValueError, match="hidden_act='gelu_new'"):
        loom_config(transformers.RobertaConfig(hidden_act="gelu_new"))
    hf_sd = hf_model(SMALL).state_dict()
    short = dataclasses.replace(SMALL, max_seq_len=16)
    with pytest.raises(ValueError, match="34 rows but model.max_seq_len=16 needs 18"):
        from_hf(hf_sd, short)
    hf_sd["roberta.encoder.layer.2.output.dense.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected.*layer.2.output.dense.weight"):
        from_hf(hf_sd, SMALL)


def test_dispatch_picks_roberta_for_a_bert_without_the_pair_head():
    from models import hf as hf_convert

    assert hf_convert.hf_model_class("bert") is transformers.BertForPreTraining
    assert hf_convert.hf_model_class("bert", SMALL) is transformers.RobertaForMaskedLM
    config = transformers.RobertaConfig()
    assert hf_convert.family_of(config) == "bert"
    assert hf_convert.hf_model_class("bert", hf_cfg=config) is transformers.RobertaForMaskedLM
    assert hf_convert.loom_config("bert", hf_config(SMALL, vocab_size=VOCAB)).pair_head is False
    assert hf_convert.token_conventions("bert", SMALL) is roberta.TOKENS
    loom = Bert(SMALL, vocab_size=VOCAB)
    with torch.device("meta"):
        hf = hf_convert.build_hf_model("bert", SMALL, vocab_size=VOCAB)
    assert type(hf) is transformers.RobertaForMaskedLM
    assert set(hf_convert.to_hf("bert", loom.state_dict(), SMALL)) == set(hf.state_dict())


# ---- launch/export_hf.py ------------------------------------------------------------------


def test_export_of_a_roberta_debug_run_reloads_in_transformers(tmp_path, monkeypatch):
    """roberta_debug's checkpoint (byte tokenizer) -> an HF folder that AutoModelForMaskedLM
    and AutoTokenizer load offline, with Loom's logits and ids; --to-loom gives it back."""
    from data_pipeline.tokenizers import ByteTokenizer
    from tests.unit.test_export_hf import export_hf, fake_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = ByteTokenizer()
    cfg = dataclasses.replace(recipe("roberta_debug"), vocab_size=tok.vocab_size)
    model, step = fake_run(tmp_path, cfg)
    out = tmp_path / "hf"
    export_hf.main(["--checkpoint", str(step), "--output", str(out), "--tokenizer", "byte"])

    hf = transformers.AutoModelForMaskedLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf) is transformers.RobertaForMaskedLM
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    special = tok.special_tokens
    text = "Loom trains RoBERTa."
    expected = [special["[CLS]"], *tok.encode(text), special["[SEP]"]]
    assert hf_tok(text)["input_ids"] == expected
    assert "token_type_ids" not in hf_tok(text)
    assert hf_tok.mask_token_id == special["[MASK]"]
    ids = torch.tensor([expected])
    torch.testing.assert_close(hf_logits(hf, ids), loom_logits(model, ids), rtol=0, atol=1e-5)

    loom_dir = tmp_path / "loom"
    export_hf.main(["--to-loom", "--checkpoint", str(out), "--output", str(loom_dir)])
    derived = export_hf.load_model_config(loom_dir / "config.yaml")
    assert derived == dataclasses.replace(cfg, name=derived.name)
    state = torch.load(loom_dir / "model.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
