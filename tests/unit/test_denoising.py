"""BART's denoising objective: hand-checked noising functions, their statistics, the source
length bound, determinism, config errors and the objective end to end."""

from __future__ import annotations

import dataclasses
import itertools
import math
import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from data_pipeline.config import DataConfig, DenoisingConfig
from data_pipeline.objectives import (
    build_objective,
    random_token_ids,
    row_length,
    sample_rng,
    target_length,
)
from data_pipeline.objectives.denoising import (
    INSERTED,
    KEPT,
    MASKED,
    SALT,
    SPAN,
    Denoising,
    drop_insertions,
    infill,
    permute_pieces,
    piece_order,
    poisson_spans,
    sentence_pieces,
)
from data_pipeline.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
MASK, EOS, PAD = TOK.special_tokens["[MASK]"], TOK.eos_id, TOK.pad_id
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]


def only(**options) -> dict:
    """data.denoising options with the default functions (infilling, permutation) off."""
    return {"infill_ratio": 0.0, "permute_sentences": 0.0, **options}


def ids(text: str) -> list[int]:
    return TOK.encode(text)


def corpus(n_tokens: int = 40_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A packed stream of documents of sentences, each document ending with <eos>, and its
    doc_start / sent_start flags (as the loader marks them)."""
    rng = np.random.default_rng(seed)
    tokens, doc, sent = [], [], []
    while len(tokens) < n_tokens:
        for j in range(rng.integers(1, 6)):
            sentence = ids(" ".join(rng.choice(WORDS, rng.integers(2, 7))) + ". ")
            tokens += sentence
            doc += [j == 0] + [False] * (len(sentence) - 1)
            sent += [True] + [False] * (len(sentence) - 1)
        tokens.append(EOS)
        doc.append(False)
        sent.append(False)
    return np.array(tokens, dtype=np.int64), np.array(doc), np.array(sent)


TOKENS, DOC, SENT = corpus()


def rows(b: int, seq_len: int, *, first: int = 0, sentences: bool = True) -> dict:
    """A loader micro-batch of b packed rows of seq_len + 1 tokens, sample ids first..."""
    s = seq_len + 1
    starts = [(first + i) * 53 % (len(TOKENS) - s) for i in range(b)]
    take = lambda a: torch.from_numpy(np.stack([a[o : o + s] for o in starts]))  # noqa: E731
    batch = {
        "tokens": take(TOKENS),
        "sample_ids": torch.arange(first, first + b),
        "doc_start": take(DOC),
    }
    if sentences:
        batch["sent_start"] = take(SENT)
    return batch


def objective(seq_len: int = 64, *, seed: int = 0, **options) -> Denoising:
    cfg = DataConfig(denoising=dataclasses.replace(DenoisingConfig(), **options))
    return Denoising("denoising", cfg=cfg, tokenizer=TOK, seq_len=seq_len, seed=seed)


def noised(obj: Denoising, n: int, *, first: int = 0):
    """(window [W], Noised) of n samples."""
    batch = rows(n, obj.seq_len, first=first)
    w = obj.seq_len
    out = []
    for i in range(n):
        window = batch["tokens"][i, :w].numpy()
        doc, sent = batch["doc_start"][i, :w].numpy(), batch["sent_start"][i, :w].numpy()
        out.append((window, obj.noise(window, doc, sent | doc, sample_id=first + i)))
    return out


# ---- hand-checked pieces ------------------------------------------------------------------


EXAMPLE = np.array(ids("abc.de.fg") + [EOS] + ids("hi"))
EXAMPLE_SENT = np.isin(np.arange(12), [0, 4, 7, 10])
EXAMPLE_DOC = np.isin(np.arange(12), [10])


def test_sentence_pieces_of_the_docstring_example():
    starts, doc, fixed = sentence_pieces(EXAMPLE, EXAMPLE_DOC, EXAMPLE_SENT, eos_id=EOS)
    assert starts.tolist() == [0, 4, 7, 9, 10]  # "abc." "de." "fg" <eos> "hi"
    assert doc.tolist() == [0, 0, 0, 0, 1]
    assert fixed.tolist() == [False, False, False, True, False]
    # Without doc_start, the token after an <eos> still begins a document; without
    # sent_start, documents are the only pieces besides the <eos>.
    none = np.zeros(12, dtype=bool)
    starts, doc, fixed = sentence_pieces(EXAMPLE, none, none, eos_id=EOS)
    assert starts.tolist() == [0, 9, 10] and doc.tolist() == [0, 0, 1]


def test_permute_pieces_hand_checked():
    starts = np.array([0, 4, 7, 9, 10])
    out = permute_pieces(EXAMPLE, starts, np.array([1, 0, 2, 3, 4]))
    assert TOK.decode(out) == "de.abc.fg<eos>hi"
    out = permute_pieces(EXAMPLE, starts, np.array([2, 1, 0, 3, 4]))
    assert TOK.decode(out) == "fgde.abc.<eos>hi"


def test_infill_of_the_docstring_example():
    permuted = np.array(ids("de.abc.fg") + [EOS] + ids("hi"))
    source, kind, origin = infill(permuted, np.array([2, 2, 0]), np.array([1, 4, 8]), mask_id=MASK)
    assert TOK.decode(source) == "d[MASK]ab[MASK]fg<eos>[MASK]hi"
    assert kind.tolist() == [KEPT, SPAN, KEPT, KEPT, SPAN, KEPT, KEPT, KEPT, INSERTED, KEPT, KEPT]
    assert origin.tolist() == [0, 1, 3, 4, 5, 7, 8, 9, -1, 10, 11]


def test_infill_at_the_ends_and_adjacent_spans():
    window = np.array(ids("abcdef"))
    # 7 items: a zero-length span first, two spans side by side ("b", "cd"), a zero-length
    # span last.
    lengths, slots = np.array([0, 1, 2, 0]), np.array([0, 2, 3, 6])
    source, kind, origin = infill(window, lengths, slots, mask_id=MASK)
    assert TOK.decode(source) == "[MASK]a[MASK][MASK]ef[MASK]"
    assert kind.tolist() == [INSERTED, KEPT, SPAN, SPAN, KEPT, KEPT, INSERTED]
    assert origin.tolist() == [-1, 0, 1, 2, 4, 5, -1]


def test_drop_insertions_drops_the_last_ones():
    source = np.array(ids("a") + [MASK] + ids("b") + [MASK, MASK] + ids("c"))
    kind = np.array([KEPT, INSERTED, KEPT, SPAN, INSERTED, KEPT], dtype=np.int8)
    origin = np.array([0, -1, 1, 2, -1, 4])
    out, out_kind, out_origin = drop_insertions(source, kind, origin, max_len=5)
    assert TOK.decode(out) == "a[MASK]b[MASK]c" and out_origin.tolist() == [0, -1, 1, 2, 4]
    assert out_kind.tolist() == [KEPT, INSERTED, KEPT, SPAN, KEPT]
    assert drop_insertions(source, kind, origin, max_len=6)[0] is source


def test_random_ids_are_the_non_special_ones():
    assert random_token_ids(TOK).tolist() == list(range(256))


# ---- one function at a time through the objective ---------------------------------------


def test_permutation_only_shuffles_sentences_within_documents():
    obj = objective(96, **only(permute_sentences=1.0))
    changed = 0
    for i, (window, out) in enumerate(noised(obj, 200)):
        assert np.array_equal(out.source, out.window) and (out.kind == KEPT).all()
        batch = rows(1, 96, first=i)
        doc, sent = batch["doc_start"][0, :96].numpy(), batch["sent_start"][0, :96].numpy()
        starts, doc_P, fixed = sentence_pieces(window, doc, sent, eos_id=EOS)
        # Every <eos> where it was, and each document holds the same sentences.
        assert np.array_equal(window == EOS, out.source == EOS)
        bounds = np.flatnonzero(np.diff(np.append(doc_P, -1))) + 1
        ends = np.append(starts, 96)
        for lo, hi in zip(np.append(0, bounds[:-1]), bounds, strict=True):
            region = slice(ends[lo], ends[hi])
            pieces = Counter(tuple(window[ends[p] : ends[p + 1]]) for p in range(lo, hi))
            rebuilt = _split_into(out.source[region], pieces)
            assert rebuilt == pieces
        changed += not np.array_equal(window, out.source)
        # The objective draws the documented stream: the coins, then the piece order.
        rng = sample_rng(0, i, salt=SALT)
        rng.random(2)
        expected = permute_pieces(window, starts, piece_order(rng, doc_P, fixed))
        assert np.array_equal(expected, out.window)
    assert changed > 150  # rows with a single sentence stay as they are


def _split_into(region: np.ndarray, pieces: Counter) -> Counter | None:
    """The multiset of `pieces` whose concatenation in some order is `region` (a search)."""
    if not len(region):
        return Counter() if not +pieces else None
    for piece in list(+pieces):
        if tuple(region[: len(piece)]) == piece:
            rest = _split_into(region[len(piece) :], pieces - Counter([piece]))
            if rest is not None:
                return rest + Counter([piece])
    return None


def test_piece_order_is_uniform_within_each_document():
    doc = np.array([0, 0, 0, 0, 1, 1])
    fixed = np.array([False, False, False, True, False, False])
    seen = Counter()
    for i in range(6000):
        order = piece_order(np.random.default_rng(i), doc, fixed)
        assert order[3] == 3 and sorted(order[:3]) == [0, 1, 2] and sorted(order[4:]) == [4, 5]
        seen[tuple(order[:3])] += 1
    assert set(seen) == set(itertools.permutations(range(3)))
    assert all(abs(c / 6000 - 1 / 6) < 0.02 for c in seen.values())


def test_masking_only_replaces_exactly_its_share_one_for_one():
    obj = objective(80, **only(mask_ratio=0.15))
    for window, out in noised(obj, 50):
        masked = out.kind == MASKED
        assert len(out.source) == 80 and masked.sum() == round(80 * 0.15) == 12
        assert (out.source[masked] == MASK).all()
        assert np.array_equal(out.source[~masked], window[~masked])
        assert np.array_equal(out.origin, np.arange(80))


def test_deletion_only_removes_exactly_its_share_and_keeps_order():
    obj = objective(80, **only(delete_ratio=0.25))
    for window, out in noised(obj, 50):
        assert len(out.source) == 80 - 20 and (out.kind == KEPT).all()
        assert (np.diff(out.origin) > 0).all()
        assert np.array_equal(out.source, window[out.origin])


def test_masking_and_deletion_take_disjoint_tokens_left_by_infilling():
    obj = objective(100, infill_ratio=0.2, mask_ratio=0.1, delete_ratio=0.1, permute_sentences=0)
    for window, out in noised(obj, 50):
        kept = out.kind == KEPT
        assert kept.sum() == 100 - 20 - 10 - 10 and (out.kind == MASKED).sum() == 10
        token_origin = out.origin[np.isin(out.kind, [KEPT, MASKED])]
        assert (np.diff(token_origin) > 0).all()
        assert np.array_equal(out.source[kept], window[out.origin[kept]])


def test_rotation_only_is_a_rotation_at_every_offset():
    obj = objective(32, **only(rotate=1.0))
    offsets = Counter()
    for window, out in noised(obj, 2000):
        offset = int(out.origin[0])
        assert 1 <= offset < 32
        assert np.array_equal(out.source, np.roll(window, -offset))
        offsets[offset] += 1
    assert set(offsets) == set(range(1, 32))
    assert max(offsets.values()) < 2 * 2000 / 31


def test_rotation_moves_the_noised_source_as_a_whole():
    obj = objective(64, infill_ratio=0.3, rotate=1.0, permute_sentences=0)
    for _, out in noised(obj, 100):
        kept = np.flatnonzero(out.kind == KEPT)
        # The kept tokens run in order once, from where the rotation started.
        steps = np.diff(out.origin[kept])
        assert (steps < 0).sum() <= 1


# ---- statistics -------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [1.5, 3.0, 6.0])
def test_poisson_span_lengths(lam):
    lengths = [poisson_spans(sample_rng(1, i, salt=SALT), 300, lam) for i in range(1500)]
    assert all(int(x.sum()) == 300 for x in lengths)
    assert all(x[-1] >= 1 or len(x) == 1 for x in lengths)
    # All but the last (shortened) draw of each sample are Poisson(lam) draws.
    draws = np.concatenate([x[:-1] for x in lengths])
    assert draws.mean() == pytest.approx(lam, rel=0.03)
    assert (draws == 0).mean() == pytest.approx(math.exp(-lam), rel=0.12, abs=0.002)
    assert poisson_spans(sample_rng(1, 0), 0, lam).tolist() == []


def test_infilling_removes_exactly_its_share_uniformly():
    w = 100
    obj = objective(w, infill_ratio=0.3, permute_sentences=0)
    covered = np.zeros(w)
    n_samples = 3000
    for window, out in noised(obj, n_samples):
        kept = out.kind == KEPT
        assert kept.sum() == w - 30 and len(out.source) <= w
        assert np.array_equal(out.source[kept], window[out.origin[kept]])
        assert (out.source[~kept] == MASK).all()
        infilled = np.ones(w, dtype=bool)
        infilled[out.origin[kept]] = False
        covered += infilled
        # At most one span per infilled token (and zero-length ones insert, not replace).
        assert (out.kind == SPAN).sum() <= 30
    share = covered / n_samples
    assert np.abs(share[10:90] - 0.3).max() < 0.05


def test_random_ratio_share_of_emitted_masks():
    obj = objective(100, infill_ratio=0.3, mask_ratio=0.1, random_ratio=0.2, permute_sentences=0)
    emitted, replaced = 0, 0
    for window, out in noised(obj, 1500):
        noise = out.kind != KEPT
        emitted += int(noise.sum())
        replaced += int((out.source[noise] != MASK).sum())
        assert (out.source[noise & (out.source != MASK)] < 256).all()  # non-special ids
        kept = out.kind == KEPT
        assert np.array_equal(out.source[kept], window[out.origin[kept]])
    assert replaced / emitted == pytest.approx(0.2, abs=0.01)


def test_insertions_past_the_window_are_dropped():
    # lambda 0.5: 61% of the spans have length 0, so insertions overflow the window, and the
    # insertions left fill exactly the room that spans of >= 2 tokens freed.
    obj = objective(64, infill_ratio=0.3, poisson_lambda=0.5, permute_sentences=0)
    n = round(64 * 0.3)
    inserted = 0
    for _, out in noised(obj, 30):
        assert len(out.source) == 64 and (out.kind == KEPT).sum() == 64 - n
        assert (out.kind == INSERTED).sum() == n - (out.kind == SPAN).sum()
        inserted += int((out.kind == INSERTED).sum())
    assert inserted > 0


# ---- the objective -----------------------------------------------------------------------


def test_end_to_end_through_build_objective():
    cfg = DataConfig(objective="denoising", seq_len=128)
    cfg.validate()
    obj = build_objective("denoising", cfg=cfg, tokenizer=TOK, seq_len=128, seed=3)
    assert isinstance(obj, Denoising)
    assert target_length("denoising", cfg=cfg, seq_len=128) == 128
    assert row_length("denoising", cfg=cfg, seq_len=128) == 129
    batch = rows(16, 128)
    out = obj(batch)
    assert set(out) == {"input_ids", "attention_mask", "decoder_input_ids", "labels"}
    for key in out:
        assert out[key].shape == (16, 128), key
    assert out["attention_mask"].dtype == torch.bool and out["input_ids"].dtype == torch.int64
    window = batch["tokens"][:, :128]
    assert torch.equal(out["labels"], window)
    assert (out["decoder_input_ids"][:, 0] == EOS).all()
    assert torch.equal(out["decoder_input_ids"][:, 1:], window[:, :-1])
    lengths = out["attention_mask"].sum(1)
    for i in range(16):
        m = int(lengths[i])
        assert out["attention_mask"][i, :m].all() and (out["input_ids"][i, m:] == PAD).all()
        assert not (out["input_ids"][i, :m] == PAD).any()
        # BART-large's mix: round(128 * 0.3) = 38 tokens infilled, one [MASK] per span.
        spans = int((out["input_ids"][i, :m] == MASK).sum())
        assert spans >= 1 and m == 128 - 38 + spans


def test_batches_without_sentence_starts_permute_documents_pieces():
    obj = objective(96, **only(permute_sentences=1.0))
    batch = rows(20, 96, sentences=False)
    out = obj(batch)
    # Documents are the only pieces, and each <eos> stays: nothing can move.
    assert torch.equal(out["input_ids"], batch["tokens"][:, :96])


def test_deterministic_per_seed_and_sample_id():
    obj = objective(64, seed=7, mask_ratio=0.1, rotate=0.5, random_ratio=0.1)
    batch = rows(8, 64, first=100)
    full = obj(batch)
    order = torch.tensor([5, 2, 7])
    part = obj({key: value[order] for key, value in batch.items()})
    for key in full:
        assert torch.equal(full[key][order], part[key]), key
    again = objective(64, seed=7, mask_ratio=0.1, rotate=0.5, random_ratio=0.1)(batch)
    assert all(torch.equal(full[key], again[key]) for key in full)
    # The same row under other sample ids or another seed is noised differently.
    same_rows = {**batch, "sample_ids": batch["sample_ids"] + 1000}
    assert not torch.equal(obj(same_rows)["input_ids"], full["input_ids"])
    other_seed = objective(64, seed=8, mask_ratio=0.1, rotate=0.5, random_ratio=0.1)(batch)
    assert not torch.equal(other_seed["input_ids"], full["input_ids"])
    clone = pickle.loads(pickle.dumps(obj))
    assert torch.equal(clone(batch)["input_ids"], full["input_ids"])


def test_rows_shorter_than_the_window_are_refused():
    with pytest.raises(ValueError, match="seq_len = 64"):
        objective(64)(
            {"tokens": torch.zeros(2, 40, dtype=torch.int64), "sample_ids": torch.ones(2)}
        )


# ---- config ---------------------------------------------------------------------------


BAD = [
    ({"infill_ratio": 1.0}, r"data\.denoising\.infill_ratio=1\.0 must be in \[0, 1\)"),
    ({"infill_ratio": -0.1}, r"data\.denoising\.infill_ratio=-0\.1 must be in"),
    ({"infill_ratio": "x"}, r"data\.denoising\.infill_ratio='x' must be a number"),
    ({"mask_ratio": 1.0}, r"data\.denoising\.mask_ratio=1\.0 must be in"),
    ({"delete_ratio": -0.2}, r"data\.denoising\.delete_ratio=-0\.2 must be in"),
    ({"random_ratio": 1.0}, r"data\.denoising\.random_ratio=1\.0 must be in"),
    (
        {"infill_ratio": 0.5, "mask_ratio": 0.3, "delete_ratio": 0.2},
        r"data\.denoising\.infill_ratio=0\.5 \+ mask_ratio=0\.3 \+ delete_ratio=0\.2 = 1\.0 must",
    ),
    ({"poisson_lambda": 0}, r"data\.denoising\.poisson_lambda=0 must be a finite number > 0"),
    ({"poisson_lambda": -1.0}, r"data\.denoising\.poisson_lambda=-1\.0 must be"),
    ({"poisson_lambda": math.inf}, r"data\.denoising\.poisson_lambda=inf must be"),
    ({"poisson_lambda": math.nan}, r"data\.denoising\.poisson_lambda=nan must be"),
    ({"permute_sentences": 1.5}, r"data\.denoising\.permute_sentences=1\.5 must be in \[0, 1\]"),
    ({"rotate": -0.1}, r"data\.denoising\.rotate=-0\.1 must be in \[0, 1\]"),
    (
        {"infill_ratio": 0, "permute_sentences": 0, "random_ratio": 0.5},
        r"data\.denoising turns every noising function off",
    ),
]


@pytest.mark.parametrize(("options", "message"), BAD, ids=[m for _, m in BAD])
def test_impossible_options_name_the_field(options, message):
    cfg = DataConfig(denoising=dataclasses.replace(DenoisingConfig(), **options))
    with pytest.raises(ConfigError, match=message) as info:
        cfg.validate()
    assert "\n" not in str(info.value)
    # The objective refuses a config nobody validated the same way.
    with pytest.raises(ConfigError, match=message):
        build_objective("denoising", cfg=cfg, tokenizer=TOK, seq_len=64, seed=0)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"infill_ratio": 0, "permute_sentences": 0, "rotate": 1.0},
        {"infill_ratio": 0, "permute_sentences": 0, "delete_ratio": 0.9},
        {"infill_ratio": 0.4, "mask_ratio": 0.3, "delete_ratio": 0.2, "random_ratio": 0.5},
    ],
)
def test_possible_options_pass(options):
    cfg = DataConfig(objective="denoising", denoising=DenoisingConfig(**options))
    cfg.validate()
    cfg.check_objective("denoising", seq_len=64)


def test_windows_too_short_for_the_ratios():
    cfg = DataConfig(denoising=DenoisingConfig(infill_ratio=0.5, mask_ratio=0.3))
    cfg.check_objective("denoising", seq_len=20)
    message = (
        r"data\.seq_len=3 is too short for data\.denoising: infilling, masking and deletion take "
        r"2 \+ 1 \+ 0 of its 3 tokens"
    )
    with pytest.raises(ConfigError, match=message):
        cfg.check_objective("denoising", seq_len=3)
    with pytest.raises(ConfigError, match=message):
        Denoising("denoising", cfg=cfg, tokenizer=TOK, seq_len=3, seed=0)
    with pytest.raises(ConfigError, match=r"data\.seq_len=1 is too short .*denoising"):
        DataConfig().check_objective("denoising", seq_len=1)
    assert DenoisingConfig().counts(2) == (1, 0, 0)
    assert DenoisingConfig().counts(512) == (154, 0, 0)


def test_document_attention_is_refused():
    cfg = DataConfig(document_attention=True)
    with pytest.raises(ConfigError, match=r"data\.document_attention=true is not supported"):
        Denoising("denoising", cfg=cfg, tokenizer=TOK, seq_len=64, seed=0)


# ---- through the loader -------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    from data_pipeline.prepare import prepare_corpus

    rng = np.random.default_rng(4)
    docs = [
        " ".join(
            " ".join(rng.choice(WORDS, rng.integers(2, 6))).capitalize() + "."
            for _ in range(rng.integers(1, 5))
        )
        for _ in range(60)
    ]
    path = tmp_path_factory.mktemp("denoising") / "corpus"
    prepare_corpus(docs, path, tokenizer_spec="byte", seq_len=48, val_fraction=0.0)
    return path


def test_loader_batches(corpus_dir):
    """The loader's sentence starts drive the permutation; its rows go through unchanged."""
    from data_pipeline.loader import build_loader

    loader = build_loader(
        [(str(corpus_dir), 1.0)],
        global_batch_size=16,
        micro_batch_size=8,
        dp_rank=0,
        dp_size=1,
        seed=1,
    )
    permute = DataConfig(denoising=DenoisingConfig(**only(permute_sentences=1.0)))
    objectives = {
        "permute": build_objective("denoising", cfg=permute, tokenizer=TOK, seq_len=48, seed=1),
        "bart": build_objective("denoising", cfg=DataConfig(), tokenizer=TOK, seq_len=48, seed=1),
    }
    changed = 0
    for micro in loader.next_batch():
        window = micro["tokens"][:, :48]
        out = objectives["permute"](micro)
        assert out["attention_mask"].all() and torch.equal(out["labels"], window)
        assert torch.equal(out["input_ids"] == EOS, window == EOS)
        doc = micro["doc_start"][:, :48].numpy()
        for i in range(len(window)):
            docs = np.cumsum(doc[i] | np.append(False, window[i, :-1].numpy() == EOS))
            for d in np.unique(docs):
                region = docs == d
                assert sorted(out["input_ids"][i][region].tolist()) == sorted(
                    window[i][region].tolist()
                )
        changed += int((out["input_ids"] != window).any(1).sum())
        out = objectives["bart"](micro)
        assert torch.equal(out["labels"], window)
        assert (out["attention_mask"].sum(1) < 48).all()
    assert changed >= 4
