"""MASS's masked sequence-to-sequence objective: the fragment's placement and length, the
decoder layout of the paper's Figure 1, the 80/10/10 rule, determinism and config errors."""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch

from common.errors import ConfigError
from data_pipeline.config import DataConfig, MassConfig
from data_pipeline.objectives import (
    IGNORE_INDEX,
    build_objective,
    row_length,
    sample_rng,
    target_length,
)
from data_pipeline.objectives.mass import (
    SALT,
    MaskedSeq2Seq,
    fragment_length,
    fragment_targets,
    mask_fragment,
)
from data_pipeline.tokenizers import ByteTokenizer

TOK = ByteTokenizer()
MASK = TOK.special_tokens["[MASK]"]


def objective(seq_len: int = 64, *, seed: int = 0, **options) -> MaskedSeq2Seq:
    cfg = DataConfig(mass=dataclasses.replace(MassConfig(), **options))
    return MaskedSeq2Seq("mass", cfg=cfg, tokenizer=TOK, seq_len=seq_len, seed=seed)


def rows(b: int, seq_len: int, *, first: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """A loader-shaped micro-batch of b random byte rows of seq_len + 1 tokens."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (b, seq_len + 1), generator=gen)
    return {
        "tokens": tokens,
        "sample_ids": torch.arange(first, first + b),
        "doc_start": torch.zeros(b, seq_len + 1, dtype=torch.bool),
        "sent_start": torch.zeros(b, seq_len + 1, dtype=torch.bool),
    }


def fragment_of(out: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """(start [B], length [B]) of each sample's fragment, read off its labels."""
    scored = (out["labels"] != IGNORE_INDEX).numpy()
    return scored.argmax(1), scored.sum(1)


# ---- hand-checked layout -------------------------------------------------------------------


def test_figure_one_layout():
    window = np.array([TOK.encode("abcdefgh")])  # x1 .. x8
    decoder, labels = fragment_targets(window, np.array([2]), length=4, mask_id=MASK)
    m, x = MASK, window[0]
    assert decoder[0].tolist() == [m, m, m, x[2], x[3], x[4], m, m]
    assert labels[0].tolist() == [-100, -100, x[2], x[3], x[4], x[5], -100, -100]
    inputs = mask_fragment(window, np.array([2]), np.full((1, 4), MASK))
    assert TOK.decode(inputs[0]) == "ab[MASK][MASK][MASK][MASK]gh"


def test_fragments_at_both_ends_and_of_one_token():
    window = np.array([TOK.encode("abcdef"), TOK.encode("uvwxyz")])
    decoder, labels = fragment_targets(window, np.array([0, 3]), length=3, mask_id=MASK)
    m, x, y = MASK, window[0], window[1]
    assert decoder.tolist() == [[m, x[0], x[1], m, m, m], [m, m, m, m, y[3], y[4]]]
    assert labels.tolist() == [
        [x[0], x[1], x[2], -100, -100, -100],
        [-100, -100, -100, y[3], y[4], y[5]],
    ]
    decoder, labels = fragment_targets(window[:1], np.array([5]), length=1, mask_id=MASK)
    assert decoder.tolist() == [[m] * 6] and labels[0, 5] == x[5] and (labels[0, :5] == -100).all()


def test_fragment_length():
    assert fragment_length(512, 0.5) == 256
    assert fragment_length(10, 0.25) == 2  # round half to even: 2.5 -> 2
    assert fragment_length(3, 0.1) == 1  # at least one token
    assert fragment_length(4, 0.9) == 4


# ---- through the objective -----------------------------------------------------------------


def test_end_to_end_through_build_objective():
    cfg = DataConfig(objective="mass", seq_len=32)
    cfg.validate()
    obj = build_objective("mass", cfg=cfg, tokenizer=TOK, seq_len=32, seed=0)
    assert isinstance(obj, MaskedSeq2Seq)
    assert target_length("mass", cfg=cfg, seq_len=32) == 32
    assert row_length("mass", cfg=cfg, seq_len=32) == 33
    batch = rows(50, 32)
    out = obj(batch)
    assert set(out) == {"input_ids", "attention_mask", "decoder_input_ids", "labels"}
    for key in out:
        assert out[key].shape == (50, 32), key
    assert out["attention_mask"].dtype == torch.bool and out["attention_mask"].all()
    window = batch["tokens"][:, :32]
    start, length = fragment_of(out)
    assert (length == 16).all()
    for i in range(50):
        u = int(start[i])
        frag = slice(u, u + 16)
        assert torch.equal(out["labels"][i, frag], window[i, frag])
        assert torch.equal(out["decoder_input_ids"][i, u + 1 : u + 16], window[i, u : u + 15])
        outside = torch.ones(32, dtype=torch.bool)
        outside[u + 1 : u + 16] = False
        assert (out["decoder_input_ids"][i, outside] == MASK).all()
        # The encoder sees the window outside the fragment as it is.
        kept = torch.ones(32, dtype=torch.bool)
        kept[frag] = False
        assert torch.equal(out["input_ids"][i, kept], window[i, kept])


def test_fragment_start_is_uniform_and_length_exact():
    obj = objective(20, fragment_ratio=0.3)  # k = 6, starts 0..14
    out = obj(rows(3000, 20))
    start, length = fragment_of(out)
    assert (length == 6).all()
    counts = np.bincount(start, minlength=15)
    assert len(counts) == 15 and counts.min() > 0
    expected = 3000 / 15
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 40  # 14 degrees of freedom: p < 0.001 above 36.1


def test_replacement_shares_are_80_10_10():
    obj = objective(64)
    batch = rows(1000, 64)
    out = obj(batch)
    labels, inputs = out["labels"], out["input_ids"]
    frag = labels != IGNORE_INDEX
    n = int(frag.sum())
    assert n == 1000 * 32
    masked = (inputs == MASK) & frag
    same = (inputs == labels) & frag
    random = frag & ~masked & ~same
    assert masked.sum() / n == pytest.approx(0.8, abs=0.01)
    # A random draw hits the original byte 1 time in 256: "unchanged" gains that share.
    assert same.sum() / n == pytest.approx(0.1 + 0.1 / 256, abs=0.006)
    assert random.sum() / n == pytest.approx(0.1 * 255 / 256, abs=0.006)
    assert (inputs[random] < 256).all()  # non-special ids only


@pytest.mark.parametrize(("mask", "rand"), [(1.0, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_extreme_replacement_shares(mask, rand):
    obj = objective(16, replace_with_mask=mask, replace_with_random=rand)
    out = obj(rows(50, 16))
    frag = out["labels"] != IGNORE_INDEX
    if mask == 1.0:
        assert (out["input_ids"][frag] == MASK).all()
    elif rand == 1.0:
        assert (out["input_ids"][frag] < 256).all()
    else:
        assert torch.equal(out["input_ids"], rows(50, 16)["tokens"][:, :16])


def test_draws_follow_the_documented_stream():
    obj = objective(40, seed=5)
    window = np.arange(40, dtype=np.int64)
    start, tokens = obj.draw(window, sample_id=11)
    rng = sample_rng(5, 11, salt=SALT)
    assert start == int(rng.integers(40 - 20 + 1)) and len(tokens) == 20


def test_deterministic_per_seed_and_sample_id():
    obj = objective(48, seed=7)
    batch = rows(8, 48, first=100)
    full = obj(batch)
    order = torch.tensor([6, 0, 3])
    part = obj({key: value[order] for key, value in batch.items()})
    for key in full:
        assert torch.equal(full[key][order], part[key]), key
    shifted = obj({**batch, "sample_ids": batch["sample_ids"] + 1})
    assert not torch.equal(shifted["labels"], full["labels"])
    other_seed = objective(48, seed=8)(batch)
    assert not torch.equal(other_seed["labels"], full["labels"])
    clone = pickle.loads(pickle.dumps(obj))
    assert all(torch.equal(clone(batch)[key], full[key]) for key in full)


def test_rows_shorter_than_the_window_are_refused():
    batch = {"tokens": torch.zeros(2, 10, dtype=torch.int64), "sample_ids": torch.arange(2)}
    with pytest.raises(ValueError, match="seq_len = 16"):
        objective(16)(batch)


# ---- config -------------------------------------------------------------------------------


BAD = [
    ({"fragment_ratio": 0.0}, r"data\.mass\.fragment_ratio=0\.0 must be in \(0, 1\)"),
    ({"fragment_ratio": 1.0}, r"data\.mass\.fragment_ratio=1\.0 must be in \(0, 1\)"),
    ({"fragment_ratio": math.nan}, r"data\.mass\.fragment_ratio=nan must be in"),
    ({"fragment_ratio": "half"}, r"data\.mass\.fragment_ratio='half' must be a number"),
    ({"replace_with_mask": 1.2}, r"data\.mass\.replace_with_mask=1\.2 must be in \[0, 1\]"),
    ({"replace_with_random": -0.1}, r"data\.mass\.replace_with_random=-0\.1 must be in"),
    (
        {"replace_with_mask": 0.8, "replace_with_random": 0.3},
        r"data\.mass\.replace_with_mask=0\.8 \+ replace_with_random=0\.3 = 1\.1\d* exceeds 1",
    ),
]


@pytest.mark.parametrize(("options", "message"), BAD, ids=[m for _, m in BAD])
def test_impossible_options_name_the_field(options, message):
    cfg = DataConfig(mass=dataclasses.replace(MassConfig(), **options))
    with pytest.raises(ConfigError, match=message) as info:
        cfg.validate()
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match=message):
        build_objective("mass", cfg=cfg, tokenizer=TOK, seq_len=64, seed=0)


def test_possible_options_and_short_windows():
    DataConfig(
        objective="mass", mass=MassConfig(replace_with_mask=1.0, replace_with_random=0.0)
    ).validate()
    DataConfig(mass=MassConfig(replace_with_mask=0.7, replace_with_random=0.2 + 0.1)).validate()
    DataConfig().check_objective("mass", seq_len=2)
    with pytest.raises(ConfigError, match=r"data\.seq_len=1 is too short for data\.objective=mass"):
        DataConfig().check_objective("mass", seq_len=1)
    cfg = DataConfig(document_attention=True)
    with pytest.raises(ConfigError, match=r"data\.document_attention=true is not supported"):
        MaskedSeq2Seq("mass", cfg=cfg, tokenizer=TOK, seq_len=16, seed=0)
