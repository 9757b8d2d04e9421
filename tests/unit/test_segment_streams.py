"""Segment streams (data_pipeline/blend.py): row j of every global batch continues row j of
the batch before, whatever the data-parallel size; and the model side, XLNet keeping its
memory by slot between steps (models/xlnet.py `memory_slot`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from common.errors import ConfigError
from data_pipeline.blend import stream_rows
from models.build import build_model
from models.config import ModelConfig


def test_each_stream_reads_consecutive_rows_within_an_epoch():
    n, g = 103, 8  # L = 12 segments per stream, 7 rows left over
    k = np.arange(3 * 96)
    rows = stream_rows(k, n=n, streams=g, seed=5)
    per_epoch = rows.reshape(3, 12, g)  # epoch, step, stream
    for epoch in per_epoch:
        steps = np.diff(epoch, axis=0) % n
        assert (steps == 1).all()  # stream j's segment t + 1 is the row after segment t
        assert len(set(epoch.reshape(-1).tolist())) == 96  # no row twice in an epoch
        starts = epoch[0]
        assert ((np.diff(starts) % n) == 12).all()  # streams L rows apart
    assert len({int(e[0, 0]) for e in per_epoch}) == 3  # each epoch rotated elsewhere


def test_stream_rows_depend_on_the_global_index_only():
    k = np.array([5, 900, 77, 5])
    a = stream_rows(k, n=200, streams=16, seed=1)
    assert a[0] == a[3]
    b = np.concatenate(
        [
            stream_rows(k[:2], n=200, streams=16, seed=1),
            stream_rows(k[2:], n=200, streams=16, seed=1),
        ]
    )
    assert (a == b).all()
    assert not (stream_rows(k, n=200, streams=16, seed=2) == a).all()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from data_pipeline.sample_corpus import ensure_sample_corpus

    return Path(
        ensure_sample_corpus(
            cache_dir=str(tmp_path_factory.mktemp("c")),
            tokenizer_spec="byte",
            seq_len=32,
            val_fraction=0.05,
        )
    )


def test_loader_rows_continue_per_stream_at_any_data_parallel_size(corpus):
    from data_pipeline.loader import build_loader

    def global_rows(dp: int) -> list[np.ndarray]:
        loaders = [
            build_loader(
                [(str(corpus), 1.0)],
                global_batch_size=8,
                micro_batch_size=2,
                dp_rank=r,
                dp_size=dp,
                seed=3,
                segment_streams=True,
            )
            for r in range(dp)
        ]
        steps = []
        for _ in range(3):
            parts = [torch.cat([b["tokens"] for b in loader.next_batch()]) for loader in loaders]
            steps.append(torch.cat(parts).numpy())
        return steps

    one, two = global_rows(1), global_rows(2)
    for a, b in zip(one, two, strict=True):
        assert (a == b).all()
    # Row j's next segment starts where its last one ended (rows hold seq_len + 1 tokens).
    from data_pipeline.dataset import PackedDataset

    ds = PackedDataset(str(corpus), "train")
    flat = ds.gather_batch(list(range(len(ds))))["tokens"].numpy().reshape(-1)
    width = one[0].shape[1]
    for j in range(8):
        start = np.flatnonzero(
            [
                (flat[i : i + width] == one[0][j]).all()
                for i in range(0, len(flat) - width + 1, width)
            ]
        )
        assert len(start) == 1
        assert (flat[(start[0] + 1) * width : (start[0] + 2) * width] == one[1][j]).all()


def test_streams_read_one_corpus_of_enough_rows(corpus):
    from data_pipeline.blend import BlendedSamples
    from data_pipeline.dataset import PackedDataset
    from data_pipeline.sample_corpus import ensure_sample_corpus

    ds = PackedDataset(str(corpus), "train")
    other = ensure_sample_corpus(
        cache_dir=str(corpus.parent), tokenizer_spec="byte", seq_len=32, val_fraction=0.1
    )
    with pytest.raises(ConfigError, match="blends 2"):
        BlendedSamples(
            [ds, PackedDataset(str(other), "train")], [1.0, 1.0], seed=0, segment_streams=4
        )
    with pytest.raises(
        ConfigError, match=f"{len(ds)} rows cannot hold {len(ds) + 1} segment streams"
    ):
        BlendedSamples([ds], [1.0], seed=0, segment_streams=len(ds) + 1)
    plain = BlendedSamples([ds], [1.0], seed=0)
    assert BlendedSamples([ds], [1.0], seed=0, segment_streams=4).fingerprint != plain.fingerprint


def _txl() -> torch.nn.Module:
    conf = Path(__file__).resolve().parents[2] / "conf" / "model" / "transformer_xl_debug.yaml"
    cfg = OmegaConf.to_object(
        OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(conf))
    )
    cfg = dataclasses.replace(cfg, vocab_size=50, mem_len=6)
    torch.manual_seed(0)
    return build_model(cfg, vocab_size=50).eval()


def test_memory_slot_keeps_each_slots_memory_between_calls():
    model = _txl()
    gen = torch.Generator().manual_seed(1)
    seg = [torch.randint(0, 50, (2, 5), generator=gen) for _ in range(3)]
    with torch.no_grad():
        first, mems = model(seg[0], return_mems=True)
        second = model(seg[1], mems=mems)
        torch.testing.assert_close(model(seg[0], memory_slot=0), first)
        model(seg[2], memory_slot=1)  # another slot keeps its own memory
        torch.testing.assert_close(model(seg[1], memory_slot=0), second)
    assert sorted(model.memory) == [0, 1] and model.memory[0][0].shape == (2, 6, 128)
    state = model.memory_state()
    fresh = _txl()
    fresh.load_memory_state(state)
    with torch.no_grad():
        torch.testing.assert_close(fresh(seg[2], memory_slot=0), model(seg[2], memory_slot=0))
    with pytest.raises(ValueError, match="memory_slot keeps the memory in the model"):
        model(seg[0], memory_slot=0, return_mems=True)
