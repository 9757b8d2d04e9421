"""Loom XLNet <-> transformers.XLNetLMHeadModel: parameter counts, logits both ways (two
streams with segments and padding, memory, the causal path), exact round trips, refusals,
dispatch and launch/export_hf.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import build_model, param_counts
from models.config import ModelConfig
from models.hf import xlnet
from models.hf.xlnet import from_hf, hf_config, loom_config, to_hf
from models.xlnet import XLNet
from tests.unit.helpers import one_thread, randomise_, recipe  # noqa: F401 (one_thread: a fixture)

transformers = pytest.importorskip("transformers")

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
VOCAB = 101
B, T = 3, 11
# 2 layers of width 32; 101 tokens padded to 112 embedding rows; 6 positions of memory.
SMALL = ModelConfig(
    name="xlnet_tiny",
    family="xlnet",
    objective="plm",
    vocab_size=VOCAB,
    make_vocab_size_divisible_by=16,
    n_layer=2,
    d_model=32,
    n_head=4,
    d_ff=48,
    max_seq_len=512,
    layer_norm_eps=1e-12,
    pre_ln=False,
    activation="gelu",
    position="relative_xl",
    mem_len=6,
)
ROWS = SMALL.padded_vocab_size()
TOL = {"rtol": 0, "atol": 1e-5}


def loom_model(cfg: ModelConfig = SMALL, *, seed: int) -> XLNet:
    """A random Loom XLNet whose padded vocabulary rows are zero, as a trained one's stay."""
    model = XLNet(cfg, vocab_size=cfg.padded_vocab_size()).eval()
    randomise_(model, seed)
    with torch.no_grad():
        model.wte.weight[VOCAB:] = 0
        model.lm_head.weight[VOCAB:] = 0  # the same rows when tied
        model.lm_head.bias[VOCAB:] = 0
    return model


def hf_model(cfg: ModelConfig = SMALL) -> torch.nn.Module:
    return transformers.XLNetLMHeadModel(hf_config(cfg, vocab_size=VOCAB)).eval()


def two_stream_batch(seed: int) -> dict[str, torch.Tensor]:
    """Random factorisation orders; the last 3 positions of each order are predicted (each
    sees at least the first of its order), two segments, the last row right-padded."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(T, generator=gen) for _ in range(B)])
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(T).expand(B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 9:] = False
    return {
        "input_ids": torch.randint(0, VOCAB, (B, T), generator=gen),
        "perm_mask": rank[:, None, :] >= rank[:, :, None],
        "target_positions": order[:, -3:],
        "token_type_ids": (torch.arange(T) >= 6).long().expand(B, T),
        "attention_mask": mask,
    }


def hf_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same batch in Hugging Face's form: float masks, a one-hot target_mapping."""
    out = {"input_ids": batch["input_ids"]}
    if "perm_mask" in batch:
        out["perm_mask"] = batch["perm_mask"].float()
    if "target_positions" in batch:
        out["target_mapping"] = F.one_hot(batch["target_positions"], T).float()
    for key in ("token_type_ids", "attention_mask"):
        if key in batch:
            out[key] = batch[key].long()
    return out


@torch.no_grad()
def run_both(loom: XLNet, hf: torch.nn.Module, batches: list[dict]) -> None:
    """Run the batches in sequence on both models, each after the previous one's memory,
    and compare logits and memories."""
    mems, hf_mems = None, None
    for batch in batches:
        ours, mems = loom(**batch, mems=mems, return_mems=True)
        out = hf(**hf_inputs(batch), mems=hf_mems, use_mems=True)
        hf_mems = out.mems
        torch.testing.assert_close(out.logits, ours[..., :VOCAB], **TOL)
        for mem, hf_mem in zip(mems, hf_mems, strict=True):
            torch.testing.assert_close(hf_mem.transpose(0, 1), mem, **TOL)


# ---- parameter counts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected", "released"),
    [
        ("xlnet_base", 116_750_336, {"d_model": 768, "n_layer": 12, "n_head": 12, "d_inner": 3072}),
        ("xlnet_large", 360_300_800, {}),  # XLNetConfig's defaults are xlnet-large's
    ],
)
def test_parameter_counts_equal_xlnet_lm_head_model(name, expected, released):
    """Every parameter of XLNetLMHeadModel, the lm_loss bias included, and nothing else."""
    cfg = recipe(name)
    reference = transformers.XLNetConfig(vocab_size=32000, mem_len=None, **released)
    with torch.device("meta"):
        ours = param_counts(build_model(cfg, vocab_size=cfg.padded_vocab_size()))["total"]
        theirs = transformers.XLNetLMHeadModel(hf_config(cfg, vocab_size=32000))
    # parameters() yields each tied tensor once, as param_counts does.
    assert sum(p.numel() for p in theirs.parameters()) == ours == expected
    # The released configs keep no memory (mem_len None); the recipes carry XLNet's 384.
    assert loom_config(reference, name=name) == dataclasses.replace(cfg, mem_len=0)


