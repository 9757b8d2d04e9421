"""Distillation (trainer/distill.py): each loss term against torch's own losses as DistilBERT
and TinyBERT compute them, the student's hidden states and attention scores against
transformers' BERT, the layer map, the student's initialisation and the config checks."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from data_pipeline.objectives import IGNORE_INDEX
from models.bert import Bert
from models.config import ModelConfig
from models.hf.bert import hf_config, to_hf
from parallel.parallelize import repeated_blocks
from tests.unit.helpers import randomise_
from trainer.config import DistillConfig, JobConfig, check_runnable
from trainer.distill import (
    DistillLoss,
    check_teacher,
    cosine_distance,
    distill_labels,
    distill_outputs,
    init_student_from_teacher,
    layer_map,
    load_teacher_weights,
    mean_squared,
    soft_cross_entropy,
)
from trainer.loss import task_weight

transformers = pytest.importorskip("transformers")

VOCAB = 101
TEACHER = ModelConfig(
    name="teacher",
    family="bert",
    objective="mlm_nsp",
    n_layer=4,
    d_model=48,
    n_head=4,
    d_ff=80,
    max_seq_len=32,
    layer_norm_eps=1e-12,
    pre_ln=False,
    activation="gelu",
    type_vocab_size=2,
)
STUDENT = dataclasses.replace(
    TEACHER, name="student", objective="mlm", n_layer=2, d_model=32, d_ff=64, pair_head=False
)


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 20), generator=gen)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, 14:] = False
    mask[2, 6:] = False
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


# ---- the loss terms against torch's losses --------------------------------------------


def test_soft_cross_entropy_is_distilberts_kl_plus_the_teachers_entropy():
    """DistilBERT scores KLDivLoss(batchmean) x T^2 over the selected tokens; the soft
    cross-entropy differs from it by the teachers' entropy, which has no gradient."""
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 7, 11, generator=gen), torch.randn(2, 7, 11, generator=gen)
    scored = torch.rand(2, 7, generator=gen) > 0.3
    temp = 2.0
    n = int(scored.sum())
    kl = nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(s[scored] / temp, dim=-1), F.softmax(t[scored] / temp, dim=-1)
    )
    p = F.softmax(t[scored] / temp, dim=-1)
    entropy = -(p * p.log()).sum(-1).mean()
    got = soft_cross_entropy(s, t, scored, temperature=temp) / n
    torch.testing.assert_close(got, (kl + entropy) * temp**2)


def test_soft_cross_entropy_gradient_equals_the_kl_gradient():
    gen = torch.Generator().manual_seed(2)
    s = torch.randn(5, 9, generator=gen, requires_grad=True)
    t = torch.randn(5, 9, generator=gen)
    scored = torch.ones(5, dtype=torch.bool)
    soft_cross_entropy(s[None], t[None], scored[None], temperature=3.0).backward()
    ours = s.grad.clone()
    s.grad = None
    kl = F.kl_div(F.log_softmax(s / 3, -1), F.softmax(t / 3, -1), reduction="sum") * 9
    kl.backward()
    torch.testing.assert_close(ours, s.grad)


