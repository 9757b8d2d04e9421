"""Loom Electra <-> transformers.ElectraForPreTraining (discriminator) and ElectraForMaskedLM
(generator): parameter counts against HF and the paper, logits of both networks both ways,
exact round trips, refusals, dispatch and launch/export_hf.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from models import build_model, param_counts
from models.config import ModelConfig
from models.hf.electra import from_hf, generator_hf_config, generator_to_hf, hf_config, to_hf

transformers = pytest.importorskip("transformers")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
VOCAB = 101
SMALL = ModelConfig(
    name="electra_tiny",
    family="electra",
    objective="electra",
    n_layer=2,
    d_model=48,
    n_head=4,
    d_ff=96,
    embedding_size=16,
    generator_size=0.5,
    max_seq_len=32,
    pre_ln=False,
    activation="gelu",
    type_vocab_size=2,
    layer_norm_eps=1e-12,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def recipe(name: str) -> ModelConfig:
    schema = OmegaConf.structured(ModelConfig)
    return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(CONF_DIR / f"{name}.yaml")))


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Random values in every parameter, biases and norms included, so none maps by luck."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def hf_pair(cfg: ModelConfig, vocab: int = VOCAB):
    """(ElectraForPreTraining, ElectraForMaskedLM) of `cfg`, eager attention, eval mode."""
    disc = transformers.ElectraForPreTraining(
        hf_config(cfg, vocab_size=vocab, attn_implementation="eager")
    )
    gen = transformers.ElectraForMaskedLM(
        generator_hf_config(cfg, vocab_size=vocab, attn_implementation="eager")
    )
    return disc.eval(), gen.eval()


def inputs(seed: int) -> dict[str, torch.Tensor]:
    """Token ids, token types and right padding in two of three rows."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    mask[2, 6:] = 0
    types = torch.randint(0, 2, (3, 20), generator=gen)
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}


def assert_same_logits(loom, disc, gen, batch) -> None:
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        pairs = [
            (loom.discriminator_logits(**batch), disc(**batch).logits),
            (loom.generator_logits(**batch), gen(**batch).logits),
        ]
    for ours, theirs in pairs:
        diff = (ours[real] - theirs[real]).abs().max().item()
        assert diff <= 1e-5, diff


# ---- parameter counts ---------------------------------------------------------------------

# Clark et al. 2020, Table 6: (layers, hidden, FFN, heads, embedding, generator divisor), and
# the discriminator's parameters in its results tables (Tables 1 and 2: 14M, 110M, 335M).
PAPER = {
    "electra_small": ((12, 256, 1024, 4, 128, 4), 14e6),
    "electra_base": ((12, 768, 3072, 12, 768, 3), 110e6),
    "electra_large": ((24, 1024, 4096, 16, 1024, 4), 335e6),
}


@pytest.mark.parametrize(
    ("name", "discriminator", "generator", "total"),
    [
        ("electra_small", 13_549_057, 4_620_026, 14_196_219),
        ("electra_base", 109_483_009, 33_740_602, 119_386_427),
        ("electra_large", 335_142_913, 51_295_290, 354_655_291),
    ],
)
def test_parameter_counts_against_hf_and_the_paper(name, discriminator, generator, total):
    """Each network counts as its HF model built from the paper's sizes (the shared tables
    in both); the Loom model holds the tables once; the discriminator is within 4% of the
    paper's count."""
    (layers, hidden, ffn, heads, emb, div), paper = PAPER[name]
    sizes = dict(vocab_size=30522, embedding_size=emb, num_hidden_layers=layers)
    sizes |= dict(max_position_embeddings=512, type_vocab_size=2)
    disc_config = transformers.ElectraConfig(
        hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads, **sizes
    )
    gen_config = transformers.ElectraConfig(
        hidden_size=hidden // div,
        intermediate_size=ffn // div,
        num_attention_heads=heads // div,
        **sizes,
    )
    cfg = recipe(name)
    with torch.device("meta"):
        loom = build_model(cfg, vocab_size=cfg.padded_vocab_size())
        hf_disc = transformers.ElectraForPreTraining(disc_config)
        hf_gen = transformers.ElectraForMaskedLM(gen_config)
        ours_disc, ours_gen = hf_pair(cfg, vocab=30522)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731 (tied once)
    assert count(hf_disc) == count(ours_disc) == discriminator
    assert count(hf_gen) == count(ours_gen) == generator
    tables = sum(count(getattr(loom.discriminator, n)) for n in ("wte", "wpe", "tte", "emb_ln"))
    own_disc = count(loom.discriminator) + count(loom.rtd_dense) + count(loom.rtd_head)
    assert own_disc == discriminator
    assert count(loom.generator) - cfg.vocab_size * emb + tables == generator  # decoder tied
    assert param_counts(loom)["total"] == total == discriminator + generator - tables
    assert abs(discriminator / paper - 1) < 0.04


# ---- logits and round trips ---------------------------------------------------------------


def test_loom_weights_give_the_same_logits_in_hf():
    loom = build_model(SMALL, vocab_size=VOCAB).eval()
    randomise_(loom, seed=5)
    disc, gen = hf_pair(SMALL)
    disc.load_state_dict(to_hf(loom.state_dict(), SMALL), strict=True)
    gen.load_state_dict(generator_to_hf(loom.state_dict(), SMALL), strict=True)
    assert_same_logits(loom, disc, gen, inputs(seed=6))


