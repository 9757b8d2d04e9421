"""Reading packed corpora: random access, boundaries, integrity checks, micro-batch plans,
global order, and the loader over a single corpus."""

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

from data_pipeline.blend import BlendedSamples
from data_pipeline.corpus_format import expected_schema, sha256_file
from data_pipeline.dataset import PackedDataset, sample_order
from data_pipeline.loader import Loader
from data_pipeline.micro_batch import MicroBatchPlan
from data_pipeline.prepare import prepare_corpus
from data_pipeline.tokenizers import ByteTokenizer

BYTE = ByteTokenizer()


def random_docs(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz      "
    return ["".join(rng.choices(letters, k=rng.randint(5, 60))) for _ in range(n)]


def prepare(out: Path, *, docs: int, seed: int, seq_len: int = 15, rpb: int = 8, shard: int = 16):
    prepare_corpus(
        random_docs(docs, seed=seed),
        out,
        tokenizer_spec="byte",
        seq_len=seq_len,
        val_fraction=0.1,
        rows_per_batch=rpb,
        max_rows_per_shard=shard,
    )
    return out


def write_corpus(
    out: Path,
    rows: np.ndarray,
    docs: list[list[int]],
    sents: list[list[int]] | None,
    *,
    rows_per_batch: int,
    rows_per_shard: int,
    batch_rows: list[int] | None = None,
) -> Path:
    """A hand-made corpus: schema_version 2 when `sents` is given, else 1; uint16 tokens, or
    int32 when `rows` is int32. `batch_rows` overrides the record batch sizes (one shard)."""
    out.mkdir(parents=True)
    n, S = rows.shape
    version = 1 if sents is None else 2
    schema = expected_schema(rows.dtype, S, schema_version=version)
    shards = []
    for s0 in range(0, n, rows_per_shard):
        name = f"train-{len(shards):05d}.arrow"
        end = min(s0 + rows_per_shard, n)
        sizes = batch_rows or [min(rows_per_batch, end - r) for r in range(s0, end, rows_per_batch)]
        bounds = (s0 + np.concatenate([[0], np.cumsum(sizes)])).tolist()
        with pa.ipc.new_file(str(out / name), schema) as writer:
            for r0, r1 in zip(bounds[:-1], bounds[1:], strict=True):
                columns = [
                    pa.FixedSizeListArray.from_arrays(pa.array(rows[r0:r1].reshape(-1)), S),
                    pa.array(docs[r0:r1], type=pa.list_(pa.int32())),
                ]
                if sents is not None:
                    columns.append(pa.array(sents[r0:r1], type=pa.list_(pa.int32())))
                writer.write_batch(pa.record_batch(columns, schema=schema))
        rows_here = min(rows_per_shard, n - s0)
        shards.append(
            {
                "file": name,
                "rows": rows_here,
                "tokens": rows_here * S,
                "documents": 0,
                "bytes": (out / name).stat().st_size,
                "sha256": sha256_file(out / name),
            }
        )
    manifest = {
        "schema_version": version,
        "tokenizer": BYTE.identity(),
        "vocab_size": BYTE.vocab_size,
        "seq_len": S - 1,
        "sample_len": S,
        "dtype": rows.dtype.name,
        "rows_per_batch": rows_per_batch,
        "splits": {"train": {"shards": shards, "rows": n}},
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def hand_made(rng: np.random.Generator, n: int = 37, S: int = 12):
    """Random rows with random document and sentence starts (sentences include documents)."""
    rows = rng.integers(0, 256, size=(n, S)).astype(np.uint16)
    docs = [sorted(rng.choice(S, size=rng.integers(0, 3), replace=False).tolist()) for _ in rows]
    sents = [
        sorted(set(d) | set(rng.choice(S, size=rng.integers(0, 4), replace=False).tolist()))
        for d in docs
    ]
    return rows, docs, sents


def as_mask(positions: list[list[int]], S: int) -> np.ndarray:
    mask = np.zeros((len(positions), S), dtype=bool)
    for i, p in enumerate(positions):
        mask[i, p] = True
    return mask


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """~1,100 train rows of 16 tokens in 5 shards of 256 rows, 64 rows per record batch."""
    return prepare(tmp_path_factory.mktemp("data") / "corpus", docs=600, seed=1, rpb=64, shard=256)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """A few dozen rows, so the loader tests cross epochs."""
    return prepare(tmp_path_factory.mktemp("data") / "small", docs=40, seed=2)


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


def rewrite_shard(path: Path, shard_index: int, edit_rows) -> None:
    """Rewrite one shard with `edit_rows` applied to its tokens; keep the manifest in step."""
    manifest = json.loads((path / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][shard_index]
    file = path / entry["file"]
    reader = pa.ipc.open_file(pa.memory_map(str(file)))
    batches = [reader.get_batch(b) for b in range(reader.num_record_batches)]
    S = manifest["sample_len"]
    rows = np.concatenate([b.column(0).flatten().to_numpy().reshape(-1, S) for b in batches])
    rows = rows.copy()
    edit_rows(rows)
    tmp = path / "rewritten.arrow"
    with pa.ipc.new_file(str(tmp), reader.schema) as writer:
        start = 0
        for b in batches:
            part = rows[start : start + b.num_rows].reshape(-1)
            tokens = pa.FixedSizeListArray.from_arrays(pa.array(part), S)
            writer.write_batch(pa.record_batch([tokens, *b.columns[1:]], schema=reader.schema))
            start += b.num_rows
    tmp.replace(file)
    entry.update(bytes=file.stat().st_size, sha256=sha256_file(file))
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
    assert torch.equal(ds.gather_batch(idx)["tokens"], got)
    row = ds[700]
    assert row.dtype == np.uint16 and not row.flags.writeable  # a view of the memory map
    assert np.array_equal(row, expected[700])
    with pytest.raises(IndexError, match="out of range"):
        ds.gather([len(ds)])
    with pytest.raises(IndexError, match="out of range"):
        ds.gather_batch([-len(ds) - 1])
    val = PackedDataset(corpus, "val")
    assert torch.equal(val.gather(range(len(val))), torch.from_numpy(all_rows(corpus, "val")))
    assert ds.fingerprint != val.fingerprint
    assert ds.tokenizer.decode(ds[0].tolist())[:5] == ds.tokenizer.decode(expected[0][:5].tolist())


def test_rows_across_shards_whichever_way_they_are_grouped(corpus):
    ds = PackedDataset(corpus)
    expected = all_rows(corpus)
    rng = np.random.default_rng(1)
    selections = [
        np.arange(10, 18),  # one shard: a single fancy-indexed copy
        rng.integers(0, len(ds), size=200),  # many rows of a few shards: grouped
        np.asarray([3, 300, 600, 900, 1000, 5]),  # rows of distinct shards: a slice each
    ]
    for _ in range(2):  # first while record batches are checked, then the lookup alone
        for idx in selections:
            assert torch.equal(ds.gather(idx), torch.from_numpy(expected[idx]))
            assert np.array_equal(ds[int(idx[-1])], expected[idx[-1]])
        ds.verify()
    # With every batch checked, plain int64 arrays skip the range check: numpy's stands in.
    assert torch.equal(ds.gather(np.asarray([-1, 0])), torch.from_numpy(expected[[-1, 0]]))
    with pytest.raises(IndexError, match=rf"row {len(ds)} out of range .* split 'train'"):
        ds.gather(np.asarray([0, len(ds)]))
    with pytest.raises(IndexError, match="out of range"):
        ds.gather(np.asarray([-len(ds) - 1]))


def expected_plan(parts, size: int) -> dict[str, torch.Tensor]:
    """What a plan of `parts` holds, row by row, read with gather_batch."""
    want = {
        key: torch.empty(size, 12, dtype=torch.int64 if key == "tokens" else torch.bool)
        for key in ("tokens", "doc_start", "sent_start")
    }
    for ds, rows, at in parts:
        got = ds.gather_batch(rows)
        for key in want:
            want[key][slice(None) if at is None else at] = got[key]
    return want


def test_a_plan_hands_out_the_gathered_micro_batches(tmp_path):
    rng = np.random.default_rng(9)
    rows_a, docs_a, sents_a = hand_made(rng, n=20)
    # Sentence lists that leave out the document starts: those are marked from the document
    # lists in both masks.
    sents_a = [sorted(set(s) - set(d)) for s, d in zip(sents_a, docs_a, strict=True)]
    rows_b, docs_b, _ = hand_made(rng, n=12)
    a = write_corpus(tmp_path / "a", rows_a, docs_a, sents_a, rows_per_batch=4, rows_per_shard=8)
    one_shard = write_corpus(
        tmp_path / "a1", rows_a, docs_a, sents_a, rows_per_batch=4, rows_per_shard=20
    )
    b = write_corpus(  # int32 tokens, no sentence lists
        tmp_path / "b", rows_b.astype(np.int32), docs_b, None, rows_per_batch=3, rows_per_shard=6
    )
    a, b, one_shard = PackedDataset(a), PackedDataset(b), PackedDataset(one_shard)
    ids = np.arange(100, 124)
    at_a = np.sort(rng.permutation(24)[:15])  # where each corpus's rows land in the plan
    at_b = np.setdiff1d(np.arange(24), at_a)
    blend = [(a, rng.integers(0, 20, size=15), at_a), (b, rng.integers(0, 12, size=9), at_b)]
    single = [(one_shard, rng.integers(0, 20, size=24), None)]
    for parts in (blend, single):
        plan = MicroBatchPlan(parts, size=24, micro_batch_size=4, sample_ids=ids)
        assert len(plan) == 6 and (plan._only is None) == (parts is blend)
        want = expected_plan(parts, 24)
        assert (want["sent_start"] & ~want["doc_start"]).any()  # the masks differ
        for m in range(6):
            micro = plan.micro_batch(m)
            assert micro["sample_ids"].tolist() == ids[4 * m : 4 * m + 4].tolist()
            for key, value in want.items():
                assert torch.equal(micro[key], value[4 * m : 4 * m + 4]), (m, key)
    with pytest.raises(IndexError, match="micro-batch 6 of a plan of 6"):
        plan.micro_batch(6)
    with pytest.raises(ValueError, match="24 planned rows do not split into micro-batches of 5"):
        MicroBatchPlan(blend, size=24, micro_batch_size=5)


def test_gather_batch_marks_document_and_sentence_starts(tmp_path):
    rng = np.random.default_rng(3)
    rows, docs, sents = hand_made(rng)
    # The stored sentence lists leave out the document starts: reading adds them.
    sents_only = [sorted(set(s) - set(d)) for s, d in zip(sents, docs, strict=True)]
    v2 = PackedDataset(
        write_corpus(tmp_path / "v2", rows, docs, sents_only, rows_per_batch=4, rows_per_shard=12)
    )
    v1 = PackedDataset(
        write_corpus(tmp_path / "v1", rows, docs, None, rows_per_batch=5, rows_per_shard=10)
    )
    assert v2.has_sentences and not v1.has_sentences
    doc_mask, sent_mask = as_mask(docs, 12), as_mask(sents, 12)
    assert (sent_mask != doc_mask).any() and doc_mask.any()  # the test can tell them apart
    for idx in (rng.permutation(len(rows)), rng.integers(0, len(rows), size=9), [5]):
        for ds, want_sent in ((v2, sent_mask), (v1, doc_mask)):
            out = ds.gather_batch(idx)
            assert set(out) == {"tokens", "doc_start", "sent_start"}
            assert out["doc_start"].dtype == out["sent_start"].dtype == torch.bool
            assert np.array_equal(out["tokens"].numpy(), rows[idx].astype(np.int64))
            assert np.array_equal(out["doc_start"].numpy(), doc_mask[idx])
            assert np.array_equal(out["sent_start"].numpy(), want_sent[idx])


def test_document_starts_follow_eos_in_a_prepared_corpus(corpus):
    ds = PackedDataset(corpus)
    out = ds.gather_batch(np.arange(len(ds)))
    tokens, doc = out["tokens"].numpy(), out["doc_start"].numpy()
    after_eos = np.zeros_like(doc)
    after_eos[:, 1:] = tokens[:, :-1] == BYTE.eos_id
    assert np.array_equal(doc[:, 1:], after_eos[:, 1:]) and doc.sum() > 500
    assert torch.equal(out["sent_start"] | out["doc_start"], out["sent_start"])


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
    with pytest.raises(ValueError, match=r"schema_version=7, this reader understands 1 or 2"):
        PackedDataset(corpus_copy)
    edit_manifest(corpus_copy, lambda m: m.update(schema_version=1, rows_per_batch=0))
    with pytest.raises(ValueError, match=r"field 'rows_per_batch'=0"):
        PackedDataset(corpus_copy)
    (corpus_copy / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"copy/manifest\.json is not valid JSON"):
        PackedDataset(corpus_copy)


def test_schema_version_must_match_the_shards(tmp_path):
    rows, docs, sents = hand_made(np.random.default_rng(4), n=8)
    v1 = write_corpus(tmp_path / "v1", rows, docs, None, rows_per_batch=4, rows_per_shard=8)
    edit_manifest(v1, lambda m: m.update(schema_version=2))
    with pytest.raises(ValueError, match=r"shard .*train-00000\.arrow: schema .*schema_version 2"):
        PackedDataset(v1)
    v2 = write_corpus(tmp_path / "v2", rows, docs, sents, rows_per_batch=4, rows_per_shard=8)
    edit_manifest(v2, lambda m: m.update(schema_version=1))
    with pytest.raises(ValueError, match=r"shard .*train-00000\.arrow: schema"):
        PackedDataset(v2)


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


def test_split_total_and_shard_layout_are_checked(tmp_path):
    rows, docs, _ = hand_made(np.random.default_rng(5), n=20)
    path = write_corpus(tmp_path / "c", rows, docs, None, rows_per_batch=4, rows_per_shard=10)
    with pytest.raises(ValueError, match=r"shard train-00000\.arrow has 10 rows, not a multiple"):
        PackedDataset(path)
    edit_manifest(path, lambda m: m.update(rows_per_batch=10))
    with pytest.raises(ValueError, match="record batches"):
        PackedDataset(path)
    edit_manifest(path, lambda m: m["splits"]["train"].update(rows=21))
    with pytest.raises(ValueError, match="shard"):
        PackedDataset(path)


def test_record_batch_sizes_are_checked_before_their_rows_are_used(tmp_path):
    rows, docs, sents = hand_made(np.random.default_rng(7), n=10)
    path = write_corpus(
        tmp_path / "c", rows, docs, sents, rows_per_batch=4, rows_per_shard=10, batch_rows=[3, 5, 2]
    )
    ds = PackedDataset(path)  # the footer agrees: three record batches
    with pytest.raises(ValueError, match=r"00\.arrow: record batch 0 has 3 rows, expected 4"):
        ds.gather([1])
    with pytest.raises(ValueError, match=r"record batch 1 has 5 rows, expected 4"):
        ds.gather_batch([6])
    with pytest.raises(ValueError, match=r"record batch 0 has 3 rows"):
        PackedDataset(path, verify_checksums=True)


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
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"shard .*train-00002\.arrow .* missing"):
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
    bad_row = 77  # in shard 1, record batch 1 (64 rows per batch)

    def poison(rows):
        rows[bad_row, 5] = 400  # vocab is 366

    rewrite_shard(corpus_copy, 1, poison)
    ds = PackedDataset(corpus_copy)
    global_row = 256 + bad_row
    ds.gather([0, 1, 256 + 63, 256 + 128])  # rows of other record batches are fine
    # The first row drawn from the bad record batch reveals it, whichever row that is.
    with pytest.raises(ValueError, match=rf"train-00001\.arrow, row {bad_row} .*token id 400"):
        ds.gather([3, 256 + 64, 5])
    with pytest.raises(ValueError, match=rf"train-00001\.arrow, row {bad_row}"):
        ds[global_row + 3]
    with pytest.raises(ValueError, match=rf"row {bad_row} \(row {global_row} of split"):
        PackedDataset(corpus_copy).gather_batch([global_row - 1])
    with pytest.raises(ValueError, match=rf"train-00001\.arrow, row {bad_row} .*token id 400"):
        PackedDataset(corpus_copy, verify_checksums=True)  # a full check at open


def test_offsets_outside_the_row_name_shard_and_row(tmp_path):
    rows, docs, sents = hand_made(np.random.default_rng(6), n=16)
    sents[9] = [*sents[9], 12]  # rows have 12 tokens
    path = write_corpus(tmp_path / "c", rows, docs, sents, rows_per_batch=4, rows_per_shard=8)
    ds = PackedDataset(path)
    ds.gather_batch([0, 4, 12])
    with pytest.raises(ValueError, match=r"train-00001\.arrow, row 1 .*sent_offsets .* 12"):
        ds.gather_batch([10])


def test_verify_reads_every_batch_once(corpus):
    ds = PackedDataset(corpus)
    assert not ds._checked.any()
    ds.gather([0])
    assert ds._checked.sum() == 1
    ds.verify()
    assert ds._checked.all()


# -- global order -----------------------------------------------------------------------------


def test_sample_order_is_a_deterministic_permutation():
    a = sample_order(1000, seed=5, epoch=3)
    assert np.array_equal(np.sort(a), np.arange(1000))
    assert np.array_equal(a, sample_order(1000, seed=5, epoch=3))
    assert not np.array_equal(a, sample_order(1000, seed=5, epoch=4))
    assert not np.array_equal(a, sample_order(1000, seed=6, epoch=3))


# -- the loader over a single corpus ----------------------------------------------------------


def loader(ds, *, dp_rank=0, dp_size=1, gb=8, mb=2, seed=17, consumed=0):
    return Loader(
        BlendedSamples([ds], [1.0], seed=seed),
        global_batch_size=gb,
        micro_batch_size=mb,
        dp_rank=dp_rank,
        dp_size=dp_size,
        consumed_samples=consumed,
    )


def tokens_of(micro: list[dict]) -> torch.Tensor:
    return torch.cat([m["tokens"] for m in micro])


def global_step(loaders) -> torch.Tensor:
    """One step of every rank, concatenated in rank order: the global batch."""
    return torch.cat([tokens_of(ld.next_batch()) for ld in loaders])


def test_ranks_together_read_the_single_rank_batch(corpus):
    ds = PackedDataset(corpus)
    single = loader(ds, gb=16, mb=4)
    ranks = [loader(ds, dp_rank=r, dp_size=4, gb=16, mb=2) for r in range(4)]
    for step in range(3):
        micro = ranks[0].next_batch()
        assert len(micro) == 2
        for i, m in enumerate(micro):
            assert set(m) == {"tokens", "sample_ids", "doc_start", "sent_start"}
            assert m["tokens"].shape == (2, 16) and m["tokens"].dtype == torch.int64
            assert m["sample_ids"].tolist() == [16 * step + 2 * i, 16 * step + 2 * i + 1]
        ours = torch.cat([tokens_of(micro)] + [tokens_of(ld.next_batch()) for ld in ranks[1:]])
        assert torch.equal(ours, tokens_of(single.next_batch()))
    assert single.consumed_samples == ranks[3].consumed_samples == 48


def test_an_epoch_visits_every_row_once(small):
    ds = PackedDataset(small)
    n = len(ds)
    ld = loader(ds, gb=1, mb=1)
    seen = torch.cat([ld.next_batch()[0]["tokens"] for _ in range(n)])
    assert torch.equal(seen, ds.gather(sample_order(n, seed=17, epoch=0)))
    assert ld.epoch == 1 and ld.datasets[0] is ds


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
    assert state["consumed_samples"] == k * gb
    assert set(state) == {"consumed_samples", "seed", "fingerprint"}
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
        loader(PackedDataset(small)).load_state_dict({"seed": 17, "fingerprint": "x"})


def test_state_without_a_fingerprint_is_refused(small):
    ds = PackedDataset(small)
    old = {"consumed_samples": 24, "seed": 17, "dataset_fingerprint": ds.fingerprint}
    with pytest.raises(ValueError, match="data loader state has no 'fingerprint'"):
        loader(ds).load_state_dict(old)


def test_batch_sizes_are_validated(small):
    ds = PackedDataset(small)
    with pytest.raises(ValueError, match=r"global_batch_size=10 must be divisible by .* = 4"):
        loader(ds, gb=10, mb=2, dp_size=2)
    with pytest.raises(ValueError, match="dp_rank"):
        loader(ds, dp_rank=2, dp_size=2)