# ---- logits and memory --------------------------------------------------------------------


def test_two_stream_logits_and_memory_match_hf():
    """(a) Two streams with perm_mask, target positions, two segments and padding; (b) the
    next segment over the memory of the first (HF mem_len = model.mem_len, so both keep 6
    of the 11 positions)."""
    loom = loom_model(seed=1)
    hf = hf_model()
    hf.load_state_dict(to_hf(loom.state_dict(), SMALL), strict=True)
    run_both(loom, hf, [two_stream_batch(seed=2), two_stream_batch(seed=3)])


def test_causal_path_matches_hf_with_a_strict_upper_perm_mask():
    """(c) Without perm_mask and target positions Loom's content stream is causal. HF's
    attn_type "bi" gives the same model when perm_mask hides every later position and no
    target_mapping is given (only its content stream then runs), memory included."""
    loom = loom_model(seed=4)
    hf = hf_model()
    hf.load_state_dict(to_hf(loom.state_dict(), SMALL), strict=True)
    gen = torch.Generator().manual_seed(5)
    upper = torch.ones(T, T).triu(1).expand(B, T, T)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 8:] = False
    mems, hf_mems = None, None
    with torch.no_grad():
        for _ in range(2):
            x = torch.randint(0, VOCAB, (B, T), generator=gen)
            ours, mems = loom(x, attention_mask=mask, mems=mems, return_mems=True)
            out = hf(x, perm_mask=upper, attention_mask=mask.long(), mems=hf_mems, use_mems=True)
            hf_mems = out.mems
            torch.testing.assert_close(out.logits, ours[..., :VOCAB], **TOL)


def test_transformer_xl_is_hf_attn_type_uni():
    """A clm-objective model exports as attn_type "uni": HF is then causal without a
    perm_mask, exactly as Loom's, with memory; and clamped distances agree."""
    cfg = dataclasses.replace(SMALL, objective="clm", clamp_len=3)
    assert hf_config(cfg, vocab_size=VOCAB).attn_type == "uni"
    loom = loom_model(cfg, seed=6)
    hf = hf_model(cfg)
    hf.load_state_dict(to_hf(loom.state_dict(), cfg), strict=True)
    gen = torch.Generator().manual_seed(7)
    run_both(loom, hf, [{"input_ids": torch.randint(0, VOCAB, (B, T), generator=gen)}] * 2)


def test_hf_weights_give_the_same_logits_in_loom():
    hf = hf_model()
    randomise_(hf, seed=8)
    loom = XLNet(SMALL, vocab_size=ROWS).eval()
    loom.load_state_dict(from_hf(hf.state_dict(), SMALL), strict=True)
    assert loom.lm_head.weight is loom.wte.weight
    batch = two_stream_batch(seed=9)
    with torch.no_grad():
        ours = loom(**batch)
        theirs = hf(**hf_inputs(batch), use_mems=False).logits
    torch.testing.assert_close(ours[..., :VOCAB], theirs, **TOL)
    assert not ours[..., VOCAB:].any()  # the padded rows are zeros, their bias too


# ---- round trips and configs --------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_loom_hf_loom_is_exact(tied):
    cfg = dataclasses.replace(SMALL, tie_embeddings=tied)
    loom = loom_model(cfg, seed=10)
    sd = loom.state_dict()
    hf_sd = to_hf(sd, cfg)
    assert hf_sd["transformer.word_embedding.weight"].shape == (VOCAB, 32)
    assert hf_sd["transformer.layer.1.rel_attn.q"].shape == (32, 4, 8)
    assert hf_sd["transformer.mask_emb"].shape == (1, 1, 32)
    hf = hf_model(cfg)
    assert set(hf_sd) == set(hf.state_dict())
    hf.load_state_dict(hf_sd, strict=True)
    assert (hf.lm_loss.weight is hf.transformer.word_embedding.weight) == tied
    back = from_hf(hf_sd, cfg)
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert torch.equal(back[key], value), key