def test_hf_weights_give_the_same_logits_in_loom():
    """A pair sharing its embeddings (as ELECTRA trains them) loads into one Loom model."""
    disc, gen = hf_pair(SMALL)
    randomise_(disc, seed=1)
    randomise_(gen, seed=2)
    gen.electra.embeddings.load_state_dict(disc.electra.embeddings.state_dict())
    loom = build_model(SMALL, vocab_size=VOCAB).eval()
    loom.load_state_dict(from_hf(disc.state_dict(), SMALL, generator=gen.state_dict()))
    assert_same_logits(loom, disc, gen, inputs(seed=3))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False},
        {"vocab_size": VOCAB, "make_vocab_size_divisible_by": 64},
        {"embedding_size": None, "generator_size": 0.25},  # E = D: only the generator projects
    ],
    ids=["tied", "untied", "padded_rows", "no_discriminator_projection"],
)
def test_round_trip_loom_hf_loom_is_exact(overrides):
    cfg = dataclasses.replace(SMALL, **overrides)
    rows = cfg.padded_vocab_size(VOCAB)
    loom = build_model(cfg, vocab_size=rows)
    randomise_(loom, seed=7)
    if rows > VOCAB:  # rows beyond the vocabulary are not exported; Loom's own are zero
        with torch.no_grad():
            loom.discriminator.wte.weight[VOCAB:] = 0
            loom.generator.lm_head.bias[VOCAB:] = 0
    sd = loom.state_dict()
    disc_sd, gen_sd = to_hf(sd, cfg), generator_to_hf(sd, cfg)
    assert disc_sd["electra.embeddings.word_embeddings.weight"].shape[0] == VOCAB
    assert ("electra.embeddings_project.weight" in disc_sd) == (cfg.embedding_size is not None)
    assert "electra.embeddings_project.weight" in gen_sd
    disc, gen = hf_pair(cfg)
    disc.load_state_dict(disc_sd, strict=True)
    gen.load_state_dict(gen_sd, strict=True)
    back = from_hf(disc_sd, cfg, generator=gen_sd)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value), key


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("activation", "gelu_tanh"),  # ElectraGeneratorPredictions applies the exact GELU
        ("pre_ln", True),
        ("type_vocab_size", 0),
        ("bias", False),
    ],
)
def test_architectures_without_an_hf_twin_are_refused(field, value):
    cfg = dataclasses.replace(SMALL, **{field: value})
    with pytest.raises(ValueError, match=f"model.{field}"):
        hf_config(cfg, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=f"model.{field}"):
        generator_to_hf({}, cfg)


def test_a_discriminator_alone_or_a_pair_with_two_tables_is_refused():
    disc, gen = hf_pair(SMALL)
    with pytest.raises(ValueError, match="discriminator only"):
        from_hf(disc.state_dict(), SMALL)
    with pytest.raises(ValueError, match="word_embeddings.weight differ"):
        from_hf(disc.state_dict(), SMALL, generator=gen.state_dict())
    loom = build_model(SMALL, vocab_size=VOCAB)
    sd = loom.state_dict()
    sd["generator.blocks.2.ln1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected.*generator.blocks.2.ln1.weight"):
        to_hf(sd, SMALL)


def test_dispatch_names_electra_for_pre_training():
    from models import hf as hf_convert

    assert hf_convert.hf_model_class("electra") is transformers.ElectraForPreTraining
    assert hf_convert.family_of(transformers.ElectraConfig()) == "electra"
    with torch.device("meta"):
        hf = hf_convert.build_hf_model("electra", SMALL, vocab_size=VOCAB)
    loom = build_model(SMALL, vocab_size=VOCAB)
    assert set(hf_convert.to_hf("electra", loom.state_dict(), SMALL)) == set(hf.state_dict())
    assert "generator" in hf_convert.export_notes("electra", SMALL)[0]


# ---- launch/export_hf.py ------------------------------------------------------------------


def test_export_of_an_electra_debug_run_is_its_discriminator(tmp_path, monkeypatch):
    """electra_debug's checkpoint (byte tokenizer) -> an HF folder whose
    ElectraForPreTraining and tokenizer load offline with Loom's RTD logits and ids; its
    README says the generator was left out."""
    from data_pipeline.tokenizers import ByteTokenizer
    from tests.unit.test_export_hf import export_hf, fake_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = ByteTokenizer()
    cfg = dataclasses.replace(recipe("electra_debug"), vocab_size=tok.vocab_size, n_layer=1)
    model, step = fake_run(tmp_path, cfg)
    out = tmp_path / "hf"
    export_hf.main(["--checkpoint", str(step), "--output", str(out), "--tokenizer", "byte"])

    hf = transformers.ElectraForPreTraining.from_pretrained(out, local_files_only=True).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    special = tok.special_tokens
    text = "Loom trains ELECTRA."
    expected = [special["[CLS]"], *tok.encode(text), special["[SEP]"]]
    assert hf_tok(text)["input_ids"] == expected
    ids = torch.tensor([expected])
    with torch.no_grad():
        ours = model.discriminator_logits(ids)
        torch.testing.assert_close(hf(input_ids=ids).logits, ours, rtol=0, atol=1e-5)
    readme = (out / "README.md").read_text()
    assert "ElectraForPreTraining" in readme and "generator is not in this folder" in readme
