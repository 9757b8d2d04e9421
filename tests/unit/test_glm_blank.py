"""Unit tests of the GLM blank-infilling objective: exact layout, reconstruction of the raw
window, span statistics, the [sMASK] / [gMASK] variants, task mixing and determinism."""

from __future__ import annotations

import dataclasses
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig, GlmConfig
from data_pipeline.objectives import IGNORE_INDEX, build_objective
from data_pipeline.objectives.glm import BlankInfilling, assemble, span_length_probs
from data_pipeline.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
SP = TOK.special_tokens
MASKS = {"mask": SP["[MASK]"], "sentence": SP["[sMASK]"], "gmask": SP["[gMASK]"]}
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def corpus(n_tokens: int = 60_000, seed: int = 0):
    """Packed token stream of documents of sentences, with doc_start / sent_start flags."""
    rng = np.random.default_rng(seed)
    tokens, doc, sent = [], [], []
    while len(tokens) < n_tokens:
        for j in range(rng.integers(2, 8)):
            ids = TOK.encode(" ".join(rng.choice(WORDS, rng.integers(3, 12))) + ". ")
            tokens += ids
            doc += [j == 0] + [False] * (len(ids) - 1)
            sent += [True] + [False] * (len(ids) - 1)
        tokens.append(TOK.eos_id)
        doc.append(False)
        sent.append(False)
    return np.array(tokens), np.array(doc), np.array(sent)


TOKENS, DOC, SENT = corpus()


def rows(b: int, seq_len: int, *, first: int = 0) -> dict[str, torch.Tensor]:
    """A loader micro-batch of b packed rows of seq_len + 1 tokens."""
    s = seq_len + 1
    starts = [(first + i) * 37 % (len(TOKENS) - s) for i in range(b)]
    take = lambda a: torch.from_numpy(np.stack([a[o : o + s] for o in starts]))  # noqa: E731
    return {
        "tokens": take(TOKENS),
        "doc_start": take(DOC),
        "sent_start": take(SENT),
        "sample_ids": torch.arange(first, first + b),
    }


def objective(seq_len: int = 128, seed: int = 0, **glm) -> BlankInfilling:
    cfg = DataConfig(glm=GlmConfig(**glm))
    return BlankInfilling("glm_blank", cfg=cfg, tokenizer=TOK, seq_len=seq_len, seed=seed)


def samples(obj: BlankInfilling, n: int, *, first: int = 0) -> list[dict]:
    batch = rows(n, obj.seq_len, first=first)
    return [
        obj.build_one(
            batch["tokens"][i].numpy(),
            sample_id=first + i,
            doc_start_S=batch["doc_start"][i].numpy(),
            sent_start_S=batch["sent_start"][i].numpy(),
        )
        for i in range(n)
    ]


def reconstruct(input_ids, labels, positions, block, sep) -> tuple[list[int], list[list[int]]]:
    """The raw window rebuilt from Part A and Part B alone, checking Part B's layout; also
    returns the spans in Part B order."""
    part_a = [int(t) for t in input_ids[:sep]]
    filled, spans, i = {}, [], sep
    while i < len(input_ids) and input_ids[i] == SP["<sop>"]:
        j = i
        while labels[j] != SP["<eop>"]:
            j += 1
        span = [int(t) for t in labels[i:j]]
        assert list(input_ids[i : j + 1]) == [SP["<sop>"], *span]  # teacher forcing
        assert set(positions[i : j + 1].tolist()) == {positions[i]}
        assert list(block[i : j + 1]) == list(range(1, len(span) + 2))
        assert part_a[positions[i]] in MASKS.values()
        filled[int(positions[i])] = span
        spans.append(span)
        i = j + 1
    assert all(t == SP["<pad>"] for t in input_ids[i:])
    assert all(label == IGNORE_INDEX for label in labels[i:])
    window = []
    for p, t in enumerate(part_a):
        window += filled.get(p, [t])
    return window, spans


# ---- exact layout ----------------------------------------------------------------------


def test_paper_figure_example():
    """Figure 2 of the paper: x1..x6 with spans [x3] and [x5, x6], Part B order (s2, s1)."""
    x = np.array([11, 12, 13, 14, 15, 16])
    out = assemble(
        x, np.array([2, 4]), np.array([1, 2]), order=np.array([1, 0]), mask_id=-1, sop_id=-2,
        eop_id=-3,
    )  # fmt: skip
    assert out["input_ids"].tolist() == [11, 12, -1, 14, -1, -2, 15, 16, -2, 13]
    assert out["labels"].tolist() == [-100] * 5 + [15, 16, -3, 13, -3]
    assert out["positions"].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 2, 2]
    assert out["block_positions"].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 1, 2]
    assert out["sep"] == 5


