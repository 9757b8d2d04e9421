"""Reading packed corpora: random access, integrity checks, global order, DP loader, resume."""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from data_pipeline.dataset import DistributedBatchIterator, PackedDataset, sample_order
from data_pipeline.objectives import OBJECTIVES, clm_batch, get_objective
from data_pipeline.prepare import prepare_corpus, sha256_file


def random_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz      "
    return ["".join(rng.choices(letters, k=rng.randint(5, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~1,100 train rows of 16 tokens in 5 shards of 256 rows, 64 rows per record batch."""
    out = tmp_path_factory.mktemp("data") / "corpus"
    prepare_corpus(
        random_docs(600, seed=1),
        out,
        tokenizer_spec="byte",
        seq_len=15,
        val_fraction=0.1,
        rows_per_batch=64,
        max_rows_per_shard=256,
    )
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A few dozen rows, so the loader tests cross epochs."""
    out = tmp_path_factory.mktemp("data") / "small"
    prepare_corpus(
        random_docs(40, seed=2),
        out,
        tokenizer_spec="byte",
        seq_len=15,
        val_fraction=0.1,
        rows_per_batch=8,
        max_rows_per_shard=16,
    )
    return out


@pytest.fixture
def corpus_copy(corpus, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(corpus, dst)
    return dst


def all_rows(path: Path, split: str = "train") -> np.ndarray:
    manifest = json.loads((path / "manifest.json").read_text())
    parts = []
    for shard in manifest["splits"][split]["shards"]:
        table = pa.ipc.open_file(pa.memory_map(str(path / shard["file"]))).read_all()
        flat = table.column("tokens").combine_chunks().flatten().to_numpy()
        parts.append(flat.reshape(-1, manifest["sample_len"]))
    return np.concatenate(parts).astype(np.int64)


def edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


# -- PackedDataset ---------------------------------------------------------------------------


def test_gather_equals_the_written_rows(corpus):
    ds = PackedDataset(corpus)
    expected = all_rows(corpus)
    assert len(ds) == len(expected) > 1000 and len(ds.manifest["splits"]["train"]["shards"]) >= 4
    assert (ds.seq_len, ds.sample_len, ds.vocab_size) == (15, 16, 366)
    idx = np.random.default_rng(0).integers(0, len(ds), size=300)
    got = ds.gather(idx)
    assert got.dtype == torch.int64 and got.shape == (300, 16)
    assert torch.equal(got, torch.from_numpy(expected[idx]))
    assert torch.equal(ds.gather(list(range(len(ds)))), torch.from_numpy(expected))
    assert torch.equal(ds.gather([-1]), torch.from_numpy(expected[-1:]))
    row = ds[700]
    assert row.dtype == np.uint16 and not row.flags.writeable  # a view of the memory map
    assert np.array_equal(row, expected[700])
    with pytest.raises(IndexError, match="out of range"):
        ds.gather([len(ds)])
    val = PackedDataset(corpus, "val")
    assert torch.equal(val.gather(range(len(val))), torch.from_numpy(all_rows(corpus, "val")))
    assert ds.fingerprint != val.fingerprint
    assert ds.tokenizer.decode(ds[0].tolist())[:5] == ds.tokenizer.decode(expected[0][:5].tolist())


def test_dataset_pickles_by_reopening(corpus):
    ds = PackedDataset(corpus)
    again = pickle.loads(pickle.dumps(ds))
    assert torch.equal(again.gather([1, 2, 3]), ds.gather([1, 2, 3]))


def test_missing_or_invalid_manifest_names_the_file(tmp_path, corpus_copy):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        PackedDataset(tmp_path / "nowhere")
    edit_manifest(corpus_copy, lambda m: m["splits"]["train"]["shards"][0].pop("sha256"))
    with pytest.raises(ValueError, match=r"split 'train', shard 0: field 'sha256' is missing"):
        PackedDataset(corpus_copy)
    edit_manifest(corpus_copy, lambda m: m.update(schema_version=7))
    with pytest.raises(ValueError, match="schema_version=7"):
        PackedDataset(corpus_copy)
    (corpus_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"copy/manifest\.json is not valid JSON"):
        PackedDataset(corpus_copy)


def test_unknown_split(corpus):
    with pytest.raises(ValueError, match="no split 'test'"):
        PackedDataset(corpus, "test")


def test_shard_row_count_mismatch_names_the_shard(corpus_copy):
    def edit(m):
        m["splits"]["train"]["shards"][1]["rows"] += 1
        m["splits"]["train"]["rows"] += 1

    edit_manifest(corpus_copy, edit)
    with pytest.raises(ValueError, match=r"shard .*train-00001\.arrow"):
        PackedDataset(corpus_copy)


def test_truncated_shard_names_the_shard(corpus_copy):
    shard = corpus_copy / "train-00002.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"shard .*train-00002\.arrow has \d+ bytes"):
        PackedDataset(corpus_copy)

    def edit(m):  # the size recorded too: the Arrow footer is gone
        m["splits"]["train"]["shards"][2]["bytes"] = len(data) // 2

    edit_manifest(corpus_copy, edit)
    with pytest.raises(ValueError, match=r"shard .*train-00002\.arrow"):
        PackedDataset(corpus_copy)


def test_checksums_are_verified_when_asked(corpus_copy):
    shard = corpus_copy / "train-00000.arrow"
    data = bytearray(shard.read_bytes())
    row = all_rows(corpus_copy)[5].astype(np.uint16).tobytes()
    at = bytes(data).index(row)
    data[at] ^= 0x01  # a token changes; size and layout stay the same
    shard.write_bytes(bytes(data))
    PackedDataset(corpus_copy)  # sizes and layout still match
    with pytest.raises(ValueError, match=r"shard .*train-00000\.arrow: sha256"):
        PackedDataset(corpus_copy, verify_checksums=True)


def test_token_outside_the_vocabulary_names_shard_and_row(corpus_copy):
    name, bad_row = "train-00001.arrow", 77
    path = corpus_copy / name
    reader = pa.ipc.open_file(pa.memory_map(str(path)))
    batches = [reader.get_batch(b) for b in range(reader.num_record_batches)]
    schema = reader.schema
    rows = np.concatenate(
        [b.column(0).flatten().to_numpy().reshape(b.num_rows, -1) for b in batches]
    ).copy()
    rows[bad_row, 5] = 400  # vocab is 366
    tmp = corpus_copy / "rewritten.arrow"
    with pa.ipc.new_file(str(tmp), schema) as writer:
        for i, b in enumerate(batches):
            part = rows[i * 64 : i * 64 + b.num_rows].reshape(-1)
            tokens = pa.FixedSizeListArray.from_arrays(pa.array(part), 16)
            writer.write_batch(pa.record_batch([tokens, b.column(1)], schema=schema))
    tmp.replace(path)

    def edit(m):
        m["splits"]["train"]["shards"][1]["bytes"] = path.stat().st_size
        m["splits"]["train"]["shards"][1]["sha256"] = sha256_file(path)

    edit_manifest(corpus_copy, edit)
    ds = PackedDataset(corpus_copy, verify_checksums=True)
    global_row = 256 + bad_row
    ds.gather([0, 1, global_row - 1])  # other rows are fine
    with pytest.raises(ValueError, match=rf"train-00001\.arrow, row {bad_row} .*token id 400"):
        ds.gather([3, global_row, 5])
    with pytest.raises(ValueError, match=rf"train-00001\.arrow, row {bad_row}"):
        ds[global_row]


# -- global order and the loader --------------------------------------------------------------


def test_sample_order_is_a_deterministic_permutation():
    a = sample_order(1000, seed=5, epoch=3)
    assert np.array_equal(np.sort(a), np.arange(1000))
    assert np.array_equal(a, sample_order(1000, seed=5, epoch=3))
    assert not np.array_equal(a, sample_order(1000, seed=5, epoch=4))
    assert not np.array_equal(a, sample_order(1000, seed=6, epoch=3))


def loader(ds, *, dp_rank=0, dp_size=1, gb=8, mb=2, seed=17, consumed=0):
    return DistributedBatchIterator(
        ds,
        global_batch_size=gb,
        micro_batch_size=mb,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=seed,
        consumed_samples=consumed,
    )


def global_step(loaders) -> torch.Tensor:
    """One step of every rank, concatenated in rank order: the global batch."""
    return torch.cat([torch.cat(ld.next_batch()) for ld in loaders])


def test_ranks_together_read_the_single_rank_batch(corpus):
    ds = PackedDataset(corpus)
    single = loader(ds, gb=16, mb=4)
    ranks = [loader(ds, dp_rank=r, dp_size=4, gb=16, mb=2) for r in range(4)]
    for _ in range(3):
        micro = ranks[0].next_batch()
        assert len(micro) == 2 and all(m.shape == (2, 16) and m.dtype == torch.int64 for m in micro)
        ours = torch.cat([torch.cat(micro)] + [torch.cat(ld.next_batch()) for ld in ranks[1:]])
        assert torch.equal(ours, torch.cat(single.next_batch()))
    assert single.consumed_samples == ranks[3].consumed_samples == 48


def test_an_epoch_visits_every_row_once(small):
    ds = PackedDataset(small)
    n = len(ds)
    ld = loader(ds, gb=1, mb=1)
    seen = torch.cat([ld.next_batch()[0] for _ in range(n)])
    assert torch.equal(seen, ds.gather(sample_order(n, seed=17, epoch=0)))
    assert ld.epoch == 1


def test_resume_at_another_dp_size_continues_the_same_stream(small):
    ds = PackedDataset(small)
    n, gb = len(ds), 8
    assert n % gb, "the test wants a step that straddles an epoch boundary"
    steps = (2 * n) // gb + 2  # past the end of the second epoch
    reference = torch.cat([global_step([loader(ds, gb=gb, consumed=t * gb)]) for t in range(steps)])

    k = 3
    before = [loader(ds, dp_rank=r, dp_size=2, gb=gb) for r in range(2)]
    stream = [global_step(before) for _ in range(k)]
    state = before[0].state_dict()
    assert state == before[1].state_dict()
    assert state["consumed_samples"] == k * gb and set(state) == {
        "consumed_samples",
        "seed",
        "dataset_fingerprint",
    }
    state = json.loads(json.dumps(state))  # survives a checkpoint round trip

    for dp_size, mb in ((4, 1), (1, 4)):
        after = [loader(ds, dp_rank=r, dp_size=dp_size, gb=gb, mb=mb) for r in range(dp_size)]
        for ld in after:
            ld.load_state_dict(state)
        resumed = stream + [global_step(after) for _ in range(steps - k)]
        assert torch.equal(torch.cat(resumed), reference)
        assert after[0].epoch == (steps * gb) // n >= 2


def test_state_from_other_data_or_seed_is_refused(small, corpus):
    ld = loader(PackedDataset(small))
    ld.next_batch()
    other = loader(PackedDataset(corpus))
    with pytest.raises(ValueError, match="data changed"):
        other.load_state_dict(ld.state_dict())
    with pytest.raises(ValueError, match="seed=99"):
        loader(PackedDataset(small), seed=99).load_state_dict(ld.state_dict())
    with pytest.raises(ValueError, match="consumed_samples"):
        loader(PackedDataset(small)).load_state_dict({"seed": 17, "dataset_fingerprint": "x"})


def test_batch_sizes_are_validated(small):
    ds = PackedDataset(small)
    with pytest.raises(ValueError, match=r"global_batch_size=10 must be divisible by .* = 4"):
        loader(ds, gb=10, mb=2, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank"):
        loader(ds, dp_rank=2, dp_size=2)


# -- objectives -------------------------------------------------------------------------------


def test_clm_batch_shifts_by_one():
    tokens = torch.arange(24).reshape(3, 8)
    out = clm_batch(tokens)
    assert torch.equal(out["input_ids"], tokens[:, :-1]) and torch.equal(
        out["labels"], tokens[:, 1:]
    )
    assert out["input_ids"].is_contiguous() and out["labels"].is_contiguous()
    assert torch.equal(tokens, torch.arange(24).reshape(3, 8))  # input untouched
    assert get_objective("clm") is clm_batch and set(OBJECTIVES) == {"clm"}
    with pytest.raises(ValueError, match="data.objective='mlm'"):
        get_objective("mlm")
    with pytest.raises(ValueError, match="seq_len"):
        clm_batch(torch.zeros(4, dtype=torch.long))


def test_batch_view_cache_is_bounded(corpus, monkeypatch):
    import data_pipeline.dataset as dataset_mod

    monkeypatch.setattr(dataset_mod, "_MAX_CACHED_BATCHES", 3)
    ds = PackedDataset(corpus)
    order = sample_order(len(ds), seed=0, epoch=0)
    assert torch.equal(ds.gather(order), torch.from_numpy(all_rows(corpus)[order]))
    assert len(ds._views) == 3
