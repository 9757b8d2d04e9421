"""The DP-sharded loader: rank slices, worker processes, epochs, and resume at another DP size
over a blend of corpora."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import data_pipeline.loader as loader_mod
from data_pipeline.blend import BlendedSamples
from data_pipeline.dataset import PackedDataset
from data_pipeline.loader import Loader, build_loader
from tests.unit.test_dataset import prepare

SEED = 21


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> list[Path]:
    """Two small corpora (a few dozen rows each) so every test crosses epochs."""
    root = tmp_path_factory.mktemp("loader")
    return [prepare(root / "a", docs=16, seed=31), prepare(root / "b", docs=10, seed=32)]


def make(sources, weights=(0.7, 0.3), *, gb=8, mb=2, rank=0, dp=1, seed=SEED, **kw) -> Loader:
    return build_loader(
        list(zip(map(str, sources), weights, strict=False)),
        global_batch_size=gb,
        micro_batch_size=mb,
        dp_rank=rank,
        dp_size=dp,
        seed=seed,
        **kw,
    )


class AddPid:
    """A picklable transform that shows which process ran it."""

    def __call__(self, batch: dict) -> dict:
        return {**batch, "pid": torch.tensor(os.getpid())}


def rank_step(loaders: list[Loader]) -> list[dict]:
    """One optimizer step of every simulated rank: all micro-batches, in rank order."""
    return [m for ld in loaders for m in ld.next_batch()]


def cat(micro: list[dict], key: str) -> torch.Tensor:
    return torch.cat([m[key] for m in micro])


def reference(sources, samples: int) -> dict[int, torch.Tensor]:
    """Global sample id -> its tokens, read by one rank in one go."""
    blend = BlendedSamples([PackedDataset(p) for p in sources], [0.7, 0.3], seed=SEED)
    out = blend.read(np.arange(samples))
    return dict(zip(out["sample_ids"].tolist(), out["tokens"], strict=True))


def test_micro_batches_of_a_rank(sources):
    ld = make(sources, gb=12, mb=2, rank=1, dp=3)
    assert (ld.seq_len, ld.sample_len, ld.vocab_size) == (15, 16, 366)
    assert ld.tokenizer.kind == "byte" and [d.path for d in ld.datasets] == sources
    for step in range(3):
        micro = ld.next_batch()
        assert len(micro) == 2
        for i, m in enumerate(micro):
            assert set(m) == {"tokens", "sample_ids", "doc_start", "sent_start"}
            assert m["tokens"].shape == m["doc_start"].shape == (2, 16)
            assert m["tokens"].dtype == torch.int64 and m["sent_start"].dtype == torch.bool
            first = 12 * step + 4 + 2 * i  # rank 1 of 3 takes samples [4, 8) of each step
            assert m["sample_ids"].tolist() == [first, first + 1]
    assert ld.consumed_samples == 36


def test_ranks_together_read_the_single_rank_batch(sources):
    single = make(sources, gb=8, mb=8)
    ranks = [make(sources, gb=8, mb=1, rank=r, dp=4) for r in range(4)]
    for _ in range(5):
        ours, theirs = rank_step(ranks), single.next_batch()
        for key in ("tokens", "sample_ids", "doc_start", "sent_start"):
            assert torch.equal(cat(ours, key), cat(theirs, key))


def test_planned_steps_equal_fresh_reads_and_handed_out_batches_are_independent(
    sources, monkeypatch
):
    monkeypatch.setattr(loader_mod, "READ_AHEAD_SAMPLES", 12)  # 3 steps of 4 samples per plan
    ld = make(sources, gb=8, mb=2, rank=1, dp=2)
    planned = []
    plan = ld.samples.plan

    def spy(g, **kw):
        planned.append((len(g), kw["micro_batch_size"]))
        return plan(g, **kw)

    monkeypatch.setattr(ld.samples, "plan", spy)
    for step in range(15):
        micro = ld.next_batch()
        ids = cat(micro, "sample_ids")
        assert ids.tolist() == list(range(8 * step + 4, 8 * step + 8))
        want = ld.samples.read(ids.numpy())  # a fresh read of the same samples
        for key, value in want.items():
            assert torch.equal(cat(micro, key), value), (step, key)
        for m in micro:  # the caller writes over what it was given: later steps are unchanged
            m["tokens"].fill_(-1)
            m["sample_ids"].fill_(-1)
            m["doc_start"].fill_(True)
            m["sent_start"].fill_(True)
    # One plan of 3 steps every 3 steps; each fresh read above plans its 4 samples at once.
    assert planned == ([(12, 2)] + [(4, 4)] * 3) * 5


def test_workers_give_the_same_batches_without_duplicates(sources):
    plain = make(sources, gb=12, mb=2, rank=1, dp=2, transform=AddPid())
    workers = make(sources, gb=12, mb=2, rank=1, dp=2, transform=AddPid(), num_workers=2)
    seen = []
    for _ in range(7):
        a, b = plain.next_batch(), workers.next_batch()
        assert len(a) == len(b) == 3
        for x, y in zip(a, b, strict=True):
            assert set(x) == set(y)
            for key in ("tokens", "sample_ids", "doc_start", "sent_start"):
                assert torch.equal(x[key], y[key])
            assert int(x["pid"]) == os.getpid() != int(y["pid"])  # ran in a worker
            seen += y["sample_ids"].tolist()
    # rank 1 of 2 takes samples [6, 12) of each 12-sample step: each once, in order
    assert seen == [12 * t + i for t in range(7) for i in range(6, 12)]
    workers.close()


def test_resume_at_another_dp_size_with_a_blend_across_epochs(sources):
    gb, steps, k = 8, 24, 7
    sizes = [len(PackedDataset(p)) for p in sources]
    assert gb * steps * 0.3 > 2 * sizes[1] and gb * steps * 0.7 > 2 * sizes[0]  # epochs >= 2
    want = reference(sources, gb * steps)

    before = [make(sources, gb=gb, mb=2, rank=r, dp=2) for r in range(2)]
    seen = [m for _ in range(k) for m in rank_step(before)]
    state = json.loads(json.dumps(before[1].state_dict()))  # a checkpoint round trip
    assert state == before[0].state_dict()
    assert set(state) == {"consumed_samples", "seed", "fingerprint"}
    assert state["consumed_samples"] == k * gb

    for dp, mb, workers in ((4, 1, 0), (1, 4, 2)):
        after = [make(sources, gb=gb, mb=mb, rank=r, dp=dp, num_workers=workers) for r in range(dp)]
        for ld in after:
            ld.load_state_dict(state)
        run = seen + [m for _ in range(steps - k) for m in rank_step(after)]
        ids = cat(run, "sample_ids").tolist()
        assert Counter(ids) == Counter(range(gb * steps))  # nothing skipped or repeated
        for i, row in zip(ids, cat(run, "tokens"), strict=True):
            assert torch.equal(row, want[i])
        assert list(after[0].epochs().values()) == before[0].samples.epochs(gb * steps)
        assert min(after[0].epochs().values()) >= 2
        for ld in after:
            ld.close()


def test_epochs_are_reported_per_source(sources):
    ld = make(sources, gb=4, mb=4)
    sizes = [len(d) for d in ld.datasets]
    paths = [str(p) for p in sources]
    counts = np.zeros(2, dtype=np.int64)
    history = []
    for _ in range(40):
        assert ld.epochs() == {p: int(c) // n for p, c, n in zip(paths, counts, sizes, strict=True)}
        assert ld.epoch == max(ld.epochs().values())
        ids = cat(ld.next_batch(), "sample_ids").numpy()
        source, _ = ld.samples.locate(ids)
        counts += np.bincount(source, minlength=2)
        history.append(ld.epoch)
    assert history[0] == 0 and history[-1] >= 2 and history == sorted(history)


def test_state_from_another_blend_seed_or_data_is_refused(sources, tmp_path):
    ld = make(sources)
    ld.next_batch()
    state = ld.state_dict()
    with pytest.raises(ValueError, match=r"^the blend weights changed .*now 0\.5, 0\.5"):
        make(sources, (1, 1)).load_state_dict(state)
    with pytest.raises(ValueError, match=r"^the data changed \(sources .*/b, .*/a\)"):
        make(sources[::-1]).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=5"):
        make(sources, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="no 'seed'"):
        make(sources).load_state_dict({"consumed_samples": 8, "fingerprint": state["fingerprint"]})
    same = make(sources, (7, 3))  # the same shares
    same.load_state_dict(state)
    assert same.consumed_samples == 8


def test_bad_arguments_are_named(sources, tmp_path):
    with pytest.raises(ValueError, match="data.sources is empty"):
        build_loader([], global_batch_size=8, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    with pytest.raises(ValueError, match=r"blend weight -1.0 of source .*/b must be positive"):
        make(sources, (1, -1))
    with pytest.raises(ValueError, match=r"data.sources\[1\].weight='x' is not a number"):
        make(sources, (1, "x"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make([tmp_path / "nowhere"], (1,))
    with pytest.raises(ValueError, match="num_workers"):
        make(sources, num_workers=-1)
    with pytest.raises(ValueError, match=r"divisible by micro_batch_size \* dp_size"):
        make(sources, gb=8, mb=3)
    dicts = build_loader(
        [{"path": str(sources[0]), "weight": 2.0}, {"path": str(sources[1])}],
        global_batch_size=4,
        micro_batch_size=4,
        dp_rank=0,
        dp_size=1,
        seed=SEED,
    )
    assert [d.path for d in dicts.datasets] == sources
    assert dicts.samples.schedule.weights.tolist() == pytest.approx([2 / 3, 1 / 3])
