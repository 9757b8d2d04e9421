"""ERNIE 1.0 knowledge masking: phrase units, the stage mix, and their statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from data_pipeline.config import KNOWLEDGE_STAGES, DataConfig
from data_pipeline.objectives import IGNORE_INDEX, build_objective, sample_rng
from data_pipeline.objectives import mlm as mlm_module
from data_pipeline.objectives.mlm import PHRASE_PROBS, knowledge_stage, sample_spans
from tests.unit.test_mlm import TOK, objective, text_rows, unmasked


def within_binomial(count: int, n: int, p: float, *, sigmas: float = 5.0) -> bool:
    """Whether count is within `sigmas` standard deviations of Binomial(n, p)'s mean."""
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p)) + 1


def word_ids(obj, original: np.ndarray) -> np.ndarray:
    return np.cumsum(obj._word_starts(original), axis=1)


def assert_whole_words(out: dict[str, torch.Tensor], obj) -> None:
    """Every word of the content is either masked entirely or not at all."""
    original = unmasked(out).numpy()
    chosen = (out["labels"] != IGNORE_INDEX).numpy()
    ids = word_ids(obj, original)
    for row in range(len(original)):
        content = ~obj.is_special[original[row]]
        for w in np.unique(ids[row][content]):
            in_word = (ids[row] == w) & content
            assert chosen[row][in_word].all() or not chosen[row][in_word].any()


def test_phrase_lengths_follow_one_over_n_within_binomial_bounds():
    drawn = np.concatenate(
        [
            sample_spans(np.ones(3000, dtype=int), 450, sample_rng(0, i), probs=PHRASE_PROBS)[1]
            for i in range(20)
        ]
    )
    n = len(drawn)
    assert n > 3000
    for length, p in enumerate(PHRASE_PROBS, start=1):
        assert within_binomial(int((drawn == length).sum()), n, p), (length, p)
    assert drawn.min() == 1 and drawn.max() == 3


def test_phrase_masks_whole_words_near_the_budget():
    obj = objective(unit="phrase", seq_len=128)
    out = obj(text_rows(60, 128))
    assert_whole_words(out, obj)
    chosen = (out["labels"] != IGNORE_INDEX).numpy()
    content = (~obj.is_special[unmasked(out).numpy()]).sum(axis=1)
    budget = np.maximum(1, np.round(0.15 * content))
    assert (chosen.sum(axis=1) <= budget).all()
    # Whole words may leave a row a few tokens short; on average it is close.
    assert chosen.sum() >= 0.9 * budget.sum()


def test_phrase_masks_multi_word_runs():
    """Phrase units cover consecutive words: runs of masked words are longer than with
    whole-word masking at the same budget."""

    def mean_run_in_words(unit: str) -> float:
        obj = objective(unit=unit, seq_len=512)
        out = obj(text_rows(60, 512))
        original = unmasked(out).numpy()
        chosen = (out["labels"] != IGNORE_INDEX).numpy()
        starts = obj._word_starts(original)
        masked_starts = starts & chosen
        runs = []
        for row in range(len(original)):
            w = masked_starts[row][starts[row]].astype(int)
            edges = np.diff(np.r_[0, w, 0])
            runs += list(np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1))
        return float(np.mean(runs))

    phrase, word = mean_run_in_words("phrase"), mean_run_in_words("word")
    print(f"mean masked run: phrase {phrase:.3f} words, word {word:.3f} words")
    assert phrase > 1.3 * word


def test_knowledge_stage_shares_within_binomial_bounds():
    shares = [0.5, 0.25, 0.25]
    n = 6000
    stages = [knowledge_stage(7, i, shares) for i in range(n)]
    for level, p in zip(KNOWLEDGE_STAGES, shares, strict=True):
        assert within_binomial(stages.count(level), n, p), (level, stages.count(level))
    assert {knowledge_stage(7, i, [0.0, 1.0, 0.0]) for i in range(200)} == {"phrase"}


