"""SpanBERT's span boundary objective: the mlm_sbo targets and the model's SBO head."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.errors import ConfigError
from data_pipeline.config import DataConfig, MlmConfig
from data_pipeline.objectives import IGNORE_INDEX, build_objective
from data_pipeline.objectives.mlm import MaskedLM
from data_pipeline.objectives.sbo import SpanBoundaryLM, sbo_slots, span_boundary_targets
from data_pipeline.tokenizers import ByteTokenizer
from models.bert import Bert
from models.config import ModelConfig
from tests.unit.test_mlm import text_rows

TOK = ByteTokenizer()


def sbo_objective(*, seq_len: int = 128, seed: int = 0, **mlm) -> SpanBoundaryLM:
    cfg = DataConfig(mlm=dataclasses.replace(MlmConfig(), **mlm))
    return SpanBoundaryLM("mlm_sbo", cfg=cfg, tokenizer=TOK, seq_len=seq_len, seed=seed)


def test_targets_of_a_known_row_by_hand():
    # Positions 0..11; spans (2, 4), (7, 7) and (9, 10): boundaries lie just outside them.
    labels = np.full((1, 12), IGNORE_INDEX)
    labels[0, [2, 3, 4, 7, 9, 10]] = [20, 30, 40, 70, 90, 100]
    out = span_boundary_targets(labels, slots=8, max_targets=2)
    # Position 4 is the third token of its span: past max_targets=2, left to MLM alone.
    assert out["sbo_left"].tolist() == [[1, 1, 6, 8, 8, 0, 0, 0]]
    assert out["sbo_right"].tolist() == [[5, 5, 8, 11, 11, 0, 0, 0]]
    assert out["sbo_pos"].tolist() == [[0, 1, 0, 0, 1, 0, 0, 0]]
    assert out["sbo_labels"].tolist() == [[20, 30, 70, 90, 100, -100, -100, -100]]


def test_boundaries_are_clamped_to_the_sequence():
    labels = np.full((1, 4), IGNORE_INDEX)
    labels[0, [0, 1, 3]] = [5, 6, 7]
    out = span_boundary_targets(labels, slots=3, max_targets=10)
    assert out["sbo_left"].tolist() == [[0, 0, 2]]
    assert out["sbo_right"].tolist() == [[2, 2, 3]]


def test_mlm_part_equals_mlm_with_span_masking_and_statistics():
    seq_len = 128
    batch = text_rows(40, seq_len)
    out = sbo_objective(seq_len=seq_len)(batch)
    cfg = DataConfig(mlm=MlmConfig(unit="span"))
    ref = MaskedLM("mlm", cfg=cfg, tokenizer=TOK, seq_len=seq_len, seed=0)(batch)
    for key in ("input_ids", "labels", "attention_mask", "token_type_ids"):
        assert torch.equal(out[key], ref[key]), key
    k = sbo_slots(0.15, seq_len)
    assert out["sbo_labels"].shape == (40, k)
    labels = out["labels"].numpy()
    masked = labels != IGNORE_INDEX
    rows = np.arange(40)[:, None].repeat(k, 1)
    scored = out["sbo_labels"].numpy() != IGNORE_INDEX
    left, right, pos = (out[key].numpy() for key in ("sbo_left", "sbo_right", "sbo_pos"))
    # Every masked token less than 15 past its span's start is a target (counted by a loop).
    within = 0
    for row in masked:
        run = 0
        for m in row:
            run = run + 1 if m else 0
            within += 0 < run <= 15
    assert scored.sum() == within > 0
    assert within < masked.sum()  # byte spans of up to 10 words outgrow 15 tokens
    assert not masked[rows[scored], left[scored]].any()
    assert not masked[rows[scored], right[scored]].any()
    target = left[scored] + 1 + pos[scored]
    assert (target < right[scored]).all()  # inside the span: position < its length
    assert np.array_equal(out["sbo_labels"].numpy()[scored], labels[rows[scored], target])
    # Between the boundaries every token is masked (the span is one run).
    for r, lo, hi in zip(rows[scored], left[scored], right[scored], strict=True):
        assert masked[r, lo + 1 : hi].all()
    assert ((pos[scored] >= 0) & (pos[scored] < 15)).all()
    assert pos[scored].max() >= 3  # spans of several tokens occur


def test_objective_is_a_pure_function_of_seed_and_sample_id():
    batch = text_rows(6, 64)
    a, b = sbo_objective(seq_len=64)(batch), sbo_objective(seq_len=64)(batch)
    assert all(torch.equal(a[key], b[key]) for key in a)
    built = build_objective("mlm_sbo", cfg=DataConfig(), tokenizer=TOK, seq_len=64, seed=0)
    assert torch.equal(built(batch)["sbo_labels"], a["sbo_labels"])


@pytest.mark.parametrize("unit", ["word", "ngram"])
def test_other_units_are_refused_by_name(unit):
    with pytest.raises(ConfigError, match=f"data.mlm.unit={unit}"):
        sbo_objective(unit=unit)


def tiny_spanbert(**over) -> ModelConfig:
    fields = dict(
        family="bert",
        objective="mlm_sbo",
        n_layer=1,
        d_model=32,
        n_head=2,
        max_seq_len=16,
        pre_ln=False,
        activation="gelu",
        type_vocab_size=1,
        pair_head=False,
        sbo_max_targets=5,
        sbo_position_size=8,
    )
    return ModelConfig(**(fields | over))


def test_sbo_head_matches_the_papers_formula():
    torch.manual_seed(0)
    model = Bert(tiny_spanbert(), vocab_size=50).double().eval()
    for p in model.parameters():  # nonzero biases and norms, so every term is checked
        torch.nn.init.normal_(p, std=0.3)
    ids = torch.randint(0, 50, (2, 16))
    left = torch.tensor([[1, 1, 6, 0], [3, 3, 3, 9]])
    right = torch.tensor([[4, 4, 8, 0], [7, 7, 7, 12]])
    pos = torch.tensor([[0, 1, 0, 0], [0, 1, 2, 1]])
    out = model(ids, sbo_left=left, sbo_right=right, sbo_pos=pos)
    assert out["sbo_logits"].shape == (2, 4, 50)
    x = model.encode(model.embed(ids))
    head = model.sbo

    def ln(v, norm):
        mu, var = v.mean(-1, keepdim=True), v.var(-1, unbiased=False, keepdim=True)
        return (v - mu) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias

    expected = torch.empty(2, 4, 50, dtype=torch.float64)
    for b in range(2):
        for j in range(4):
            h0 = torch.cat([x[b, left[b, j]], x[b, right[b, j]], head.position.weight[pos[b, j]]])
            h1 = ln(F.gelu(head.dense1.weight @ h0 + head.dense1.bias), head.ln1)
            y = ln(F.gelu(head.dense2.weight @ h1 + head.dense2.bias), head.ln2)
            expected[b, j] = model.wte.weight @ y + model.lm_head.bias  # tied decoder
    torch.testing.assert_close(out["sbo_logits"], expected, atol=1e-6, rtol=0)
    assert model.lm_head.weight is model.wte.weight


def test_sbo_config_is_checked():
    with pytest.raises(ConfigError, match="mlm_sbo needs it"):
        tiny_spanbert(sbo_max_targets=0).validate()
    with pytest.raises(ConfigError, match="objective mlm with model.sbo_max_targets=5"):
        tiny_spanbert(objective="mlm").validate()
    with pytest.raises(ConfigError, match="family=gpt"):
        ModelConfig(family="gpt", sbo_max_targets=5).validate()


def test_flops_count_the_head_on_its_target_slots():
    from models.flops import bert_flops

    cfg = tiny_spanbert()
    base = bert_flops(
        dataclasses.replace(cfg, sbo_max_targets=0, objective="mlm"), vocab_size=50, seq_len=16
    )
    k = sbo_slots(0.15, 16)  # 2 of 16 tokens
    head = (2 * 32 + 8) * 32 + 32 * 32 + 50 * 32
    assert bert_flops(cfg, vocab_size=50, seq_len=16) - base == pytest.approx(6 * head * k / 16)
