"""Weighted blending: realised proportions, the O(1) index arithmetic, per-source epochs and
the compatibility checks between sources."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.blend import BlendedSamples, BlendSchedule, check_blendable
from data_pipeline.dataset import PackedDataset, sample_order
from data_pipeline.rows import RowArrays
from tests.unit.test_dataset import as_mask, edit_manifest, hand_made, prepare, write_corpus

WEIGHT_SETS = [
    ([0.7, 0.3], 1000),
    ([1.0, 2.0, 3.0], 1000),
    ([0.5, 0.25, 0.125, 0.0625, 0.0625], 64),
    ([3.3, 0.01, 1.7, 0.2], 333),
    ([1.0], 10),
]


def counts_per_block(schedule: BlendSchedule, blocks: int, *, block: int) -> np.ndarray:
    """[blocks, K]: how many samples each source serves in each window of `block` samples."""
    g = np.arange(blocks * block)
    source, _ = schedule.locate(g)
    one_hot = np.zeros((len(g), schedule.num_sources), dtype=np.int64)
    one_hot[np.arange(len(g)), source] = 1
    return one_hot.reshape(blocks, block, -1).sum(axis=1)


@pytest.mark.parametrize(("weights", "block_size"), WEIGHT_SETS)
def test_every_block_matches_the_weights_within_one_sample(weights, block_size):
    schedule = BlendSchedule(weights, block_size=block_size)
    share = np.asarray(weights) / sum(weights)
    B = schedule.block_size
    assert B % block_size == 0 and schedule.quota.min() >= 1  # grown only for tiny weights
    assert block_size == B or share.min() * block_size < 1
    counts = counts_per_block(schedule, 200, block=B)
    assert (np.abs(counts - share * B) < 1).all()
    assert (counts == counts[0]).all() and counts.sum(axis=1).tolist() == [B] * 200
    # Inside a block the sources are interleaved, not run one after the other.
    one_hot = np.eye(schedule.num_sources)[schedule.slot_source]
    prefix = one_hot.cumsum(axis=0) - share * np.arange(1, B + 1)[:, None]
    assert np.abs(prefix).max() < 2


def test_locate_walks_each_source_stream_in_order():
    schedule = BlendSchedule([0.6, 0.1, 0.3], block_size=97)
    g = np.arange(97 * 31 + 45)
    source, k = schedule.locate(g)
    for s in range(3):
        assert np.array_equal(k[source == s], np.arange((source == s).sum()))
    for at in (0, 1, 96, 97, 500, len(g)):
        assert np.array_equal(schedule.counts_before(at), np.bincount(source[:at], minlength=3))
    big = np.asarray([10**12 + 7])
    s_big, k_big = schedule.locate(big)
    assert k_big[0] == schedule.counts_before(int(big[0]))[s_big[0]]  # O(1) far ahead too
    with pytest.raises(ValueError, match="must be >= 0"):
        schedule.locate(np.asarray([-1]))


def test_tiny_weights_grow_the_block_and_bad_weights_are_refused():
    schedule = BlendSchedule([1.0, 0.0004], block_size=1000)
    assert schedule.block_size % 1000 == 0 and schedule.block_size >= 2500
    assert schedule.quota.min() >= 1
    with pytest.raises(ValueError, match="too small"):
        BlendSchedule([1.0, 1e-9])
    with pytest.raises(ValueError, match=r"blend weight 1 = -1\.0 must be a positive"):
        BlendSchedule([1.0, -1.0])
    with pytest.raises(ValueError, match="at least one source"):
        BlendSchedule([])
    with pytest.raises(ValueError, match="block_size=0"):
        BlendSchedule([1.0], block_size=0)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("blend")
    return [
        prepare(root / "a", docs=30, seed=11),
        prepare(root / "b", docs=80, seed=12),
        prepare(root / "c", docs=20, seed=13, seq_len=9),
    ]


def test_blended_samples_read_each_source_through_its_own_epochs(sources):
    a, b = PackedDataset(sources[0]), PackedDataset(sources[1])
    blend = BlendedSamples([a, b], [0.5, 0.5], seed=3, block_size=10)
    g = np.arange(4 * (len(a) + len(b)))
    out = blend.read(g)
    assert set(out) == {"tokens", "sample_ids", "doc_start", "sent_start"}
    assert torch.equal(out["sample_ids"], torch.from_numpy(g))
    source, k = blend.locate(g)
    for s, ds in enumerate((a, b)):
        n = len(ds)
        epochs = int(k[source == s].max()) // n + 1
        assert epochs >= 2  # each source wraps around at its own pace
        order = np.concatenate([sample_order(n, seed=3, epoch=e) for e in range(epochs)])
        rows = order[k[source == s]]
        want = ds.gather_batch(rows)
        sel = torch.from_numpy(source == s)
        for key in ("tokens", "doc_start", "sent_start"):
            assert torch.equal(out[key][sel], want[key])
        assert not np.array_equal(order[:n], order[n : 2 * n])  # a new epoch reshuffles
    counts = blend.schedule.counts_before(len(g))
    assert blend.epochs(len(g)) == [int(counts[0]) // len(a), int(counts[1]) // len(b)]


def test_fingerprint_covers_data_and_weights(sources):
    a, b = PackedDataset(sources[0]), PackedDataset(sources[1])
    base = BlendedSamples([a, b], [1, 1], seed=0).fingerprint
    assert BlendedSamples([a, b], [2, 2], seed=0).fingerprint == base  # same shares
    data, weights = base.split("-")
    other_weights = BlendedSamples([a, b], [1, 2], seed=0).fingerprint.split("-")
    assert other_weights[0] == data and other_weights[1] != weights
    other_data = BlendedSamples([b, a], [1, 1], seed=0).fingerprint.split("-")
    assert other_data[0] != data and other_data[1] == weights


def test_sources_must_be_compatible(sources, tmp_path):
    a, b, c = (PackedDataset(p) for p in sources)
    check_blendable([a, b])
    with pytest.raises(ValueError, match=rf"sources {sources[0]} and {sources[2]} .*seq_len"):
        check_blendable([a, c])
    with pytest.raises(ValueError, match="appears twice"):
        check_blendable([a, b, PackedDataset(sources[0])])
    other = tmp_path / "other"
    shutil.copytree(sources[1], other)
    edit_manifest(other, lambda m: m["tokenizer"].update(sha256="f" * 64))
    other_ds = PackedDataset(other)
    with pytest.raises(ValueError, match=rf"sources {sources[0]} and {other} use different tok"):
        check_blendable([a, other_ds])
    with pytest.raises(ValueError, match="2 sources but 3 blend weights"):
        BlendedSamples([a, b], [1, 1, 1], seed=0)
    manifest = json.loads((sources[0] / "manifest.json").read_text())
    assert manifest["tokenizer"]["kind"] == "byte"


def test_a_blend_of_uint16_and_int32_and_of_v1_and_v2_corpora(tmp_path):
    rng = np.random.default_rng(8)
    rows_a, docs_a, sents_a = hand_made(rng, n=20)
    rows_b, docs_b, _ = hand_made(rng, n=14)
    a = write_corpus(tmp_path / "a", rows_a, docs_a, sents_a, rows_per_batch=4, rows_per_shard=8)
    b = write_corpus(  # int32 tokens, no sentence offsets (schema_version 1)
        tmp_path / "b", rows_b.astype(np.int32), docs_b, None, rows_per_batch=3, rows_per_shard=9
    )
    blend = BlendedSamples([PackedDataset(a), PackedDataset(b)], [2, 1], seed=4, block_size=3)
    assert blend.token_dtype == np.int32
    g = np.arange(90)
    out = blend.read(g)
    source, k = blend.locate(g)
    expected = ((rows_a, docs_a, sents_a), (rows_b, docs_b, docs_b))
    for s, (rows, docs, sents) in enumerate(expected):
        sel = source == s
        r = blend.rows(s, k[sel])
        assert np.array_equal(out["tokens"][sel].numpy(), rows[r].astype(np.int64))
        assert np.array_equal(out["doc_start"][sel].numpy(), as_mask(docs, 12)[r])
        assert np.array_equal(out["sent_start"][sel].numpy(), as_mask(sents, 12)[r])
    # Reading into a reused buffer gives the same rows, whatever the buffer held before.
    buffer = RowArrays.empty(64, 12, np.dtype(np.int32))
    for lo, hi in ((0, 64), (64, 90), (30, 50)):
        again = blend.read_arrays(g[lo:hi], out=buffer).batch(copy=True)
        for key, value in again.items():
            assert torch.equal(value, out[key][lo:hi]), key
