"""Every family trains with its default objective, on one process and on two."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import read_metrics

SHORT = [
    "trainer.max_steps=30",
    "trainer.log_every=5",
    "trainer.eval_every=0",
    "trainer.save_every=0",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",
    "optim.lr=3e-3",
    "optim.warmup_steps=5",
]


@pytest.mark.parametrize(
    "model",
    [
        "bert_debug",
        "albert_debug",
        "roberta_debug",
        "nezha_debug",
        "structbert_debug",
        "ernie_debug",
        "t5_debug",
        "t5_v1_1_debug",
        "bart_debug",
        "mass_debug",
        "xlnet_debug",
        "transformer_xl_debug",
        "glm_debug",
        "gpt_rotary_debug",
    ],
)
def test_family_trains_with_falling_loss(train_cli, tmp_path, model):
    train_cli(f"+model={model}", *SHORT, f"trainer.out_dir={tmp_path}")
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses


def test_ernie_trains_with_knowledge_masking(train_cli, tmp_path):
    """ERNIE's recipe as the README gives it: knowledge masking on the built-in corpus, which
    has no spans (the entity level falls back to phrases)."""
    train_cli(
        "+model=ernie_debug",
        "data.mlm.unit=knowledge",
        "data.mlm.knowledge_stages=[0.4,0.3,0.3]",
        *SHORT,
        f"trainer.out_dir={tmp_path}",
    )
    losses = [r["loss"] for r in read_metrics(tmp_path)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses


def test_spanbert_trains_mlm_and_span_boundary_objectives(train_cli, tmp_path):
    """SpanBERT (mlm_sbo): the loss is MLM + SBO, and both tasks' losses fall."""
    train_cli("+model=spanbert_debug", *SHORT, f"trainer.out_dir={tmp_path}")
    records = read_metrics(tmp_path)
    assert len(records) == 6
    for r in records:
        assert abs(r["loss"] - r["loss_lm"] - r["loss_sbo"]) < 1e-5, r
    for key in ("loss", "loss_lm", "loss_sbo"):
        first, last = records[0][key], records[-1][key]
        assert last < first - (0.5 if key == "loss" else 0.25), (key, first, last)


def test_electra_trains_generator_and_discriminator(train_cli, tmp_path):
    """ELECTRA (electra_debug, objective electra): the loss is the generator's MLM loss plus
    50 x the discriminator's RTD loss, both logged; the total and the MLM loss fall."""
    train_cli("+model=electra_debug", *SHORT, f"trainer.out_dir={tmp_path}")
    records = read_metrics(tmp_path)
    assert len(records) == 6
    for r in records:
        assert abs(r["loss"] - r["loss_lm"] - 50 * r["loss_rtd"]) < 1e-4, r
        assert 0 < r["loss_rtd"] < 0.7  # below log 2: better than a coin from the start
    first, last = records[0], records[-1]
    assert last["loss"] < first["loss"] - 2.0, (first["loss"], last["loss"])
    assert last["loss_lm"] < first["loss_lm"] - 1.0, (first["loss_lm"], last["loss_lm"])


@pytest.mark.parametrize(
    "model", ["gpt_moe_debug", "bert_moe_debug", "t5_moe_debug", "glm_moe_debug"]
)
def test_moe_family_trains_with_falling_loss_and_reports_its_layers(train_cli, tmp_path, model):
    train_cli(f"+model={model}", *SHORT, f"trainer.out_dir={tmp_path}")
    records = read_metrics(tmp_path)
    losses = [r["loss"] for r in records]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    last = records[-1]
    assert 0.9 < last["moe/aux_loss"] < 4 and last["moe/z_loss"] > 0  # E x sum f P >= 1
    assert 0 <= last["moe/dropped_frac"] < 1 and last["moe/load"]
    for load in last["moe/load"].values():
        assert load["min"] <= load["mean"] <= load["max"] and load["imbalance"] >= 1
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_moe_aux_gradients_follow_the_fp16_loss_scale(train_cli, tmp_path):
    """Under fp16 the aux and z gradients, injected at each layer rather than through the
    scaled loss, carry the loss scale too: a run at scale 4096 takes the steps of a run at
    scale 1 (two micro-batches per step; large coefficients make them matter)."""
    common = [
        "+model=gpt_moe_debug",
        "model.n_layer=2",
        "model.d_model=64",
        "model.n_head=2",
        "model.max_seq_len=64",
        "model.moe.aux_loss_coef=1",
        "model.moe.z_loss_coef=0.1",
        "precision=fp16",
        "trainer.max_steps=4",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "trainer.global_batch_size=8",
        "trainer.micro_batch_size=4",
    ]
    runs = {}
    for scale in (1, 4096):
        out = tmp_path / str(scale)
        train_cli(*common, f"precision.initial_scale={scale}", f"trainer.out_dir={out}")
        runs[scale] = read_metrics(out)
    for a, b in zip(runs[1], runs[4096], strict=True):
        assert b["loss_scale"] == 4096 and b["skipped_steps"] == 0
        assert abs(a["loss"] - b["loss"]) < 1e-4, (a["step"], a["loss"], b["loss"])
        assert abs(a["grad_norm"] / b["grad_norm"] - 1) < 1e-3, (a["grad_norm"], b["grad_norm"])


@pytest.mark.parametrize("model", ["bert_debug", "t5_debug", "glm_debug"])
def test_family_data_parallel_matches_one_process(train_cli, tmp_path, model):
    steps = ["trainer.max_steps=6", "trainer.log_every=1"]
    train_cli(f"+model={model}", *SHORT, *steps, f"trainer.out_dir={tmp_path / 'one'}")
    train_cli(f"+model={model}", *SHORT, *steps, f"trainer.out_dir={tmp_path / 'two'}", nproc=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5, (model, a["step"], a["loss"], b["loss"])


def test_glm_large_config_as_written(train_cli):
    proc = train_cli("+model=glm_large", "--cfg", "job")
    model = yaml.safe_load(proc.stdout)["model"]
    assert (model["family"], model["n_layer"], model["d_model"], model["n_head"]) == (
        "glm",
        24,
        1024,
        16,
    )
    assert model["objective"] == "glm_blank"
