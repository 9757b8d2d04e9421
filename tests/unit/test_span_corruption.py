"""T5 span corruption: exact lengths, structure, statistics and determinism."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from data_pipeline.config import DataConfig, SpanCorruptionConfig
from data_pipeline.objectives import build_objective, sample_rng
from data_pipeline.objectives.span_corruption import (
    SpanCorruption,
    corrupt_spans,
    noise_mask,
    span_counts,
    t5_lengths,
)
from data_pipeline.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
EOS, PAD = TOK.eos_id, TOK.pad_id
SENTINELS = np.array([TOK.special_tokens[f"<extra_id_{i}>"] for i in range(100)])


def objective(seq_len: int, *, seed: int = 0, **options) -> SpanCorruption:
    cfg = DataConfig(span_corruption=SpanCorruptionConfig(**options))
    return SpanCorruption("span_corruption", cfg=cfg, tokenizer=TOK, seq_len=seq_len, seed=seed)


def rows(b: int, row_len: int, *, seed: int = 0, first_id: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "tokens": torch.randint(0, 256, (b, row_len), generator=gen),
        "sample_ids": torch.arange(first_id, first_id + b),
    }


def reconstruct(inputs: list[int], targets: list[int]) -> list[int]:
    """The original window, put back together from one sample's inputs and targets."""
    sentinel_ids = set(SENTINELS.tolist())
    spans: dict[int, list[int]] = {}
    current = None
    for tok in targets[:-1]:
        if tok in sentinel_ids:
            current = tok
            spans[current] = []
        else:
            spans[current].append(tok)
    out: list[int] = []
    for tok in inputs:
        if tok == EOS:
            break
        out.extend(spans[tok] if tok in sentinel_ids else [tok])
    return out