def test_cosine_distance_is_the_cosine_embedding_loss():
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 6, 8, generator=gen), torch.randn(2, 6, 8, generator=gen)
    scored = torch.tensor([[1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    want = nn.CosineEmbeddingLoss()(s[scored], t[scored], torch.ones(int(scored.sum())))
    got = cosine_distance(s, t, scored) / scored.sum()
    torch.testing.assert_close(got, want)


def test_mean_squared_is_tinyberts_mse_for_hidden_states_and_scores():
    """TinyBERT: MSELoss over every element; without padding the per-token means sum to it."""
    gen = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 5, 8, generator=gen), torch.randn(2, 5, 8, generator=gen)
    every = torch.ones(2, 5, dtype=torch.bool)
    torch.testing.assert_close(mean_squared(s, t, every) / 10, F.mse_loss(s, t))
    a, b = torch.randn(2, 3, 5, 5, generator=gen), torch.randn(2, 3, 5, 5, generator=gen)
    torch.testing.assert_close(mean_squared(a, b, every, heads=True) / 10, F.mse_loss(a, b))
    some = every.clone()
    some[0, 3:] = False  # padded queries are not scored
    want = sum(F.mse_loss(a[i, :, q], b[i, :, q]) for i in range(2) for q in range(5) if some[i, q])
    torch.testing.assert_close(mean_squared(a, b, some, heads=True), want)


def test_distill_labels_score_the_real_tokens_of_each_task():
    inputs = batch()
    labels = distill_labels(inputs, ["kd_labels", "cos_labels"])
    assert set(labels) == {"kd_labels", "cos_labels"}
    assert torch.equal(labels["kd_labels"] != IGNORE_INDEX, inputs["attention_mask"])
    no_mask = distill_labels({"input_ids": inputs["input_ids"]}, ["kd_labels"])
    assert bool((no_mask["kd_labels"] == 0).all())


# ---- the models' outputs against transformers' BERT -----------------------------------


def test_hidden_states_and_scores_match_transformers_bert():
    """Loom's hidden states equal BertForPreTraining's output_hidden_states, and a softmax of
    its scores with the masked keys removed equals the attention probabilities."""
    torch.manual_seed(0)
    loom = Bert(TEACHER, vocab_size=VOCAB).eval()
    randomise_(loom, 5)
    loom.distill_outputs = ("hidden", "attention")
    hf = transformers.BertForPreTraining(
        hf_config(TEACHER, vocab_size=VOCAB, attn_implementation="eager")
    ).eval()
    hf.load_state_dict(to_hf(loom.state_dict(), TEACHER), strict=True)
    inputs = batch()
    with torch.no_grad():
        ours = loom(**inputs)
        theirs = hf(**inputs, output_hidden_states=True, output_attentions=True)
    assert len(ours["hidden_states"]) == len(theirs.hidden_states) == 5
    for a, b in zip(ours["hidden_states"], theirs.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    key_B11T = inputs["attention_mask"][:, None, None, :]
    for scores, probs in zip(ours["attention_scores"], theirs.attentions, strict=True):
        mine = torch.softmax(scores.masked_fill(~key_B11T, -math.inf), dim=-1)
        torch.testing.assert_close(mine, probs, rtol=0, atol=1e-5)
        assert bool((scores.masked_select(~key_B11T.expand_as(scores)) == 0).all())


def test_projections_map_the_states_to_the_teachers_width():
    student = Bert(STUDENT, vocab_size=VOCAB).eval()
    student.distill_outputs = ("hidden",)
    student.add_distill_projections(48, embedding=True)
    out = student(**batch())
    assert [h.shape[-1] for h in out["hidden_states"]] == [48, 48, 48]
    assert "distill_proj.hidden.weight" in student.state_dict()
    # The projections are single layers, not blocks to checkpoint, compile or shard apart.
    assert repeated_blocks(student) == list(student.blocks.values())
    plain = Bert(STUDENT, vocab_size=VOCAB).eval()
    plain.distill_outputs = ("hidden",)
    assert [h.shape[-1] for h in plain(**batch())["hidden_states"]] == [32, 32, 32]


# ---- the whole loss -------------------------------------------------------------------


def test_distill_loss_sums_each_task_over_its_tokens():
    cfg = DistillConfig(
        teacher="x", soft_weight=1, cosine_weight=1, hidden_weight=1, attention_weight=1
    )
    torch.manual_seed(0)
    teacher = Bert(TEACHER, vocab_size=VOCAB).eval()
    student = Bert(dataclasses.replace(STUDENT, d_model=48), vocab_size=VOCAB).eval()
    teacher.distill_outputs = student.distill_outputs = distill_outputs(cfg)
    inputs = batch()
    labels = {"labels": torch.randint(0, VOCAB, (3, 20))} | distill_labels(inputs, cfg.tasks)
    with torch.no_grad():
        t_out, s_out = teacher(**inputs), student(**inputs)
    loss = DistillLoss(cfg, n_student=2, n_teacher=4)
    sums = loss(s_out, labels | {f"teacher/{k}": v for k, v in t_out.items()})
    scored = inputs["attention_mask"]
    assert set(sums) == {"labels", "kd_labels", "cos_labels", "hid_labels", "att_labels"}
    torch.testing.assert_close(
        sums["hid_labels"],
        mean_squared(s_out["hidden_states"][1], t_out["hidden_states"][2], scored)
        + mean_squared(s_out["hidden_states"][2], t_out["hidden_states"][4], scored),
    )
    torch.testing.assert_close(
        sums["att_labels"],
        mean_squared(s_out["attention_scores"][0], t_out["attention_scores"][1], scored, heads=True)
        + mean_squared(
            s_out["attention_scores"][1], t_out["attention_scores"][3], scored, heads=True
        ),
    )
    want_lm = F.cross_entropy(
        s_out["logits"].flatten(0, 1), labels["labels"].flatten(), reduction="sum"
    )
    torch.testing.assert_close(sums["labels"], want_lm)


def test_task_weights_follow_the_mix():
    cfg = DistillConfig(teacher="x", hard_weight=2.0, soft_weight=5.0, cosine_weight=1.0)
    assert cfg.tasks == ["kd_labels", "cos_labels"]
    weights = {k: task_weight(k, STUDENT, cfg) for k in ("labels", "kd_labels", "cos_labels")}
    assert weights == {"labels": 2.0, "kd_labels": 5.0, "cos_labels": 1.0}
    assert task_weight("labels", STUDENT, DistillConfig()) == 1.0


# ---- layer map and initialisation -------------------------------------------------------


def test_layer_map_is_tinyberts_uniform_map():
    assert layer_map(12, 6) == [2, 4, 6, 8, 10, 12]
    assert layer_map(12, 4) == [3, 6, 9, 12]
    with pytest.raises(ConfigError, match="multiple of the student's"):
        layer_map(12, 5)


def test_student_takes_every_other_block_and_the_shared_tensors():
    torch.manual_seed(0)
    teacher = Bert(dataclasses.replace(TEACHER, d_model=32, d_ff=64), vocab_size=VOCAB)
    randomise_(teacher, 7)
    student = Bert(STUDENT, vocab_size=VOCAB)
    init_student_from_teacher(student, teacher.state_dict(), n_teacher=4, source="t")
    s, t = student.state_dict(), teacher.state_dict()
    for name in ("blocks.0.attn.qkv.weight", "blocks.1.mlp.fc_out.bias"):
        index = int(name.split(".")[1])
        torch.testing.assert_close(s[name], t[name.replace(f".{index}.", f".{2 * index}.", 1)])
    for name in ("wte.weight", "wpe.weight", "emb_ln.weight", "mlm_dense.weight", "lm_head.bias"):
        torch.testing.assert_close(s[name], t[name])


def test_teacher_weights_must_fit_exactly():
    teacher = Bert(TEACHER, vocab_size=VOCAB)
    state = teacher.state_dict()
    load_teacher_weights(teacher, state, source="t")
    with pytest.raises(ConfigError, match="missing"):
        load_teacher_weights(
            teacher, {k: v for k, v in state.items() if "blocks.3" not in k}, source="t"
        )
    bad = dict(state, **{"wpe.weight": torch.zeros(5, 48)})
    with pytest.raises(ConfigError, match=r"wpe.weight has shape \(5, 48\)"):
        load_teacher_weights(teacher, bad, source="t")


# ---- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"soft_weight": 5.0}, "distill.soft_weight is set but distill.teacher is not"),
        ({"init_from_teacher": True}, "distill.init_from_teacher is set"),
        ({"teacher": "/no/such/run"}, "distill.teacher='/no/such/run' does not exist"),
        ({"teacher": ".", "temperature": 0.0}, "distill.temperature=0.0 must be > 0"),
        ({"teacher": ".", "cosine_weight": -1.0}, "distill.cosine_weight=-1.0 must be"),
        ({"teacher": "."}, "every distillation weight 0"),
    ],
)
def test_bad_settings_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        DistillConfig(**fields).validate()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"tp": 2, "sp": True}, "distill.teacher with parallel.sp=true"),
        ({"pp": 2}, "distill.teacher with parallel.pp=2"),
        ({"engine": "deepspeed", "zero": 3}, "distill.teacher with parallel.engine=deepspeed"),
    ],
)
def test_layouts_that_split_the_outputs_are_refused(override, message):
    job = JobConfig(distill=DistillConfig(teacher=".", soft_weight=1.0))
    job.parallel = dataclasses.replace(job.parallel, **override)
    with pytest.raises(ConfigError, match=message):
        check_runnable(job, world_size=4)


