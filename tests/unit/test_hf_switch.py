"""Hugging Face Switch Transformers interop for T5 with MoE layers: parameter counts, logits
through converted weights (both ways, with and without dropped tokens), refusals by field,
and launch/export_hf.py on a T5-MoE run."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from models.build import build_model, param_counts
from models.config import ModelConfig
from models.t5 import T5
from tests.unit.helpers import one_thread, recipe  # noqa: F401 (one_thread: a fixture)

transformers = pytest.importorskip("transformers")
from models.hf import switch  # noqa: E402
from models.hf.switch import build_hf_model, from_hf, hf_config, loom_config, to_hf  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 200


def with_moe(cfg: ModelConfig, **moe) -> ModelConfig:
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, **moe))


@pytest.mark.parametrize(
    ("name", "expected"), [("switch_base_8", 619_339_008), ("switch_base_128", 7_415_217_408)]
)
def test_parameter_counts_match_transformers(name, expected):
    cfg = recipe(name)
    with torch.device("meta"):
        ours = build_model(cfg, vocab_size=cfg.padded_vocab_size())
        theirs = build_hf_model(cfg, vocab_size=cfg.vocab_size)
    assert type(theirs).__name__ == "SwitchTransformersForConditionalGeneration"
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert param_counts(ours)["total"] == n_theirs == expected


@pytest.mark.parametrize(
    ("name", "expected", "paper"),
    [
        ("switch_large_128", 26_309_291_008, 26.3e9),
        ("switch_xxl_128", 394_675_073_024, 395e9),
        ("switch_c_2048", 1_571_375_798_688, 1571e9),
    ],
)
def test_parameter_counts_match_the_paper(name, expected, paper):
    """Fedus et al. (2021), Table 9 and section 5: within 3% of the published sizes."""
    cfg = recipe(name)
    with torch.device("meta"):
        total = param_counts(build_model(cfg, vocab_size=cfg.padded_vocab_size()))["total"]
    assert total == expected
    assert abs(total / paper - 1) < 0.03


def test_hf_config_fields():
    cfg = recipe("switch_base_8")
    hf = hf_config(cfg, vocab_size=32128)
    assert type(hf).__name__ == "SwitchTransformersConfig"
    assert (hf.num_experts, hf.num_sparse_encoder_layers, hf.num_sparse_decoder_layers) == (8, 6, 6)
    assert hf.encoder_sparse_step == hf.decoder_sparse_step == 2
    assert hf.expert_capacity == 128  # eval factor 2.0 x 512 tokens / 8 experts
    assert (hf.dense_act_fn, hf.tie_word_embeddings, hf.router_jitter_noise) == ("relu", True, 0.01)
    assert (hf.router_aux_loss_coef, hf.router_z_loss_coef, hf.dropout_rate) == (0.01, 0.0, 0.1)
    every = hf_config(recipe("switch_c_2048"), vocab_size=32128)
    assert every.num_sparse_encoder_layers == 15 and every.encoder_sparse_step == 1


def test_loom_config_inverts_hf_config():
    cfg = recipe("switch_base_8")
    back = loom_config(hf_config(cfg, vocab_size=32128), name="back")
    same = ("vocab_size", "n_layer", "n_decoder_layer", "d_model", "n_head", "d_kv", "d_ff")
    same += ("activation", "tie_embeddings", "scale_logits", "layer_norm_eps", "dropout")
    assert {k: getattr(back, k) for k in same} == {k: getattr(cfg, k) for k in same}
    moe = ("num_experts", "layers", "top_k", "aux_loss_coef", "z_loss_coef", "jitter_eps")
    assert {k: getattr(back.moe, k) for k in moe} == {k: getattr(cfg.moe, k) for k in moe}
    assert back.moe.expert_dropout == 0.1
    # HF's fixed 128 slots: every row of up to 512 tokens gets exactly them, train and eval.
    assert back.moe.min_capacity == 128
    for t in (1, 77, 512):
        assert back.moe.capacity(t, training=True) == back.moe.capacity(t, training=False) == 128
    assert hf_config(back, vocab_size=32128).expert_capacity == 128
    c = loom_config(hf_config(recipe("switch_c_2048"), vocab_size=32128))
    assert c.moe.layers == list(range(15)) and not c.tie_embeddings


# Small random models in fp32; dropless on the Loom side, and HF's capacity (max_seq_len
# slots) cannot drop either.
VARIANTS = {
    "relu_tied_odd_blocks": {"n_decoder_layer": 3},
    "gelu_untied_every_block": {
        "activation": "gelu_tanh",
        "tie_embeddings": False,
        "scale_logits": False,
        "dropout": 0.1,
        "moe": {"layers": [0, 1], "expert_dropout": 0.1},
    },
}


def small_cfg(variant: str) -> ModelConfig:
    overrides = dict(VARIANTS[variant])
    moe = {"capacity_factor": None, "eval_capacity_factor": None, **overrides.pop("moe", {})}
    cfg = recipe("switch_debug", vocab_size=VOCAB, d_model=64, n_head=4, d_kv=24, d_ff=96)
    return with_moe(dataclasses.replace(cfg, **overrides), **moe)


@torch.no_grad()
def perturb_norms(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Norm weights start at 1 on both sides; move them so a swapped norm would show."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.dim() == 1:
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def _pair(cfg: ModelConfig) -> tuple[T5, torch.nn.Module]:
    """A Loom model and a Hugging Face model with random (different) weights."""
    torch.manual_seed(0)
    ours = perturb_norms(T5(cfg, vocab_size=VOCAB), 10).eval()
    torch.manual_seed(1)
    theirs = perturb_norms(build_hf_model(cfg, vocab_size=VOCAB), 11).eval()
    with torch.no_grad():  # untied, HF draws each stack's input table apart from `shared`
        for stack in (theirs.encoder, theirs.decoder):
            stack.embed_tokens.weight.copy_(theirs.shared.weight)
    return ours, theirs


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


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_to_loom_logits_match(variant):
    cfg = small_cfg(variant)
    ours, theirs = _pair(cfg)
    batch = _inputs()
    ours.load_state_dict(from_hf(theirs.state_dict(), cfg), strict=True)
    with torch.no_grad():
        # fp32 sums in another order: the untied GELU variant's logits differ by up to 1.2e-5
        # on some CPUs, so the bound is 2e-5.
        torch.testing.assert_close(_ours(ours, batch), theirs(**batch).logits, atol=2e-5, rtol=1e-5)
    assert (ours.lm_head.weight is ours.shared.weight) == cfg.tie_embeddings


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_loom_to_hf_logits_match(variant):
    cfg = small_cfg(variant)
    ours, theirs = _pair(cfg)
    batch = _inputs()
    with torch.no_grad():
        before = theirs(**batch).logits
        theirs.load_state_dict(to_hf(ours.state_dict(), cfg), strict=True)
        got = theirs(**batch).logits
        expected = _ours(ours, batch)
    assert not torch.allclose(before, got)  # the weights really were replaced
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dropped_tokens_match_at_the_same_capacity():
    """HF's fixed capacity becomes Loom's min_capacity; both give a dropped token no expert
    output (transformers 5.x), so the logits agree while tokens are dropped."""
    hf_cfg = hf_config(small_cfg("relu_tied_odd_blocks"), vocab_size=VOCAB)
    hf_cfg.expert_capacity = 2  # 4 experts, 37 and 11 tokens a row: most tokens are dropped
    torch.manual_seed(1)
    theirs = transformers.SwitchTransformersForConditionalGeneration(hf_cfg).eval()
    cfg = loom_config(hf_cfg)
    assert cfg.moe.capacity(37, training=False) == cfg.moe.capacity(11, training=False) == 2
    ours = T5(cfg, vocab_size=VOCAB).eval()
    ours.load_state_dict(from_hf(theirs.state_dict(), cfg), strict=True)
    dropless = T5(with_moe(cfg, eval_capacity_factor=None), vocab_size=VOCAB).eval()
    dropless.load_state_dict(ours.state_dict())
    batch = _inputs()
    with torch.no_grad():
        expected = theirs(**batch).logits
        torch.testing.assert_close(_ours(ours, batch), expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(_ours(dropless, batch), expected, atol=1e-3)


def test_round_trip_is_identity():
    cfg = small_cfg("gelu_untied_every_block")
    ours, _ = _pair(cfg)
    state = ours.state_dict()
    hf_state = to_hf(state, cfg)
    assert hf_state["encoder.block.0.layer.1.mlp.experts.expert_3.wo.weight"].shape == (64, 96)
    back = from_hf(hf_state, cfg)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_missing_and_unexpected_keys_are_named():
    cfg = small_cfg("relu_tied_odd_blocks")
    ours, theirs = _pair(cfg)
    state = theirs.state_dict()
    del state["decoder.block.1.layer.2.mlp.experts.expert_2.wi.weight"]
    with pytest.raises(ValueError, match=r"decoder\.block\.1\.layer\.2\.mlp\.experts\.expert_2"):
        from_hf(state, cfg)
    fewer = with_moe(cfg, num_experts=3)
    with pytest.raises(ValueError, match="expert_3"):  # HF's fourth expert is left over
        from_hf(theirs.state_dict(), fewer)
    with pytest.raises(ValueError, match="holds 4 experts but model.moe.num_experts=3"):
        to_hf(ours.state_dict(), fewer)


def test_untied_input_tables_must_equal_shared():
    cfg = small_cfg("gelu_untied_every_block")
    theirs = build_hf_model(cfg, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=r"encoder\.embed_tokens\.weight differs from shared"):
        from_hf(theirs.state_dict(), cfg)
    hf_state = to_hf(T5(cfg, vocab_size=VOCAB).state_dict(), cfg)
    keys = ("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
    tables = [hf_state[k] for k in keys]
    assert all(torch.equal(t, tables[0]) for t in tables)
    assert len({t.data_ptr() for t in tables}) == 3  # copies: save_pretrained keeps all three


@pytest.mark.parametrize(
    ("overrides", "moe", "match"),
    [
        ({}, {"top_k": 2}, r"model\.moe\.top_k=2 cannot be converted"),
        ({"activation": "gated_gelu"}, {}, r"model\.activation='gated_gelu' cannot be"),
        ({}, {"layers": [0]}, r"model\.moe\.layers=\[0\] cannot be converted"),
        ({"dropout": 0.1}, {}, r"model\.moe\.expert_dropout=0\.0 cannot be converted"),
        ({"scale_logits": False}, {}, r"model\.scale_logits=False cannot be converted"),
    ],
)
def test_loom_fields_without_hf_equivalent_are_refused(overrides, moe, match):
    cfg = with_moe(dataclasses.replace(small_cfg("relu_tied_odd_blocks"), **overrides), **moe)
    with pytest.raises(ValueError, match=match):
        hf_config(cfg, vocab_size=VOCAB)
    with pytest.raises(ValueError, match=match):
        to_hf({}, cfg)


def test_every_third_block_converts_but_not_every_third_from_zero():
    cfg = recipe("switch_debug", n_layer=7, n_decoder_layer=7, vocab_size=VOCAB)
    hf = hf_config(with_moe(cfg, layers=[1, 4]), vocab_size=VOCAB)
    assert hf.num_sparse_encoder_layers == 2 and hf.encoder_sparse_step == 3
    assert loom_config(hf).moe.layers == [1, 4]
    with pytest.raises(ValueError, match=r"model\.moe\.layers=\[0, 3, 6\]"):
        hf_config(with_moe(cfg, layers=[0, 3, 6]), vocab_size=VOCAB)
    assert switch.hf_sparse_blocks(8, 3) == [1, 3, 5, 7]  # 8 // 3 = step 2


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"router_bias": True}, "SwitchTransformersConfig.router_bias=True"),
        ({"router_dtype": "bfloat16"}, "SwitchTransformersConfig.router_dtype='bfloat16'"),
        ({"router_ignore_padding_tokens": True}, "router_ignore_padding_tokens=True"),
        ({"dense_act_fn": "silu"}, "SwitchTransformersConfig.dense_act_fn='silu'"),
        ({"num_sparse_decoder_layers": 2}, "SwitchTransformersConfig.num_sparse_decoder_layers=2"),
        ({"num_sparse_encoder_layers": 7}, "num_sparse_encoder_layers=7 gives the encoder no"),
    ],
)
def test_hf_fields_without_loom_equivalent_are_refused(fields, match):
    base = {"num_layers": 6, "num_decoder_layers": 6}
    base |= {"num_sparse_encoder_layers": 3, "num_sparse_decoder_layers": 3}  # odd blocks
    hf = transformers.SwitchTransformersConfig(**{**base, **fields})
    with pytest.raises(ValueError, match=match):
        loom_config(hf)


def _export_script():
    spec = importlib.util.spec_from_file_location("export_hf", ROOT / "launch" / "export_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_script_round_trip(tmp_path, monkeypatch):
    """launch/export_hf.py writes a Switch Transformers folder for a T5-MoE run and reads
    it back, with the same logits (the folder holds no tokenizer: the run has no data)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    export_hf = _export_script()
    cfg = dataclasses.replace(small_cfg("gelu_untied_every_block"), max_seq_len=48)
    torch.manual_seed(0)
    model = perturb_norms(T5(cfg, vocab_size=VOCAB), 3).eval()
    step = tmp_path / "run" / "checkpoints" / "step_1"
    step.mkdir(parents=True)
    job = {"model": dataclasses.asdict(cfg), "trainer": {"seed": 1, "max_steps": 1}}
    OmegaConf.save(OmegaConf.create(job), tmp_path / "run" / "config.yaml")
    torch.save(model.state_dict(), step / "model.pt")

    hf_dir, loom_dir = tmp_path / "hf", tmp_path / "loom"
    assert export_hf.main(["--checkpoint", str(step), "--output", str(hf_dir)]) == 0
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_dir, local_files_only=True)
    assert type(hf).__name__ == "SwitchTransformersForConditionalGeneration"
    assert "SwitchTransformersForConditionalGeneration" in (hf_dir / "README.md").read_text()
    batch = _inputs()
    with torch.no_grad():
        expected = _ours(model, batch)
        torch.testing.assert_close(hf.eval()(**batch).logits, expected, atol=1e-5, rtol=1e-5)

    args = ["--to-loom", "--checkpoint", str(hf_dir), "--output", str(loom_dir)]
    assert export_hf.main(args) == 0
    derived = export_hf.load_model_config(loom_dir / "config.yaml")
    assert derived.moe.layers == [0, 1] and derived.moe.num_experts == 4
    rebuilt = T5(derived, vocab_size=derived.padded_vocab_size())
    rebuilt.load_state_dict(torch.load(loom_dir / "model.pt", weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(_ours(rebuilt.eval(), batch), expected, atol=1e-5, rtol=0)