def run_lengths(mask: np.ndarray) -> np.ndarray:
    """Lengths of the runs of True in a 1-d mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return edges[1::2] - edges[::2]


# ---- lengths ---------------------------------------------------------------------------


def test_t5_lengths_match_t5_published_figures():
    # T5's random_spans_helper for inputs_length=512, noise 0.15, mean span 3.
    assert t5_lengths(512, 0.15, 3.0) == (568, 114)


@pytest.mark.parametrize(("density", "mean_span"), [(0.15, 3.0), (0.3, 8.0), (0.5, 2.0)])
def test_t5_lengths_give_exactly_seq_len_inputs(density, mean_span):
    for seq_len in range(3, 1100, 7):
        raw, target = t5_lengths(seq_len, density, mean_span)
        noise, spans = span_counts(raw, density, mean_span)
        assert raw - noise + spans + 1 == seq_len, (seq_len, raw)
        assert target == noise + spans + 1
        # the next longer window would not fit
        noise, spans = span_counts(raw + 1, density, mean_span)
        assert raw + 1 - noise + spans + 1 > seq_len


def test_lengths_exact_over_many_samples_with_long_rows():
    obj = objective(128)
    raw, target = t5_lengths(128)
    assert (obj.sample_len, raw, target) == (141, 141, 29)
    assert obj.lengths(raw + 5) == (141, 128, 29)
    assert obj.lengths(129) == (129, 117, 26)  # the loader's rows of seq_len + 1
    assert obj.target_len == 26
    for start in range(0, 600, 100):
        out = obj(rows(100, raw + 5, seed=start, first_id=start))
        assert out["input_ids"].shape == (100, 128)
        assert out["attention_mask"].all()
        assert (out["input_ids"][:, -1] == EOS).all()
        assert out["labels"].shape == out["decoder_input_ids"].shape == (100, target)
        assert (out["labels"] != -100).all() and (out["labels"][:, -1] == EOS).all()


def test_loader_rows_of_seq_len_plus_one_are_padded():
    obj = objective(512)
    raw, input_len, target = obj.lengths(513)
    assert (raw, input_len, target) == (513, 463, 104)
    out = obj(rows(4, 513))
    assert out["input_ids"].shape == (4, 512) and out["labels"].shape == (4, 104)
    assert out["attention_mask"][:, :463].all() and not out["attention_mask"][:, 463:].any()
    assert (out["input_ids"][:, 462] == EOS).all() and (out["input_ids"][:, 463:] == PAD).all()


# ---- structure -------------------------------------------------------------------------


def test_hand_checked_example():
    a, b, c, d, e, f, g, h = (ord(ch) for ch in "abcdefgh")
    window = np.array([[a, b, c, d, e, f, g, h]])
    noise = np.array([[0, 0, 1, 1, 0, 0, 1, 1]], dtype=bool)
    inputs, targets = corrupt_spans(window, noise, sentinels=SENTINELS, eos_id=EOS)
    x0, x1 = SENTINELS[0], SENTINELS[1]
    assert inputs.tolist() == [[a, b, x0, e, f, x1, EOS]]
    assert targets.tolist() == [[x0, c, d, x1, g, h, EOS]]
    assert TOK.decode(inputs[0]) == "ab<extra_id_0>ef<extra_id_1><eos>"


def test_noise_mask_starts_kept_and_ends_in_noise():
    rng = np.random.default_rng(0)
    mask = noise_mask(rng, 50, num_noise=12, num_spans=4)
    assert mask.shape == (50,) and mask.sum() == 12
    assert not mask[0] and mask[-1]
    starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
    assert len(starts) == 4


def test_inputs_and_targets_reconstruct_the_window():
    obj = objective(64)
    batch = rows(64, obj.sample_len)
    out = obj(batch)
    for i in range(64):
        inputs, targets = out["input_ids"][i].tolist(), out["labels"][i].tolist()
        window = batch["tokens"][i, : obj.sample_len].tolist()
        assert reconstruct(inputs, targets) == window
        in_sentinels = [t for t in inputs if t in SENTINELS]
        tgt_sentinels = [t for t in targets if t in SENTINELS]
        expected = SENTINELS[: len(in_sentinels)].tolist()
        assert in_sentinels == tgt_sentinels == expected  # <extra_id_0>, <extra_id_1>, ...
        assert targets[0] == SENTINELS[0]


def test_decoder_inputs_are_targets_shifted_right():
    out = objective(64)(rows(8, 80))
    assert (out["decoder_input_ids"][:, 0] == PAD).all()
    assert torch.equal(out["decoder_input_ids"][:, 1:], out["labels"][:, :-1])


# ---- statistics ------------------------------------------------------------------------


@pytest.mark.parametrize(("density", "mean_span"), [(0.15, 3.0), (0.3, 5.0)])
def test_noise_density_and_span_length_statistics(density, mean_span):
    raw = 400
    noise, spans = span_counts(raw, density, mean_span)
    masks = np.stack(
        [noise_mask(sample_rng(0, i), raw, num_noise=noise, num_spans=spans) for i in range(3000)]
    )
    assert masks.mean() == pytest.approx(density, abs=0.005)
    span_lengths = np.concatenate([run_lengths(m) for m in masks])
    assert len(span_lengths) == 3000 * spans
    assert span_lengths.mean() == pytest.approx(mean_span, rel=0.05)
    # Random segmentation: lengths vary (roughly geometric), not fixed at the mean.
    assert span_lengths.std() > 0.5 * (mean_span - 1)
    assert (span_lengths == 1).mean() > 0.15
    # Away from the forced kept start and noisy end, every position is equally likely noise.
    interior = masks[:, 50:350].mean(axis=0)
    assert np.abs(interior - density).max() < 0.06


# ---- determinism and plumbing ----------------------------------------------------------


def test_deterministic_per_seed_and_sample_id():
    obj = objective(48, seed=7)
    batch = rows(6, 60, seed=3, first_id=100)
    full = obj(batch)
    # The same rows in another order and another batch give the same samples.
    order = torch.tensor([4, 1, 5])
    part = obj({"tokens": batch["tokens"][order], "sample_ids": batch["sample_ids"][order]})
    for key in full:
        assert torch.equal(full[key][order], part[key]), key
    other_seed = objective(48, seed=8)(batch)
    assert not torch.equal(full["input_ids"], other_seed["input_ids"])
    clone = pickle.loads(pickle.dumps(obj))
    assert torch.equal(clone(batch)["labels"], full["labels"])


def test_registered_as_span_corruption():
    obj = build_objective("span_corruption", cfg=DataConfig(), tokenizer=TOK, seq_len=32, seed=0)
    assert isinstance(obj, SpanCorruption)


def test_too_many_spans_for_the_sentinels():
    with pytest.raises(ValueError, match="sentinels"):
        objective(4096)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"noise_density": 0.0}, "noise_density=0.0"),
        ({"noise_density": 1.2}, "noise_density=1.2"),
        ({"mean_span": 0.5}, "mean_span=0.5"),
        ({"noise_density": 0.9, "mean_span": 1.0}, "noise_density=0.9"),
    ],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(ValueError, match=f"data.span_corruption.{field}"):
        objective(64, **options)


def test_document_attention_is_refused_by_name():
    from data_pipeline.config import DataConfig
    from data_pipeline.tokenizers import ByteTokenizer

    with pytest.raises(ValueError, match="data.document_attention"):
        SpanCorruption(
            "span_corruption",
            cfg=DataConfig(document_attention=True),
            tokenizer=ByteTokenizer(),
            seq_len=64,
            seed=0,
        )