@pytest.mark.parametrize("task", ["mask", "sentence", "gmask"])
def test_layout_and_reconstruction(task):
    probs = {"mask": {}, "sentence": {"sentence_prob": 1.0}, "gmask": {"gmask_prob": 1.0}}
    obj = objective(seq_len=96, **probs[task])
    for s in samples(obj, 40):
        assert s["task"] == task
        for key in ("input_ids", "labels", "positions", "block_positions"):
            assert s[key].shape == (96,) and s[key].dtype == np.int64
        sep = s["sep"]
        part_a = s["input_ids"][:sep]
        k = len(s["starts"])
        assert (part_a == MASKS[task]).sum() == k and k >= 1
        assert s["positions"][:sep].tolist() == list(range(sep))
        assert not s["block_positions"][:sep].any()
        assert (s["labels"][:sep] == IGNORE_INDEX).all()
        window, spans = reconstruct(
            s["input_ids"], s["labels"], s["positions"], s["block_positions"], sep
        )
        assert window == s["window"].tolist()
        assert len(window) + 2 * k + (s["input_ids"] == SP["<pad>"]).sum() == 96
        # Part B holds every span once, in the sampled order.
        pairs = zip(s["starts"], s["lengths"], strict=True)
        by_start = [s["window"][a : a + n].tolist() for a, n in pairs]
        assert spans == [by_start[i] for i in s["order"]]


def test_part_b_order_is_a_random_permutation():
    obj = objective(seq_len=128)
    orders = [s["order"] for s in samples(obj, 100)]
    assert all(sorted(o.tolist()) == list(range(len(o))) for o in orders)
    shuffled = [not np.array_equal(o, np.sort(o)) for o in orders if len(o) >= 3]
    assert 0.5 < np.mean(shuffled) < 1.0


def test_window_is_the_start_of_the_row():
    obj = objective(seq_len=64)
    batch = rows(4, 64)
    for i, s in enumerate(samples(obj, 4)):
        assert s["window"].tolist() == batch["tokens"][i, : len(s["window"])].tolist()


# ---- [MASK] statistics -----------------------------------------------------------------


def test_mask_ratio_and_poisson_span_lengths():
    obj = objective(seq_len=256)
    lengths, ratios = [], []
    for s in samples(obj, 300):
        window, starts, lens = s["window"], s["starts"], s["lengths"]
        ratios.append(lens.sum() / len(window))
        assert len(window) + 2 * len(starts) == 256  # no padding needed on normal text
        lengths += lens.tolist()
        ends = starts + lens
        assert (starts[1:] > ends[:-1]).all(), "spans overlap or touch"
        for a, b in zip(starts, ends, strict=True):
            assert TOK.eos_id not in window[a:b].tolist()
    assert min(ratios) >= 0.15
    assert np.mean(ratios) < 0.18  # stops as soon as 15% is reached
    probs = span_length_probs(3.0)
    expected_mean = float((np.arange(1, len(probs) + 1) * probs).sum())
    assert expected_mean == pytest.approx(3.0 / (1 - np.exp(-3.0)), rel=1e-6)
    assert abs(np.mean(lengths) - expected_mean) < 0.12
    freq = np.bincount(lengths, minlength=8)[1:6] / len(lengths)
    np.testing.assert_allclose(freq, probs[:5], atol=0.03)


def test_mask_spans_stay_inside_documents():
    obj = objective(seq_len=256)
    batch = rows(100, 256)
    for i, s in enumerate(samples(obj, 100)):
        doc = batch["doc_start"][i].numpy()
        for a, n in zip(s["starts"], s["lengths"], strict=True):
            assert not doc[a + 1 : a + n].any()


# ---- [sMASK] and [gMASK] ---------------------------------------------------------------


def test_sentence_spans_are_whole_sentences():
    obj = objective(seq_len=160, sentence_prob=1.0)
    batch = rows(60, 160)
    late = 0
    for i, s in enumerate(samples(obj, 60)):
        n = len(s["window"])
        boundary = batch["sent_start"][i].numpy() | batch["doc_start"][i].numpy()
        tokens = batch["tokens"][i].numpy()
        assert s["lengths"].sum() >= 0.15 * n
        for a, length in zip(s["starts"], s["lengths"], strict=True):
            end = a + length
            assert a == 0 or boundary[a], "span does not start a sentence"
            assert not boundary[a + 1 : end].any(), "span crosses a sentence boundary"
            assert end == n or boundary[end] or tokens[end] == TOK.eos_id, "span ends early"
        late += s["starts"][-1] > n // 2
    assert late > 15  # sentences are picked at random, not from the front


