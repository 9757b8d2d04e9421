"""Data errors a user can fix are DataError / ConfigError with one line naming the file (and
shard and row, or the config field); corpora without a validation split; how
launch/prepare_data.py reports errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from common.errors import CheckpointError, ConfigError, DataError
from data_pipeline.corpus_format import has_split
from data_pipeline.dataset import PackedDataset
from data_pipeline.loader import build_loader
from data_pipeline.prepare import prepare_corpus
from tests.unit.test_dataset import edit_manifest, prepare, random_docs, rewrite_shard

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return prepare(tmp_path_factory.mktemp("errors") / "corpus", docs=200, seed=4)


@pytest.fixture
def copy(corpus, tmp_path) -> Path:
    return Path(shutil.copytree(corpus, tmp_path / "copy"))


@pytest.fixture(scope="module")
def no_val(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("errors") / "no_val"
    prepare_corpus(random_docs(60, seed=5), out, tokenizer_spec="byte", seq_len=15, val_fraction=0)
    return out


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location("prepare_cli", REPO / "launch/prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_line_error(kind, match: str, call, *args, **kwargs):
    with pytest.raises(kind, match=match) as info:
        call(*args, **kwargs)
    assert "\n" not in str(info.value), str(info.value)
    return info.value


# -- missing or damaged corpora --------------------------------------------------------------


def test_a_missing_corpus_names_the_manifest_and_the_field(tmp_path):
    err = one_line_error(
        DataError,
        r"nowhere/manifest\.json not found: .* does not exist",
        PackedDataset,
        tmp_path / "nowhere",
    )
    assert isinstance(err, FileNotFoundError) and "data.path" in str(err)
    (tmp_path / "empty").mkdir()
    err = one_line_error(
        DataError,
        r"empty/manifest\.json not found: .* holds no corpus",
        PackedDataset,
        tmp_path / "empty",
    )
    assert "data.path (or data.sources)" in str(err)
    loader_args = dict(global_batch_size=2, micro_batch_size=2, dp_rank=0, dp_size=1, seed=0)
    one_line_error(
        DataError, "nowhere", build_loader, [(str(tmp_path / "nowhere"), 1.0)], **loader_args
    )
    with pytest.raises(DataError, match="nowhere"):
        has_split(tmp_path / "nowhere", "train")


def test_a_shard_that_does_not_match_the_manifest_names_the_shard(copy):
    def edit(m):
        m["splits"]["train"]["shards"][0]["bytes"] += 1

    edit_manifest(copy, edit)
    one_line_error(
        DataError,
        r"shard .*train-00000\.arrow has \d+ bytes, the manifest says",
        PackedDataset,
        copy,
    )


def test_a_truncated_shard_names_the_shard(copy):
    shard = copy / "train-00001.arrow"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 3])
    edit_manifest(copy, lambda m: m["splits"]["train"]["shards"][1].update(bytes=len(data) // 3))
    one_line_error(
        DataError,
        r"shard .*train-00001\.arrow is not a readable Arrow IPC file",
        PackedDataset,
        copy,
    )
    shard.unlink()
    err = one_line_error(
        DataError,
        r"shard .*train-00001\.arrow listed in the manifest is missing",
        PackedDataset,
        copy,
    )
    assert isinstance(err, FileNotFoundError)


def test_a_bad_row_names_shard_and_row(copy):
    def poison(rows):
        rows[3, 2] = 9999

    rewrite_shard(copy, 0, poison)
    ds = PackedDataset(copy)
    one_line_error(
        DataError,
        r"train-00000\.arrow, row 3 \(row 3 of split 'train'\): token id 9999",
        ds.gather,
        [3],
    )


def test_a_damaged_manifest_or_tokenizer_entry_is_a_data_error(copy):
    edit_manifest(copy, lambda m: m.update(dtype="float32"))
    one_line_error(DataError, r"manifest\.json: field 'dtype'='float32'", PackedDataset, copy)
    edit_manifest(
        copy, lambda m: m.update(dtype="uint16", tokenizer={"kind": "bpe", "file": "t.json"})
    )
    err = one_line_error(
        DataError,
        r"tokenizer file .*t\.json named by the manifest is missing",
        lambda: PackedDataset(copy).tokenizer,
    )
    assert isinstance(err, FileNotFoundError)


def test_a_split_the_corpus_lacks_is_named(corpus):
    one_line_error(
        DataError,
        r"manifest\.json: no split 'test' \(the manifest has \['train', 'val'\]\)",
        PackedDataset,
        corpus,
        "test",
    )


# -- corpora without a validation split --------------------------------------------------------


def test_val_fraction_zero_writes_no_validation_split(no_val):
    manifest = json.loads((no_val / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["train"] and manifest["val_fraction"] == 0
    assert manifest["documents"] == manifest["splits"]["train"]["documents"] == 60
    assert not list(no_val.glob("val-*"))
    assert has_split(no_val, "train") and not has_split(no_val, "val")
    assert len(PackedDataset(no_val)) == manifest["splits"]["train"]["rows"] > 0
    err = one_line_error(
        DataError,
        r"manifest\.json: the corpus has no validation split",
        PackedDataset,
        no_val,
        "val",
    )
    assert "trainer.eval_every=0" in str(err) and "--val-fraction > 0" in str(err)


def test_has_split_is_false_for_an_empty_split(tmp_path, corpus):
    one = prepare_corpus(["x" * 50], tmp_path / "one", tokenizer_spec="byte", seq_len=7)
    assert one["splits"]["val"]["rows"] == 0
    assert not has_split(tmp_path / "one", "val") and has_split(tmp_path / "one", "train")
    assert has_split(corpus, "val") and not has_split(corpus, "test")


def test_a_loader_state_that_does_not_fit_is_a_checkpoint_error(corpus, no_val):
    args = dict(global_batch_size=2, micro_batch_size=2, dp_rank=0, dp_size=1)
    state = build_loader([(str(corpus), 1.0)], seed=1, **args).state_dict()
    with pytest.raises(CheckpointError, match="seed=1") as info:
        build_loader([(str(corpus), 1.0)], seed=2, **args).load_state_dict(state)
    assert isinstance(info.value, ValueError)
    with pytest.raises(CheckpointError, match="the data changed"):
        build_loader([(str(no_val), 1.0)], seed=1, **args).load_state_dict(state)


# -- launch/prepare_data.py --------------------------------------------------------------------


def run(cli, capsys, tmp_path: Path, *extra: str) -> tuple[int, str, str]:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in random_docs(40, seed=6)))
    args = ["--input", str(src), "--output", str(tmp_path / "out"), "--tokenizer", "byte"]
    code = cli.main([*args, "--quiet", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_accepts_val_fraction_zero(cli, capsys, tmp_path):
    code, out, err = run(cli, capsys, tmp_path, "--seq-len", "16", "--val-fraction", "0")
    assert code == 0, err
    assert "val  : none (--val-fraction 0); train with trainer.eval_every=0" in out
    assert not has_split(tmp_path / "out", "val")


def test_cli_reports_a_loom_error_as_one_line_with_exit_code_2(cli, capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("LOOM_DEBUG", raising=False)
    code, out, err = run(cli, capsys, tmp_path, "--seq-len", "0")
    assert code == 2 and out == ""
    assert err == "prepare_data: error: seq_len (--seq-len) = 0 must be a positive integer\n"
    code, _, err = run(cli, capsys, tmp_path, "--seq-len", "8", "--val-fraction", "1")
    assert code == 2 and "val_fraction (--val-fraction) = 1.0 must be in [0, 1)" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
    monkeypatch.setenv("LOOM_DEBUG", "1")
    with pytest.raises(ConfigError, match="seq_len"):
        run(cli, capsys, tmp_path, "--seq-len", "0")