def test_knowledge_rows_are_masked_at_their_stage_level(monkeypatch):
    warned: list[str] = []
    monkeypatch.setattr(mlm_module, "warn_once", warned.append)
    batch = text_rows(40, 128)
    knowledge = objective(unit="knowledge", seq_len=128, seed=5)
    out = knowledge(batch)
    by_token = objective(unit="token", seq_len=128, seed=5)(batch)
    by_phrase = objective(unit="phrase", seq_len=128, seed=5)(batch)
    stages = [knowledge_stage(5, i, knowledge.mlm.knowledge_stages) for i in range(40)]
    assert set(stages) == set(KNOWLEDGE_STAGES)
    for row, stage in enumerate(stages):
        expect = by_token if stage == "token" else by_phrase
        for key in ("input_ids", "labels"):
            assert torch.equal(out[key][row], expect[key][row]), (row, stage, key)
    # Entity level without corpus spans falls back to phrases, and says so.
    assert warned and "phrase" in warned[0]


def test_existing_units_ignore_the_stage_mix():
    batch = text_rows(8, 64)
    for unit in ("token", "word", "span", "ngram"):
        plain = objective(unit=unit)(batch)
        mixed = objective(unit=unit, knowledge_stages=[0.0, 0.0, 1.0])(batch)
        assert all(torch.equal(plain[k], mixed[k]) for k in plain)


@pytest.mark.parametrize(
    "stages, message",
    [
        ([0.5, 0.5], "must hold 3 shares"),
        ([0.5, 0.25, 0.5], "add up to"),
        ([1.5, -0.25, -0.25], "knowledge_stages (token)"),
        ("0.5,0.25,0.25", "must be a list"),
    ],
)
def test_bad_stage_mix_is_refused_by_name(stages, message):
    cfg = DataConfig()
    cfg.mlm.knowledge_stages = stages
    with pytest.raises(ConfigError, match="data.mlm.knowledge_stages") as err:
        cfg.validate()
    assert message in str(err.value)


@pytest.mark.parametrize("unit", ["phrase", "knowledge"])
def test_sbo_refuses_ernie_units(unit):
    cfg = DataConfig()
    cfg.mlm.unit = unit
    with pytest.raises(ConfigError, match=f"data.mlm.unit={unit}"):
        build_objective("mlm_sbo", cfg=cfg, tokenizer=TOK, seq_len=64, seed=0)


# ---- corpus spans in the batch ------------------------------------------------------------


def with_spans(batch: dict[str, torch.Tensor], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """`batch` with random non-overlapping spans of 2..6 tokens, phrases and entities."""
    rng = np.random.default_rng(seed)
    shape = batch["tokens"].shape
    start, kind = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=np.int8)
    for row in range(shape[0]):
        at = 0
        while True:
            at += int(rng.integers(1, 8))
            length = int(rng.integers(2, 7))
            if at + length > shape[1]:
                break
            start[row, at] = True
            kind[row, at : at + length] = 1 + int(rng.integers(2))
            at += length
    return {**batch, "span_start": torch.from_numpy(start), "span_kind": torch.from_numpy(kind)}


def span_runs(start_T: np.ndarray, inside_T: np.ndarray) -> list[np.ndarray]:
    """Positions of each span: runs of inside_T split at start_T."""
    runs, current = [], []
    for j in range(len(inside_T)):
        if inside_T[j] and (start_T[j] or not current):
            if current:
                runs.append(np.array(current))
            current = [j]
        elif inside_T[j]:
            current.append(j)
        elif current:
            runs.append(np.array(current))
            current = []
    if current:
        runs.append(np.array(current))
    return runs