def test_chunked_loss_is_refused_with_soft_targets():
    job = JobConfig(distill=DistillConfig(teacher=".", soft_weight=1.0))
    job.trainer = dataclasses.replace(job.trainer, loss_chunk_tokens=64)
    with pytest.raises(ConfigError, match="trainer.loss_chunk_tokens=64"):
        check_runnable(job, world_size=1)


def test_teacher_checks():
    cfg = DistillConfig(teacher=".", soft_weight=1.0, attention_weight=1.0)
    check_teacher(STUDENT, TEACHER, cfg, rows=VOCAB, teacher_rows=VOCAB)
    with pytest.raises(ConfigError, match="has 128 vocabulary rows, the student 101"):
        check_teacher(STUDENT, TEACHER, cfg, rows=VOCAB, teacher_rows=128)
    with pytest.raises(ConfigError, match="model.n_head=2 and the teacher 4"):
        check_teacher(dataclasses.replace(STUDENT, n_head=2), TEACHER, cfg, rows=1, teacher_rows=1)
    gpt = ModelConfig(family="gpt")
    with pytest.raises(ConfigError, match="the teacher has model.family='gpt'"):
        check_teacher(STUDENT, gpt, cfg, rows=1, teacher_rows=1)


def test_recipes_load():
    from trainer.init_from import load_model_config

    conf = Path(__file__).resolve().parents[2] / "conf"
    for name in ("tinybert_debug", "tinybert_4l", "tinybert_6l"):
        assert load_model_config(conf / "model" / f"{name}.yaml").family == "bert"


