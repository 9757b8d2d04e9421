"""StructBERT (data.objective=mlm_struct, model.pair_classes=3): the word structural objective's
shuffle rate within binomial bounds, shuffles only of unmasked non-special tokens, really
permuted, labelled with the original tokens; the three sentence classes a third each, the
"previous" pairs the "next" pairs swapped; a hand-checked small case; the 3-way pair head."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from data_pipeline.config import DataConfig, MlmConfig
from data_pipeline.objectives import IGNORE_INDEX, build_objective
from data_pipeline.objectives.mlm import _pieces
from data_pipeline.objectives.structbert import (
    NEXT,
    PREVIOUS,
    RANDOM,
    StructuralLM,
    shuffle_ngrams,
    sso_layout,
)
from models import build_model
from models.config import ModelConfig
from tests.unit.test_mlm import EOS, SP, TOK, text_rows

T = 128
SPECIAL_IDS = torch.tensor(list(SP.values()))


def struct(seed: int = 0, **mlm) -> StructuralLM:
    cfg = DataConfig(mlm=MlmConfig(**mlm))
    return StructuralLM("mlm_struct", cfg=cfg, tokenizer=TOK, seq_len=T, seed=seed)


def within_binomial(k: int, n: int, p: float, z: float = 4.5) -> bool:
    return abs(k / n - p) < z * math.sqrt(p * (1 - p) / n)


def test_shuffle_rate_within_binomial_bounds_and_permutes():
    rng = np.random.default_rng(0)
    chosen_total = candidates_total = 0
    for _ in range(400):
        ids = rng.integers(0, 250, size=T)
        free = rng.random(T) < 0.85
        out, starts, candidates = shuffle_ngrams(ids, free, rng, prob=0.05)
        chosen_total += len(starts)
        candidates_total += candidates
        changed = np.flatnonzero(out != ids)
        grams = starts[:, None] + np.arange(3)
        assert set(changed.tolist()) <= set(grams.ravel().tolist())
        for g in grams:
            assert free[g].all()
            assert sorted(out[g]) == sorted(ids[g]) and (out[g] != ids[g]).any()
    assert within_binomial(chosen_total, candidates_total, 0.05), (chosen_total, candidates_total)


def test_shuffle_by_hand():
    # Positions 0..9; position 0 is special ([CLS]) and position 5 is masked: with offset o the
    # tiles are [o + 3i, o + 3i + 3); prob 1 shuffles every tile that is all free.
    ids = np.array([900, 11, 12, 13, 14, 15, 16, 17, 18, 19])
    free = np.ones(10, dtype=bool)
    free[[0, 5]] = False
    # o=0: tiles at 0, 3, 6 -> [6..8]; o=1: 1, 4, 7 -> [1..3], [7..9]; o=2: 2, 5 -> [2..4].
    expected = {0: [6], 1: [1, 7], 2: [2]}
    seen = set()
    for seed in range(30):
        rng = np.random.default_rng(seed)
        offset = int(np.random.default_rng(seed).integers(3))
        out, starts, candidates = shuffle_ngrams(ids, free, rng, prob=1.0)
        assert starts.tolist() == expected[offset] and candidates == len(expected[offset])
        for s in starts:
            assert sorted(out[s : s + 3]) == ids[s : s + 3].tolist()
            assert out[s : s + 3].tolist() != ids[s : s + 3].tolist()
        rest = np.delete(np.arange(10), (starts[:, None] + np.arange(3)).ravel())
        assert (out[rest] == ids[rest]).all()
        seen.add(offset)
    assert seen == {0, 1, 2}
    # A tile of one id cannot be reordered visibly, so it is no candidate.
    same = np.array([7, 7, 7, 7, 7, 7])
    _, starts, candidates = shuffle_ngrams(same, np.ones(6, dtype=bool), rng, prob=1.0)
    assert candidates == 0 and len(starts) == 0


def test_objective_shuffles_unmasked_tokens_and_labels_the_originals():
    batch = text_rows(300, T, eos_every=90)
    out, shuffled, candidates = struct().transform(batch)
    plain, _, _ = struct(shuffle_prob=0.0).transform(batch)  # the same masks and pairs
    labels, inputs = out["labels"].numpy(), out["input_ids"].numpy()
    plain_labels, plain_inputs = plain["labels"].numpy(), plain["input_ids"].numpy()
    # MLM untouched: masked positions and their labels are as without shuffling.
    mlm = plain_labels != IGNORE_INDEX
    assert not (shuffled & mlm).any()
    assert (labels[mlm] == plain_labels[mlm]).all() and (inputs[mlm] == plain_inputs[mlm]).all()
    assert (inputs[~shuffled] == plain_inputs[~shuffled]).all()
    # Shuffled: never a special token, labelled with the original token, really permuted.
    assert not torch.isin(torch.from_numpy(plain_inputs[shuffled]), SPECIAL_IDS).any()
    assert (labels[shuffled] == plain_inputs[shuffled]).all()
    assert (labels[~shuffled & ~mlm] == IGNORE_INDEX).all()
    runs = shuffled.sum()
    assert runs % 3 == 0
    n_grams = int(runs // 3)
    for r in range(len(shuffled)):
        pos = np.flatnonzero(shuffled[r])
        for g in pos.reshape(-1, 3):
            assert g[2] - g[0] == 2
            assert sorted(inputs[r, g]) == sorted(plain_inputs[r, g])
            assert (inputs[r, g] != plain_inputs[r, g]).any()
    assert within_binomial(n_grams, candidates, 0.05), (n_grams, candidates)
    assert n_grams > 100


def test_sentence_classes_a_third_each():
    obj, n = struct(), 6000
    classes = [obj.sso_class(i) for i in range(n)]
    for c in (NEXT, PREVIOUS, RANDOM):
        assert within_binomial(classes.count(c), n, 1 / 3), (c, classes.count(c))
    out = obj(text_rows(600, T, eos_every=90))
    labels = out["nsp_labels"].tolist()
    scored = [x for x in labels if x != IGNORE_INDEX]
    assert len(scored) == 600
    for c in (NEXT, PREVIOUS, RANDOM):
        assert within_binomial(scored.count(c), len(scored), 1 / 3), (c, scored.count(c))


def test_previous_is_next_swapped_and_random_keeps_the_lengths():
    batch = text_rows(50, T, eos_every=90)
    tokens, doc, sent = (batch[k].numpy() for k in ("tokens", "doc_start", "sent_start"))
    for r in range(50):
        bound = doc[r].copy()
        bound[1:] |= tokens[r, :-1] == EOS
        bound[0] = True
        pieces = _pieces(tokens[r], bound, EOS)
        got = {}
        for c in (NEXT, PREVIOUS, RANDOM):
            rng = np.random.Generator(np.random.PCG64([1, r]))
            got[c] = sso_layout(rng, pieces, sent[r] | bound, budget=T - 3, label=c)
        (a, b), label = got[NEXT]
        assert label == NEXT and a[1] == b[0]  # B is the text right after A
        assert got[PREVIOUS] == ([b, a], PREVIOUS)
        (ra, rb), label = got[RANDOM]
        assert label == RANDOM and ra == a and rb != b and rb[1] - rb[0] == b[1] - b[0]


def test_layout_and_types_of_a_previous_pair():
    obj = struct()
    sid = next(i for i in range(100) if obj.sso_class(i) == PREVIOUS)
    batch = text_rows(sid + 1, T, eos_every=90)
    out = obj(batch)
    ids, types = out["input_ids"][sid], out["token_type_ids"][sid]
    original = torch.where(out["labels"][sid] != IGNORE_INDEX, out["labels"][sid], ids)
    seps = torch.nonzero(original == SP["[SEP]"]).ravel().tolist()
    assert original[0] == SP["[CLS]"] and len(seps) == 2 and out["nsp_labels"][sid] == PREVIOUS
    s1, s2 = original[1 : seps[0]].tolist(), original[seps[0] + 1 : seps[1]].tolist()
    row = batch["tokens"][sid].tolist()
    # S2 comes right before S1 in the row.
    joined = s2 + s1
    assert any(row[i : i + len(joined)] == joined for i in range(len(row) - len(joined) + 1))
    assert types[: seps[0] + 1].eq(0).all() and types[seps[0] + 1 : seps[1] + 1].eq(1).all()


def test_deterministic_picklable_and_registered():
    batch = text_rows(8, T)
    a = build_objective("mlm_struct", cfg=DataConfig(), tokenizer=TOK, seq_len=T, seed=3)
    b = pickle.loads(pickle.dumps(a))
    for k, v in a(batch).items():
        assert torch.equal(v, b(batch)[k]), k


def test_pair_head_has_three_classes_and_config_checks():
    cfg = ModelConfig(
        family="bert", objective="mlm_struct", pair_classes=3, n_layer=1, d_model=32, n_head=2
    )
    model = build_model(cfg, vocab_size=300)
    ids = torch.randint(0, 256, (2, 16))
    assert model(ids)["nsp_logits"].shape == (2, 3)
    with pytest.raises(ConfigError, match="pair_classes=3"):
        ModelConfig(family="bert", objective="mlm_struct").validate()
    with pytest.raises(ConfigError, match="pair_classes=2"):
        ModelConfig(family="bert", objective="mlm_nsp", pair_classes=3).validate()
    with pytest.raises(ConfigError, match="pair head"):
        ModelConfig(family="gpt", pair_classes=3).validate()
    with pytest.raises(ConfigError, match=">= 2"):
        ModelConfig(family="bert", objective="mlm", pair_classes=1).validate()