@pytest.mark.parametrize("name", ["mlm", "mlm_nsp", "mlm_sop"])
@pytest.mark.parametrize("level", ["phrase", "entity"])
def test_corpus_spans_are_masked_whole(name, level):
    shares = [0.0, 1.0, 0.0] if level == "phrase" else [0.0, 0.0, 1.0]
    batch = with_spans(text_rows(40, 128))
    obj = objective(name, unit="knowledge", seq_len=128, knowledge_stages=shares)
    out = obj(batch)
    chosen = (out["labels"] != IGNORE_INDEX).numpy()
    ids = [int(i) for i in batch["sample_ids"]]
    start_BT, kind_BT = obj._span_marks(
        batch, batch["tokens"].numpy(), *obj._boundaries(batch, batch["tokens"].numpy()), ids
    )
    code = mlm_module.SPAN_KINDS[level]
    whole = partial = 0
    for row in range(len(chosen)):
        for run in span_runs(start_BT[row], kind_BT[row] == code):
            assert chosen[row, run].all() or not chosen[row, run].any(), (row, run)
            whole += int(chosen[row, run].all())
            partial += int(chosen[row, run].any() and not chosen[row, run].all())
    assert whole > 20 and partial == 0
    # The words outside the spans of this level stay whole too.
    original = unmasked(out).numpy()
    starts = obj._word_starts(original)
    for row in range(len(chosen)):
        outside = kind_BT[row] != code
        word = np.cumsum(starts[row] | (kind_BT[row] == code))
        content = ~obj.is_special[original[row]] & outside
        for w in np.unique(word[content]):
            in_word = (word == w) & content
            assert chosen[row][in_word].all() or not chosen[row][in_word].any()


def test_span_share_of_masked_units_follows_their_share_of_units():
    """Spans are units like words: among chosen units, spans take about their share."""
    batch = with_spans(text_rows(200, 128), seed=1)
    obj = objective("mlm", unit="knowledge", seq_len=128, knowledge_stages=[0.0, 0.0, 1.0])
    out = obj(batch)
    chosen = (out["labels"] != IGNORE_INDEX).numpy()
    ids = list(range(200))
    start_BT, kind_BT = obj._span_marks(
        batch, batch["tokens"].numpy(), *obj._boundaries(batch, batch["tokens"].numpy()), ids
    )
    original = unmasked(out).numpy()
    words = obj._word_starts(original)
    spans_total = spans_chosen = units_total = units_chosen = 0
    for row in range(200):
        inside = kind_BT[row] == 2
        units = mlm_module._span_units(
            words[row], start_BT[row], inside, ~obj.is_special[original[row]]
        )
        is_span = units & inside
        spans_total += int(is_span.sum())
        spans_chosen += int((is_span & chosen[row]).sum())
        units_total += int(units.sum())
        units_chosen += int((units & chosen[row]).sum())
    share = spans_total / units_total
    print(f"entity spans: {share:.3f} of units, {spans_chosen / units_chosen:.3f} of chosen units")
    # Longer units overflow the budget more often, so spans come out a little under.
    assert 0.75 * share < spans_chosen / units_chosen < 1.05 * share


def test_batches_without_spans_keep_their_masks():
    batch = text_rows(16, 64)
    obj = objective(unit="knowledge")
    plain = obj(batch)
    shares = [1.0, 0.0, 0.0]  # token level ignores spans: same masks with or without them
    token_only = objective(unit="knowledge", knowledge_stages=shares)
    assert all(torch.equal(token_only(batch)[k], token_only(with_spans(batch))[k]) for k in plain)


# ---- recipes ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ernie_debug", "ernie_base"])
def test_recipes_validate_as_bert_with_relu(name):
    from tests.unit.test_bert import load

    cfg = load(name)
    cfg.validate()
    assert (cfg.name, cfg.family, cfg.objective, cfg.activation) == (
        name,
        "bert",
        "mlm_nsp",
        "relu",
    )


def test_ernie_base_parameter_count_matches_hf_bert_of_ernie_shape():
    transformers = pytest.importorskip("transformers")
    from models.build import build_model, param_counts
    from tests.unit.test_bert import load

    cfg = load("ernie_base")
    hf = transformers.BertConfig(
        vocab_size=18000, hidden_act="relu", max_position_embeddings=513, type_vocab_size=2
    )
    with torch.device("meta"):
        ours = param_counts(build_model(cfg, vocab_size=cfg.padded_vocab_size()))
        theirs = transformers.BertForPreTraining(hf)
    assert ours["total"] == sum(p.numel() for p in theirs.parameters()) == 100_477_778
