"""Loom Bart <-> transformers.BartForConditionalGeneration: parameter counts, logits both ways
with a padded encoder batch, exact round trips, refusals, dispatch and launch/export_hf.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from models import build_model, param_counts
from models.bart import Bart
from models.config import ModelConfig
from models.hf import bart
from models.hf.bart import from_hf, hf_config, loom_config, to_hf
from tests.unit.helpers import one_thread, randomise_, recipe  # noqa: F401 (one_thread: a fixture)

transformers = pytest.importorskip("transformers")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
VOCAB = 101
# 2 encoder layers and 1 decoder layer; 101 tokens padded to 112 embedding rows.
SMALL = ModelConfig(
    name="bart_tiny",
    family="bart",
    objective="denoising",
    vocab_size=VOCAB,
    make_vocab_size_divisible_by=16,
    n_layer=2,
    n_decoder_layer=1,
    d_model=32,
    n_head=4,
    d_ff=48,
    max_seq_len=24,
    pre_ln=False,
    activation="gelu",
)
ROWS = SMALL.padded_vocab_size()


def loom_model(cfg: ModelConfig = SMALL, *, seed: int) -> Bart:
    """A random Loom Bart whose padded vocabulary rows are zero, as a trained one's stay."""
    model = Bart(cfg, vocab_size=cfg.padded_vocab_size()).eval()
    randomise_(model, seed)
    with torch.no_grad():
        model.shared.weight[VOCAB:] = 0
    return model


def hf_model(cfg: ModelConfig = SMALL) -> torch.nn.Module:
    return transformers.BartForConditionalGeneration(hf_config(cfg, vocab_size=VOCAB)).eval()