def test_dry_run_reports_the_teacher_from_its_config_alone(tmp_path):
    """A Hugging Face teacher folder with config.json only: the dry run sizes it, counts its
    forward FLOPs (a third of its training count) and its weights per rank under ZeRO-3."""
    from models.flops import flops_per_token
    from trainer.dry_run import teacher_report

    hf_config(TEACHER, vocab_size=VOCAB).save_pretrained(tmp_path)
    job = JobConfig(distill=DistillConfig(teacher=str(tmp_path), soft_weight=1.0))
    job.parallel = dataclasses.replace(job.parallel, zero=3)
    report = teacher_report(job, vocab=VOCAB, seq_len=20, world_size=4)
    params = sum(p.numel() for p in Bert(TEACHER, vocab_size=VOCAB).parameters())
    assert report["params_total"] == params
    want = flops_per_token(TEACHER, vocab_size=VOCAB, seq_len=20) / 3
    assert report["forward_flops_per_token"] == pytest.approx(want)
    assert report["weights_gib_per_rank"] == pytest.approx(4 * params / 4 / 1024**3)


def test_each_term_alone_needs_only_its_outputs():
    """A mix of one term asks the models for that term's outputs alone (attention scores
    without hidden states, say) and scores it."""
    torch.manual_seed(0)
    inputs = batch()
    for field in ("soft_weight", "cosine_weight", "hidden_weight", "attention_weight"):
        cfg = DistillConfig(teacher="x", hard_weight=0.0, **{field: 1.0})
        teacher = Bert(TEACHER, vocab_size=VOCAB).eval()
        student = Bert(dataclasses.replace(STUDENT, d_model=48), vocab_size=VOCAB).eval()
        teacher.distill_outputs = student.distill_outputs = distill_outputs(cfg)
        labels = {"labels": torch.randint(0, VOCAB, (3, 20))} | distill_labels(inputs, cfg.tasks)
        with torch.no_grad():
            t_out, s_out = teacher(**inputs), student(**inputs)
        sums = DistillLoss(cfg, n_student=2, n_teacher=4)(
            s_out, labels | {f"teacher/{k}": v for k, v in t_out.items()}
        )
        assert set(sums) == {"labels", *cfg.tasks} and len(cfg.tasks) == 1
        assert float(sums[cfg.tasks[0]]) > 0