def test_hf_config_and_loom_config_invert_each_other():
    ids = {"<eos>": 7, "<pad>": 9, "[UNK]": 10}
    config = hf_config(SMALL, vocab_size=VOCAB, token_ids=ids)
    assert config.model_type == "xlnet"
    assert (config.n_layer, config.d_model, config.n_head, config.d_inner) == (2, 32, 4, 48)
    assert (config.d_head, config.attn_type, config.mem_len, config.clamp_len) == (8, "bi", 6, -1)
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (9, 7, None)
    assert config.use_mems_eval and config.use_mems_train and config.tie_word_embeddings
    cfg = dataclasses.replace(SMALL, make_vocab_size_divisible_by=1, dropout=0.1, clamp_len=5)
    assert loom_config(hf_config(cfg, vocab_size=VOCAB), name=cfg.name) == cfg
    memoryless = dataclasses.replace(cfg, mem_len=0, objective="clm")
    config = hf_config(memoryless, vocab_size=VOCAB)
    assert config.mem_len is None and not config.use_mems_eval
    assert loom_config(config, name=cfg.name) == memoryless
    assert loom_config(hf_config(cfg, vocab_size=VOCAB, clamp_len=0)).clamp_len == -1


# ---- refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [("d_kv", 16), ("activation", "gated_gelu")])
def test_architectures_without_an_hf_xlnet_twin_are_refused(field, value):
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
        ({"reuse_len": 256}, "reuse_len=256"),
        ({"bi_data": True}, "bi_data=True"),
        ({"same_length": True}, "same_length=True"),
        ({"ff_activation": "silu"}, "ff_activation='silu'"),
    ],
)
def test_hf_configs_loom_cannot_express_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        loom_config(hf_config(SMALL, vocab_size=VOCAB, **overrides))


def test_hf_weights_loom_cannot_read_are_named():
    hf_sd = hf_model(dataclasses.replace(SMALL, tie_embeddings=False)).state_dict()
    with pytest.raises(ValueError, match="lm_loss.weight differs from"):
        from_hf(hf_sd, SMALL)
    hf_sd = hf_model().state_dict()
    missing = dict(hf_sd)
    del missing["transformer.layer.1.rel_attn.seg_embed"]
    with pytest.raises(ValueError, match="transformer.layer.1.rel_attn.seg_embed"):
        from_hf(missing, SMALL)
    extra = {**hf_sd, "transformer.layer.2.ff.layer_1.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected.*layer.2.ff.layer_1.weight"):
        from_hf(extra, SMALL)
    narrow = {**hf_sd, "transformer.layer.0.rel_attn.q": torch.zeros(32, 2, 16)}
    with pytest.raises(ValueError, match=r"rel_attn.q has shape \(32, 2, 16\)"):
        from_hf(narrow, SMALL)


def test_dispatch_by_family_and_model_type():
    from models import hf as hf_convert

    assert hf_convert.hf_model_class("xlnet") is transformers.XLNetLMHeadModel
    assert hf_convert.family_of(transformers.XLNetConfig()) == "xlnet"
    assert hf_convert.token_conventions("xlnet", SMALL) is xlnet.TOKENS
    assert hf_convert.loom_config("xlnet", hf_config(SMALL, vocab_size=VOCAB)).mem_len == 6


# ---- launch/export_hf.py ------------------------------------------------------------------


def test_export_of_an_xlnet_run_reloads_in_transformers(tmp_path, monkeypatch):
    """An xlnet checkpoint (byte tokenizer) -> an HF folder that XLNetLMHeadModel and
    AutoTokenizer load offline, with Loom's logits; --to-loom gives it back."""
    from data_pipeline.tokenizers import ByteTokenizer
    from tests.unit.test_export_hf import export_hf, fake_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = ByteTokenizer()
    cfg = dataclasses.replace(SMALL, vocab_size=tok.vocab_size, make_vocab_size_divisible_by=1)
    model, step = fake_run(tmp_path, cfg)
    out = tmp_path / "hf"
    export_hf.main(["--checkpoint", str(step), "--output", str(out), "--tokenizer", "byte"])

    hf = transformers.XLNetLMHeadModel.from_pretrained(out, local_files_only=True).eval()
    assert hf.config.eos_token_id == tok.special_tokens["<eos>"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    encoded = hf_tok("Loom trains XLNet.")
    special = tok.special_tokens
    text = tok.encode("Loom trains XLNet.")
    assert encoded["input_ids"] == [*text, special["[SEP]"], special["[CLS]"]]  # plm's layout
    assert encoded["token_type_ids"] == [0] * (len(text) + 1) + [2]
    assert "add_special_tokens=False" in (out / "README.md").read_text()
    x = torch.randint(0, tok.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.eval()(x, perm_mask=torch.zeros(2, 9, 9, dtype=torch.bool))
        theirs = hf(x, use_mems=False).logits
    torch.testing.assert_close(theirs, ours, **TOL)

    loom_dir = tmp_path / "loom"
    export_hf.main(["--to-loom", "--checkpoint", str(out), "--output", str(loom_dir)])
    derived = export_hf.load_model_config(loom_dir / "config.yaml")
    assert derived == dataclasses.replace(cfg, name=derived.name)
    state = torch.load(loom_dir / "model.pt", weights_only=True)
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value), key