def batch(seed: int) -> dict[str, torch.Tensor]:
    """Encoder rows right-padded by an attention mask, decoder rows likewise."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(3, 19, dtype=torch.long)
    mask[1, 12:] = 0
    mask[2, 5:] = 0
    decoder_mask = torch.ones(3, 9, dtype=torch.long)
    decoder_mask[2, 6:] = 0
    return {
        "input_ids": torch.randint(0, VOCAB, (3, 19), generator=gen),
        "attention_mask": mask,
        "decoder_input_ids": torch.randint(0, VOCAB, (3, 9), generator=gen),
        "decoder_attention_mask": decoder_mask,
    }


def loom_logits(model: Bart, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(
            inputs["input_ids"],
            decoder_input_ids=inputs["decoder_input_ids"],
            attention_mask=inputs["attention_mask"],
            decoder_attention_mask=inputs["decoder_attention_mask"],
        )


def hf_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# ---- parameter counts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hf_expected", "released"),
    [
        (
            "bart_base",
            139_420_416,
            {"d_model": 768, "encoder_layers": 6, "decoder_layers": 6}
            | {"encoder_attention_heads": 12, "decoder_attention_heads": 12}
            | {"encoder_ffn_dim": 3072, "decoder_ffn_dim": 3072},
        ),
        ("bart_large", 406_291_456, {}),  # BartConfig's defaults are bart-large's
    ],
)
def test_parameter_counts_against_bart_for_conditional_generation(name, hf_expected, released):
    """Loom has every parameter of BartForConditionalGeneration but the two position rows
    each HF stack keeps before position 0: the counts differ by exactly 2 x 2 x d_model."""
    cfg = recipe(name)
    reference = transformers.BartConfig(vocab_size=50265, **released)
    with torch.device("meta"):
        ours = param_counts(build_model(cfg, vocab_size=cfg.padded_vocab_size()))["total"]
        theirs = transformers.BartForConditionalGeneration(hf_config(cfg, vocab_size=50265))
    # parameters() yields each tied tensor once, as param_counts does.
    assert sum(p.numel() for p in theirs.parameters()) == hf_expected
    assert ours + 2 * 2 * cfg.d_model == hf_expected
    assert loom_config(reference, name=name) == cfg


# ---- logits and round trips ---------------------------------------------------------------


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
def test_loom_weights_give_the_same_logits_in_hf(activation):
    cfg = dataclasses.replace(SMALL, activation=activation)
    loom = loom_model(cfg, seed=1)
    hf = hf_model(cfg)
    hf.load_state_dict(to_hf(loom.state_dict(), cfg), strict=True)
    inputs = batch(seed=2)
    expected = loom_logits(loom, inputs)[..., :VOCAB]
    torch.testing.assert_close(hf_logits(hf, inputs), expected, rtol=0, atol=1e-5)


def test_hf_weights_give_the_same_logits_in_loom():
    hf = hf_model()
    randomise_(hf, seed=3)
    loom = Bart(SMALL, vocab_size=ROWS).eval()
    loom.load_state_dict(from_hf(hf.state_dict(), SMALL), strict=True)
    assert loom.lm_head.weight is loom.shared.weight
    inputs = batch(seed=4)
    ours = loom_logits(loom, inputs)
    torch.testing.assert_close(ours[..., :VOCAB], hf_logits(hf, inputs), rtol=0, atol=1e-5)
    assert not ours[..., VOCAB:].any()  # the padded rows are zeros


def test_round_trip_loom_hf_loom_is_exact():
    loom = loom_model(seed=5)
    sd = loom.state_dict()
    hf_sd = to_hf(sd, SMALL)
    for stack in ("encoder", "decoder"):
        table = hf_sd[f"model.{stack}.embed_positions.weight"]
        assert table.shape == (SMALL.max_seq_len + 2, SMALL.d_model) and not table[:2].any()
        assert torch.equal(table[2:], sd[f"{stack}.wpe.weight"])
    assert hf_sd["model.shared.weight"].shape[0] == VOCAB
    assert hf_sd["final_logits_bias"].shape == (1, VOCAB) and not hf_sd["final_logits_bias"].any()
    assert set(hf_sd) == set(hf_model().state_dict())
    back = from_hf(hf_sd, SMALL)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value), key


def test_hf_config_and_loom_config_invert_each_other():
    ids = {"<eos>": 7, "<pad>": 9, "[UNK]": 10, "[MASK]": 12}
    config = hf_config(SMALL, vocab_size=VOCAB, token_ids=ids)
    assert config.model_type == "bart"
    assert (config.encoder_layers, config.decoder_layers, config.d_model) == (2, 1, 32)
    assert (config.encoder_ffn_dim, config.decoder_attention_heads) == (48, 4)
    assert config.max_position_embeddings == SMALL.max_seq_len
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (9, 7, None)
    assert config.decoder_start_token_id == config.forced_eos_token_id == 7
    assert not config.scale_embedding and config.tie_word_embeddings
    cfg = dataclasses.replace(SMALL, make_vocab_size_divisible_by=1, dropout=0.1)
    config = hf_config(cfg, vocab_size=VOCAB)
    assert (config.dropout, config.attention_dropout, config.activation_dropout) == (0.1, 0.1, 0)
    assert loom_config(config, name=cfg.name) == cfg


# ---- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("d_kv", 16),
        ("bias", False),
        ("layer_norm_eps", 1e-6),
        ("tie_embeddings", False),
        ("activation", "gated_gelu"),
        ("pre_ln", True),
    ],
)
def test_architectures_without_an_hf_bart_twin_are_refused(field, value):
    cfg = dataclasses.replace(SMALL, **{field: value})
    with pytest.raises(ValueError, match=f"model.{field}"):
        hf_config(cfg, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=f"model.{field}"):
        to_hf({}, cfg)
    with pytest.raises(ValueError, match=f"model.{field}"):
        from_hf({}, cfg)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"scale_embedding": True}, "scale_embedding=True"),
        ({"tie_word_embeddings": False}, "tie_word_embeddings=False"),
        ({"normalize_before": True}, "normalize_before=True"),
        ({"decoder_attention_heads": 8}, "decoder_attention_heads=8"),
        ({"decoder_ffn_dim": 64}, "decoder_ffn_dim=64"),
        ({"activation_function": "silu"}, "activation_function='silu'"),
    ],
)
def test_hf_configs_loom_cannot_express_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        loom_config(hf_config(SMALL, vocab_size=VOCAB, **overrides))


def test_hf_weights_loom_cannot_read_are_named():
    hf_sd = hf_model().state_dict()
    with torch.no_grad():
        biased = {**hf_sd, "final_logits_bias": hf_sd["final_logits_bias"].clone()}
        biased["final_logits_bias"][0, 3] = 0.5
    with pytest.raises(ValueError, match="final_logits_bias is non-zero"):
        from_hf(biased, SMALL)
    alias = "model.decoder.embed_tokens.weight"
    with pytest.raises(ValueError, match=f"{alias} differs from model.shared.weight"):
        from_hf({**hf_sd, alias: hf_sd[alias] + 1}, SMALL)
    short = dataclasses.replace(SMALL, max_seq_len=16)
    with pytest.raises(ValueError, match="26 rows but model.max_seq_len=16 needs 18"):
        from_hf(hf_sd, short)
    missing = dict(hf_sd)
    del missing["model.decoder.layers.0.encoder_attn.k_proj.bias"]
    with pytest.raises(ValueError, match="model.decoder.layers.0.encoder_attn.k_proj.bias"):
        from_hf(missing, SMALL)
    extra = {**hf_sd, "model.encoder.layers.2.fc1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected.*layers.2.fc1.weight"):
        from_hf(extra, SMALL)


def test_dispatch_by_family_and_model_type():
    from models import hf as hf_convert

    assert hf_convert.hf_model_class("bart") is transformers.BartForConditionalGeneration
    assert hf_convert.family_of(transformers.BartConfig()) == "bart"
    assert hf_convert.token_conventions("bart", SMALL) is bart.TOKENS
    assert hf_convert.loom_config("bart", hf_config(SMALL, vocab_size=VOCAB)).n_decoder_layer == 1


# ---- launch/export_hf.py ------------------------------------------------------------------


def test_export_of_a_bart_run_reloads_in_transformers(tmp_path, monkeypatch):
    """A bart checkpoint (byte tokenizer) -> an HF folder that AutoModelForSeq2SeqLM and
    AutoTokenizer load offline, with Loom's logits and ids; --to-loom gives it back."""
    from data_pipeline.tokenizers import ByteTokenizer
    from tests.unit.test_export_hf import export_hf, fake_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = ByteTokenizer()
    special = tok.special_tokens
    cfg = dataclasses.replace(SMALL, vocab_size=tok.vocab_size, make_vocab_size_divisible_by=1)
    model, step = fake_run(tmp_path, cfg)
    out = tmp_path / "hf"
    export_hf.main(["--checkpoint", str(step), "--output", str(out), "--tokenizer", "byte"])

    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(out, local_files_only=True).eval()
    assert type(hf) is transformers.BartForConditionalGeneration
    assert (hf.config.pad_token_id, hf.config.decoder_start_token_id) == (
        special["<pad>"],
        special["<eos>"],
    )
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "Loom trains BART."
    assert hf_tok(text)["input_ids"] == [*tok.encode(text), special["<eos>"]]
    assert hf_tok.mask_token_id == special["[MASK]"]
    inputs = batch(seed=6)
    torch.testing.assert_close(hf_logits(hf, inputs), loom_logits(model, inputs), rtol=0, atol=1e-5)

    loom_dir = tmp_path / "loom"
    export_hf.main(["--to-loom", "--checkpoint", str(out), "--output", str(loom_dir)])
    derived = export_hf.load_model_config(loom_dir / "config.yaml")
    assert derived == dataclasses.replace(cfg, name=derived.name)
    state = torch.load(loom_dir / "model.pt", weights_only=True)
    assert set(state) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
