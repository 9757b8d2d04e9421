"""XLNet's permutation language modelling: the layout, the span sampler (hand-checked and by its
statistics), perm_mask against a mask built from an explicit factorisation order, the order's
uniformity, determinism, config errors and the objective end to end."""

from __future__ import annotations

import dataclasses
import math
import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from data_pipeline.config import DataConfig, PlmConfig
from data_pipeline.objectives import build_objective, row_length, sample_rng, target_length
from data_pipeline.objectives.plm import (
    CLS_SEGMENT,
    SALT,
    PermutationLM,
    fill_targets,
    num_targets,
    permutation_mask,
    sample_spans,
)
from data_pipeline.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
SEP, CLS = TOK.special_tokens["[SEP]"], TOK.special_tokens["[CLS]"]
KEYS = {"input_ids", "token_type_ids", "perm_mask", "target_positions", "labels"}


def objective(seq_len: int = 64, *, seed: int = 0, **options) -> PermutationLM:
    cfg = DataConfig(plm=dataclasses.replace(PlmConfig(), **options))
    return PermutationLM("plm", cfg=cfg, tokenizer=TOK, seq_len=seq_len, seed=seed)


def rows(b: int, seq_len: int, *, first: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """A loader-shaped micro-batch of b random byte rows of seq_len + 1 tokens."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (b, seq_len + 1), generator=gen)
    return {
        "tokens": tokens,
        "sample_ids": torch.arange(first, first + b),
        "doc_start": torch.zeros(b, seq_len + 1, dtype=torch.bool),
    }


def contexts(spans_S2: np.ndarray, num_tokens: int, predict_ratio: float) -> np.ndarray:
    """int64 [S]: where each span's context begins, rebuilt from the span lengths (each context
    is round(L / predict_ratio) tokens, the last cut at the row's end)."""
    starts, cur = [], 0
    for _, length in spans_S2:
        starts.append(cur)
        cur += min(round(length / predict_ratio), num_tokens - cur)
    return np.array(starts, dtype=np.int64)


def chi2(counts: np.ndarray) -> float:
    """Pearson's statistic of `counts` against equal expected counts."""
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


class Scripted:
    """A stand-in generator whose `integers` returns the given values, recording its bounds."""

    def __init__(self, values):
        self.values, self.bounds = list(values), []

    def integers(self, *bounds):
        self.bounds.append(bounds)
        return self.values.pop(0)


# ---- hand-checked ----------------------------------------------------------------------------


def test_docstring_example():
    # seq_len 14, predict_ratio 1/3: A = 12, P = 4. Span of 2 at offset 3 of the context
    # x0..x5; then 3 drawn, shortened to the 2 missing, at offset 0 of the context x6..x11.
    assert num_targets(14, 1 / 3) == 4
    rng = Scripted([2, 3, 3, 0])
    spans = sample_spans(rng, 12, num_predict=4, max_span=5, predict_ratio=1 / 3)
    assert spans.tolist() == [[3, 2], [6, 2]]
    assert rng.bounds == [(1, 6), (5,), (1, 6), (5,)]  # offsets in 0..6 - 2
    rank = np.full((1, 14), -1)
    rank[0, [6, 3, 7, 4]] = [0, 1, 2, 3]  # the order x6 x3 x7 x4
    mask = permutation_mask(rank)[0].astype(int)
    targets = [3, 4, 6, 7]
    others = [i for i in range(14) if i not in targets]
    assert not mask[:, others].any()
    assert (mask[others][:, targets] == 1).all()
    assert mask[[6, 3, 7, 4]][:, targets].tolist() == [
        [1, 1, 1, 1],
        [1, 1, 0, 1],
        [0, 1, 0, 1],
        [0, 1, 0, 0],
    ]


def test_spans_cut_at_the_row_end_and_shortened_to_the_missing_targets():
    # The second span of 5 is shortened to the 2 targets missing; its context is 2 x 2.
    rng = Scripted([1, 1, 5, 2])
    spans = sample_spans(rng, 20, num_predict=3, max_span=5, predict_ratio=0.5)
    assert spans.tolist() == [[1, 1], [4, 2]]
    assert rng.bounds == [(1, 6), (2,), (1, 6), (3,)]  # offsets in 0..2 - 1, then 0..4 - 2
    # A context of 4 x 2 = 8 is cut to the 7 tokens left; the row then runs out 1 target short.
    rng = Scripted([1, 0, 4, 3])
    spans = sample_spans(rng, 9, num_predict=6, max_span=5, predict_ratio=0.5)
    assert spans.tolist() == [[0, 1], [5, 4]] and rng.bounds[-1] == (4,)
    # A context of 2 left holds a span of at most 2.
    rng = Scripted([1, 0, 4, 0])
    spans = sample_spans(rng, 4, num_predict=4, max_span=5, predict_ratio=0.5)
    assert spans.tolist() == [[0, 1], [2, 2]] and rng.bounds[-1] == (1,)


def test_num_targets():
    assert num_targets(512, 1 / 6) == 85
    assert num_targets(64, 1 / 6) == 10  # 62 / 6 = 10.3
    assert num_targets(11, 0.5) == 4  # 4.5, half to even
    assert num_targets(3, 1 / 6) == 1  # at least one
    assert num_targets(3, 0.9) == 1


def test_shortest_sample():
    out = objective(3)(rows(2, 3))
    assert out["target_positions"].tolist() == [[0], [0]]
    assert out["perm_mask"][0].tolist() == [[True, False, False]] * 3
    assert out["input_ids"][:, 1:].tolist() == [[SEP, CLS]] * 2


# ---- through the objective -------------------------------------------------------------------


def test_end_to_end_through_build_objective():
    assert {"[SEP]", "[CLS]"} <= set(TOK.special_tokens)
    cfg = DataConfig(objective="plm", seq_len=32)
    cfg.validate()
    obj = build_objective("plm", cfg=cfg, tokenizer=TOK, seq_len=32, seed=0)
    assert isinstance(obj, PermutationLM)
    assert target_length("plm", cfg=cfg, seq_len=32) == num_targets(32, 1 / 6) == 5
    assert row_length("plm", cfg=cfg, seq_len=32) == 33
    batch = rows(40, 32)
    out = obj(batch)
    assert set(out) == KEYS
    p = num_targets(32, 1 / 6)
    assert p == 5
    shapes = {
        "input_ids": (40, 32),
        "token_type_ids": (40, 32),
        "perm_mask": (40, 32, 32),
        "target_positions": (40, p),
        "labels": (40, p),
    }
    for key, shape in shapes.items():
        assert out[key].shape == shape, key
        assert out[key].dtype == (torch.bool if key == "perm_mask" else torch.int64), key
    assert torch.equal(out["input_ids"][:, :30], batch["tokens"][:, :30])
    assert (out["input_ids"][:, 30] == SEP).all() and (out["input_ids"][:, 31] == CLS).all()
    assert (out["token_type_ids"][:, :31] == 0).all() and (out["token_type_ids"][:, 31] == 2).all()
    assert CLS_SEGMENT == 2
    positions = out["target_positions"]
    assert (positions.diff(dim=1) > 0).all() and (positions < 30).all() and (positions >= 0).all()
    assert torch.equal(out["labels"], out["input_ids"].gather(1, positions))
    # The inputs are not masked, and the targets are the columns perm_mask hides.
    is_target = torch.zeros(40, 32, dtype=torch.bool).scatter_(1, positions, True)
    assert torch.equal(out["perm_mask"].any(dim=1), is_target)


def test_perm_mask_equals_a_mask_built_from_the_full_order():
    for seq_len, options in [(40, {}), (23, {"predict_ratio": 0.4, "max_span": 2})]:
        obj = objective(seq_len, seed=3, **options)
        out = obj(rows(200, seq_len))
        shuffle = np.random.default_rng(0)
        for i in range(200):
            order = obj.draw(sample_id=i).order
            others = np.setdiff1d(np.arange(seq_len), order)
            # The whole factorisation order: the non-targets (in any order) before the targets.
            full = np.concatenate([shuffle.permutation(others), order])
            assert sorted(full.tolist()) == list(range(seq_len))
            pos_in_order = np.argsort(full)
            is_target = np.isin(np.arange(seq_len), order)
            expected = np.zeros((seq_len, seq_len), dtype=bool)
            for q in range(seq_len):
                for j in range(seq_len):
                    expected[q, j] = is_target[j] and pos_in_order[j] >= pos_in_order[q]
            assert np.array_equal(out["perm_mask"][i].numpy(), expected), i
            assert out["target_positions"][i].tolist() == sorted(order.tolist())


def test_perm_mask_properties():
    out = objective(48, predict_ratio=0.25)(rows(300, 48))
    p = num_targets(48, 0.25)
    for i in range(300):
        mask = out["perm_mask"][i].numpy()
        targets = out["target_positions"][i].numpy()
        is_target = np.isin(np.arange(48), targets)
        assert mask[targets, targets].all()  # no target sees itself
        assert (mask[~is_target] == is_target).all()  # non-targets see no target, the rest all
        assert not mask[:, ~is_target].any()  # every position sees every non-target
        sees = ~mask[np.ix_(targets, targets)]  # [q, j]: target q sees target j
        # A strict total order: irreflexive, exactly one direction between two targets,
        # transitive (hence acyclic), so each target sees a different number 0..P-1 of them.
        assert not sees.diagonal().any()
        off_diagonal = ~np.eye(p, dtype=bool)
        assert (sees ^ sees.T)[off_diagonal].all()
        assert not ((sees.astype(int) @ sees.astype(int) > 0) & ~sees).any()
        assert sorted(sees.sum(1).tolist()) == list(range(p))


def test_exactly_p_targets_in_contiguous_spans():
    cases = [
        {},
        {"predict_ratio": 0.15},
        {"predict_ratio": 0.5, "max_span": 8},
        {"predict_ratio": 0.35, "max_span": 2},  # the spans often fall short: filled targets
    ]
    filled = []
    for options in cases:
        obj = objective(100, **options)
        ratio, max_span = obj.opts.predict_ratio, obj.opts.max_span
        for sample_id in range(500):
            draw = obj.draw(sample_id=sample_id)
            assert len(draw.order) == obj.num_predict == len(set(draw.order.tolist()))
            starts, lengths = draw.spans.T
            assert ((lengths >= 1) & (lengths <= max_span)).all()
            assert (np.diff(starts) >= lengths[:-1]).all()  # left to right, disjoint
            ctx = contexts(draw.spans, 98, ratio)
            ends = np.append(ctx[1:], min(98, ctx[-1] + round(lengths[-1] / ratio)))
            assert ((starts >= ctx) & (starts + lengths <= ends)).all()
            in_spans = np.concatenate([np.arange(s, s + n) for s, n in draw.spans])
            assert not np.isin(draw.filled, in_spans).any()
            assert sorted(draw.order.tolist()) == sorted([*in_spans, *draw.filled])
            assert draw.order.max() < 98  # never [SEP] or [CLS]
            filled.append(len(draw.filled))
    assert 0 < np.count_nonzero(filled) < len(filled)


def test_the_missing_targets_are_filled_when_the_row_runs_out():
    # Single-token spans in contexts of round(1 / 0.35) = 3: 33 contexts and a last one of the
    # 1 token left hold 34 of the P = 35 targets, so one is filled in every sample.
    obj = objective(102, predict_ratio=0.35, max_span=1)
    for sample_id in range(50):
        draw = obj.draw(sample_id=sample_id)
        assert len(draw.spans) == 34 and len(draw.filled) == 1
        assert set(draw.order.tolist()) == {*draw.spans[:, 0].tolist(), int(draw.filled[0])}
    # The filled positions are uniform over those the spans left.
    spans = np.array([[0, 5], [30, 5], [60, 5]])
    counts = np.zeros(100)
    for i in range(4000):
        rng = np.random.default_rng(i)
        counts[fill_targets(rng, 100, spans, num_predict=20)] += 1
    assert counts.sum() == 4000 * 5 and not counts[[0, 4, 30, 34, 60, 64]].any()
    free = np.ones(100, dtype=bool)
    free[[*range(5), *range(30, 35), *range(60, 65)]] = False
    assert chi2(counts[free]) < 130  # 84 degrees of freedom: p < 0.001 above 126.3


# ---- statistics --------------------------------------------------------------------------------


def test_span_lengths_are_uniform():
    for max_span in (5, 10):
        obj = objective(512, max_span=max_span)
        first, pooled = [], []
        for sample_id in range(3000):
            lengths = obj.draw(sample_id=sample_id).spans[:, 1]
            first.append(lengths[0])
            pooled += lengths[:-1].tolist()  # the last may be shortened
        counts = np.bincount(first, minlength=max_span + 1)[1:]
        assert len(counts) == max_span and chi2(counts) < 28  # 9 df: p < 0.001 above 27.9
        mean = (1 + max_span) / 2
        assert np.mean(first) == pytest.approx(mean, rel=0.03)
        assert np.mean(pooled) == pytest.approx(mean, rel=0.03)


def test_spans_are_placed_uniformly_in_their_contexts():
    obj = objective(512)
    offsets = {length: Counter() for length in range(1, 6)}
    for sample_id in range(4000):
        spans = obj.draw(sample_id=sample_id).spans[:-1]
        ctx = contexts(spans, 510, 1 / 6)
        for (start, length), begin in zip(spans[:4], ctx[:4], strict=True):
            offsets[length][start - begin] += 1
    total = 0.0
    for length, counter in offsets.items():
        assert set(counter) == set(range(6 * length - length + 1))
        total += chi2(np.array([counter[k] for k in range(5 * length + 1)]))
    assert total < 119  # 75 degrees of freedom: p < 0.001 above 118.6


def test_position_marginals():
    # Contexts tile the row from its left end, so the spans do not make every position equally
    # likely: a position at a context's edge is a target less often than one inside it.
    # Position 0 always begins a context: P(target) = mean over L of 1 / (6L - L + 1).
    obj = objective(512)
    n = 6000
    counts = np.zeros(512)
    for sample_id in range(n):
        counts[obj.draw(sample_id=sample_id).order] += 1
    assert counts.sum() == n * 85 and not counts[510:].any()
    exact = np.mean([1 / (5 * length + 1) for length in range(1, 6)])
    assert counts[0] / n == pytest.approx(exact, abs=0.01)
    interior = counts[60:450] / n
    assert (interior > 0.12).all() and (interior < 0.21).all()
    assert interior.mean() == pytest.approx(1 / 6, rel=0.02)


def test_factorisation_order_is_uniform():
    obj = objective(20)  # A = 18, P = 3: six orders of the three targets
    orders = Counter()
    first = np.zeros(3)
    for sample_id in range(3000):
        order = obj.draw(sample_id=sample_id).order
        ranks = tuple(np.argsort(np.argsort(order)).tolist())  # place of each in sorted order
        orders[ranks] += 1
        first[ranks[0]] += 1
    assert len(orders) == 6 and chi2(np.array(list(orders.values()))) < 20.6  # 5 df
    assert chi2(first) < 13.9  # 2 df
    # With many targets: the first in order is uniform among them.
    obj = objective(64)  # P = 10
    first = np.zeros(10)
    for sample_id in range(3000):
        order = obj.draw(sample_id=sample_id).order
        first[np.searchsorted(np.sort(order), order[0])] += 1
    assert chi2(first) < 27.9  # 9 df


# ---- determinism and errors --------------------------------------------------------------------


def test_draws_follow_the_documented_stream():
    obj = objective(512, seed=5)
    draw = obj.draw(sample_id=11)
    rng = sample_rng(5, 11, salt=SALT)
    length = int(rng.integers(1, 6))
    assert draw.spans[0].tolist() == [int(rng.integers(5 * length + 1)), length]


def test_deterministic_per_seed_and_sample_id():
    obj = objective(48, seed=7)
    batch = rows(8, 48, first=100)
    full = obj(batch)
    order = torch.tensor([6, 0, 3])
    part = obj({key: value[order] for key, value in batch.items()})
    for key in full:
        assert torch.equal(full[key][order], part[key]), key
    # The draw ignores the tokens.
    other_tokens = obj({**batch, "tokens": rows(8, 48, first=100, seed=1)["tokens"]})
    for key in ("perm_mask", "target_positions", "token_type_ids"):
        assert torch.equal(other_tokens[key], full[key]), key
    shifted = obj({**batch, "sample_ids": batch["sample_ids"] + 1})
    assert not torch.equal(shifted["perm_mask"], full["perm_mask"])
    other_seed = objective(48, seed=8)(batch)
    assert not torch.equal(other_seed["perm_mask"], full["perm_mask"])
    clone = pickle.loads(pickle.dumps(obj))
    assert all(torch.equal(clone(batch)[key], full[key]) for key in full)


def test_rows_shorter_than_the_segment_are_refused():
    batch = {"tokens": torch.zeros(2, 10, dtype=torch.int64), "sample_ids": torch.arange(2)}
    with pytest.raises(ValueError, match="seq_len - 2 = 14"):
        objective(16)(batch)


BAD = [
    ({"predict_ratio": 0.0}, r"data\.plm\.predict_ratio=0\.0 must be in \(0, 1\)"),
    ({"predict_ratio": 1.0}, r"data\.plm\.predict_ratio=1\.0 must be in \(0, 1\)"),
    ({"predict_ratio": -0.2}, r"data\.plm\.predict_ratio=-0\.2 must be in \(0, 1\)"),
    ({"predict_ratio": math.nan}, r"data\.plm\.predict_ratio=nan must be in"),
    ({"predict_ratio": "1/6"}, r"data\.plm\.predict_ratio='1/6' must be a number"),
    ({"max_span": 0}, r"data\.plm\.max_span=0 must be an integer >= 1"),
    ({"max_span": 2.5}, r"data\.plm\.max_span=2\.5 must be an integer >= 1"),
    ({"max_span": True}, r"data\.plm\.max_span=True must be an integer >= 1"),
]


@pytest.mark.parametrize(("options", "message"), BAD, ids=[m for _, m in BAD])
def test_impossible_options_name_the_field(options, message):
    cfg = DataConfig(plm=dataclasses.replace(PlmConfig(), **options))
    with pytest.raises(ConfigError, match=message) as info:
        cfg.validate()
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=message):
        build_objective("plm", cfg=cfg, tokenizer=TOK, seq_len=64, seed=0)


def test_possible_options_and_short_windows():
    DataConfig(objective="plm", plm=PlmConfig(predict_ratio=1 / 7, max_span=1)).validate()
    DataConfig().check_objective("plm", seq_len=3)
    with pytest.raises(ConfigError, match=r"data\.seq_len=2 is too short for data\.objective=plm"):
        DataConfig().check_objective("plm", seq_len=2)
    cfg = DataConfig(document_attention=True)
    with pytest.raises(ConfigError, match=r"data\.document_attention=true is not supported"):
        PermutationLM("plm", cfg=cfg, tokenizer=TOK, seq_len=16, seed=0)


def test_a_tokenizer_without_sep_is_refused():
    class NoSep:
        special_tokens = {"[CLS]": 1}

    with pytest.raises(ValueError, match=r"lacks the special token \[SEP\]"):
        PermutationLM("plm", cfg=DataConfig(), tokenizer=NoSep(), seq_len=16, seed=0)