def test_gmask_is_one_span_at_the_end():
    obj = objective(seq_len=128, gmask_prob=1.0)
    shares = []
    for s in samples(obj, 200):
        n = len(s["window"])
        assert len(s["starts"]) == 1 and s["starts"][0] + s["lengths"][0] == n
        assert s["input_ids"][s["sep"] - 1] == MASKS["gmask"]
        shares.append(s["lengths"][0] / n)
    assert min(shares) >= 0.5 and max(shares) <= 1.0
    assert min(shares) < 0.55 and max(shares) > 0.95  # uniform over the whole range


def test_task_mixing_probabilities():
    obj = objective(seq_len=32, sentence_prob=0.2, gmask_prob=0.3)
    seen = {"mask": 0, "sentence": 0, "gmask": 0}
    n = 3000
    out = obj(rows(n, 32))
    for ids, sep in zip(out["input_ids"], out["sep"], strict=True):
        part_a = set(ids[:sep].tolist())
        (task,) = [t for t, m in MASKS.items() if m in part_a]
        seen[task] += 1
    for task, p in (("mask", 0.5), ("sentence", 0.2), ("gmask", 0.3)):
        assert abs(seen[task] / n - p) < 0.03, seen


# ---- batch contract, determinism, errors -----------------------------------------------


def test_batch_output_contract():
    obj = build_objective("glm_blank", cfg=DataConfig(), tokenizer=TOK, seq_len=64, seed=1)
    assert isinstance(obj, BlankInfilling)
    out = obj(rows(3, 64))
    assert set(out) == {"input_ids", "position_ids", "sep", "labels"}
    assert out["input_ids"].shape == out["labels"].shape == (3, 64)
    assert out["position_ids"].shape == (3, 2, 64) and out["sep"].shape == (3,)
    assert all(v.dtype == torch.int64 for v in out.values())
    b_len = (out["labels"] != IGNORE_INDEX).sum(1)
    assert (out["sep"] + b_len <= 64).all() and (b_len > 0).all()


def test_loader_batch_without_boundaries_is_accepted():
    """Evaluation batches carry only tokens and sample ids."""
    batch = rows(2, 64)
    out = objective(seq_len=64)({"tokens": batch["tokens"], "sample_ids": batch["sample_ids"]})
    assert out["input_ids"].shape == (2, 64)


def test_deterministic_per_seed_and_sample_id():
    obj = objective(seq_len=64, sentence_prob=0.3, gmask_prob=0.3)
    whole = obj(rows(6, 64))
    tail = obj(rows(3, 64, first=3))  # same sample ids 3..5 in another batch
    for key in whole:
        torch.testing.assert_close(whole[key][3:], tail[key], rtol=0, atol=0)
    again = pickle.loads(pickle.dumps(obj))(rows(6, 64))
    for key in whole:
        assert torch.equal(whole[key], again[key])
    other_seed = objective(seq_len=64, seed=1, sentence_prob=0.3, gmask_prob=0.3)(rows(6, 64))
    assert not torch.equal(whole["input_ids"], other_seed["input_ids"])
    shifted = rows(6, 64)
    shifted["sample_ids"] = shifted["sample_ids"] + 100
    assert not torch.equal(whole["input_ids"], obj(shifted)["input_ids"])


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("mask_ratio", 0.0),
        ("poisson_lambda", -1.0),
        ("sentence_prob", 1.5),
        ("gmask_prob", 0.9),  # with sentence_prob 0.2 the shares exceed 1
        ("gmask_min_ratio", 0.0),
        ("gmask_max_ratio", 0.4),  # below gmask_min_ratio
    ],
)
def test_bad_config_names_the_field(field, value):
    glm = dataclasses.replace(GlmConfig(sentence_prob=0.2), **{field: value})
    with pytest.raises(ValueError, match=rf"data\.glm\.{field}"):
        BlankInfilling("glm_blank", cfg=DataConfig(glm=glm), tokenizer=TOK, seq_len=64, seed=0)


def test_bad_inputs_raise_clear_errors():
    obj = objective(seq_len=64, sentence_prob=0.5)
    batch = rows(2, 64)
    del batch["sent_start"]
    with pytest.raises(ValueError, match="sent_start"):
        obj(batch)
    with pytest.raises(ValueError, match="at least seq_len - 2"):
        objective(seq_len=64).build_one(np.zeros(10, np.int64), sample_id=0)
    fake = SimpleNamespace(kind="fake", special_tokens={"<pad>": 0, "<eos>": 1})
    with pytest.raises(ValueError, match=r"\[MASK\]"):
        BlankInfilling("glm_blank", cfg=DataConfig(), tokenizer=fake, seq_len=64, seed=0)


def test_document_attention_is_refused_by_name():
    from data_pipeline.config import DataConfig
    from data_pipeline.tokenizers import ByteTokenizer

    with pytest.raises(ValueError, match="data.document_attention"):
        BlankInfilling(
            "glm_blank",
            cfg=DataConfig(document_attention=True),
            tokenizer=ByteTokenizer(),
            seq_len=64,
            seed=0,
        )
