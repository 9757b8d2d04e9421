"""Corpus preparation on bad input: each case is a clear error naming the file and line/row (or
a counted, reported skip), and never leaves a partial output directory behind."""

from __future__ import annotations

import errno
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline import documents as documents_mod
from data_pipeline.documents import read_documents
from data_pipeline.prepare import prepare_corpus

REPO = Path(__file__).resolve().parents[2]
GOOD = [f"document {i}. It has two sentences!" for i in range(30)]


@pytest.fixture(scope="module")
def cli():
    spec = importlib.util.spec_from_file_location(
        "prepare_data_cli", REPO / "launch" / "prepare_data.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(cli, capsys, inputs: list[Path], out: Path, *extra: str) -> tuple[int, str, str]:
    args = ["--input", *map(str, inputs), "--output", str(out), "--tokenizer", "byte"]
    code = cli.main([*args, "--seq-len", "8", "--quiet", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def nothing_left(directory: Path, *keep: str) -> bool:
    """Only the inputs remain: no output and no temporary directory."""
    return sorted(p.name for p in directory.iterdir()) == sorted(keep)


def invalid_utf8_strings(values: list[bytes]) -> pa.Array:
    """A string array holding arbitrary bytes (pyarrow does not check them when building)."""
    offsets = np.cumsum([0, *map(len, values)]).astype(np.int32)
    buffers = [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))]
    return pa.Array.from_buffers(pa.string(), len(values), buffers)


# ---------------------------------------------------------------------------------------------
# Unreadable files


def test_file_that_cannot_be_opened_is_named(tmp_path, cli, capsys):
    good, gone = write_jsonl(tmp_path / "a.jsonl", GOOD), write_jsonl(tmp_path / "b.jsonl", GOOD)
    docs = read_documents([good, gone])
    gone.unlink()  # vanishes between listing and reading
    with pytest.raises(OSError, match=r"input .*b\.jsonl cannot be read: No such file"):
        prepare_corpus(docs, tmp_path / "out", tokenizer_spec="byte", seq_len=8)
    assert nothing_left(tmp_path, "a.jsonl")
    code, _, err = run_cli(cli, capsys, [tmp_path / "b.jsonl"], tmp_path / "out")
    assert code == 1 and "b.jsonl does not exist" in err


def test_file_without_read_permission_is_named(tmp_path, cli, capsys, monkeypatch):
    path = write_jsonl(tmp_path / "secret.jsonl", GOOD)
    path.chmod(0)
    if os.geteuid() == 0:  # root reads any file: refuse it the way the kernel does for others
        real_open = open

        def refusing_open(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(errno.EACCES, "Permission denied", str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(documents_mod, "open", refusing_open, raising=False)
    code, _, err = run_cli(cli, capsys, [path], tmp_path / "out")
    assert code == 1 and "secret.jsonl cannot be read: Permission denied" in err
    assert nothing_left(tmp_path, "secret.jsonl")


def test_corrupt_parquet_is_named(tmp_path, cli, capsys):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet at all")
    code, _, err = run_cli(cli, capsys, [bad], tmp_path / "out")
    assert code == 1 and "broken.parquet: not a readable Parquet file" in err
    assert nothing_left(tmp_path, "broken.parquet")


# ---------------------------------------------------------------------------------------------
# Empty corpus, missing text key


def test_empty_corpus_is_an_error(tmp_path, cli, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "blank.txt").write_text("  \n\n\t ")
    write_jsonl(tmp_path / "in" / "empty.jsonl", ["", " "])
    (tmp_path / "in" / "nothing.jsonl").write_bytes(b"")
    code, _, err = run_cli(cli, capsys, [tmp_path / "in"], tmp_path / "out")
    assert code == 1 and "empty corpus: no non-empty documents" in err and "(3 empty)" in err
    assert nothing_left(tmp_path, "in")


def test_missing_text_key_names_file_and_line_or_column(tmp_path, cli, capsys):
    src = tmp_path / "data.jsonl"
    src.write_text('{"text": "fine"}\n{"body": "where is the text"}\n', encoding="utf-8")
    code, _, err = run_cli(cli, capsys, [src], tmp_path / "out")
    assert code == 1 and "data.jsonl, line 2: no field 'text' (fields: 'body')" in err
    assert "--text-key" in err

    table = tmp_path / "table.parquet"
    pq.write_table(pa.table({"body": GOOD}), table)
    code, _, err = run_cli(cli, capsys, [table], tmp_path / "out")
    assert code == 1 and "table.parquet: no column 'text'" in err and "--text-key" in err
    assert run_cli(cli, capsys, [table], tmp_path / "out", "--text-key", "body")[0] == 0


# ---------------------------------------------------------------------------------------------
# Text that is not UTF-8


def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    """One input of every kind, each with exactly one document that is not UTF-8."""
    whole = tmp_path / "whole.txt"
    whole.write_bytes(b"first line\nsecond \xff line\n")
    lines = tmp_path / "lines.txt"
    lines.write_bytes(b"ok one\nok two\nbad \xc3\x28 three\nok four\n")
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "bad \xfe"}\n')
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_bytes(b'{"text": "ok \\u00e9"}\n{"text": "lone \\ud800 half"}\n')
    table = tmp_path / "table.parquet"
    pq.write_table(pa.table({"text": invalid_utf8_strings([b"good", b"be\x80d", b"fine"])}), table)
    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    return {
        "whole": whole,
        "lines": lines,
        "jsonl": jsonl,
        "surrogate": surrogate,
        "parquet": table,
        "good": good,
    }


@pytest.mark.parametrize(
    ("kind", "where"),
    [
        ("whole", r"whole\.txt, line 2 \(byte offset 18\)"),
        ("lines", r"lines\.txt, line 3"),
        ("jsonl", r"data\.jsonl, line 3"),
        ("surrogate", r"surrogate\.jsonl, line 2 \(a lone surrogate escape\)"),
        ("parquet", r"table\.parquet, row 1"),
    ],
)
def test_bad_utf8_is_an_error_naming_file_and_line(tmp_path, kind, where):
    path = bad_inputs(tmp_path)[kind]
    docs = read_documents(path, split_lines=kind == "lines")
    with pytest.raises(ValueError, match=where + ": not valid UTF-8.*--on-bad-utf8 skip"):
        prepare_corpus(docs, tmp_path / "out", tokenizer_spec="byte", seq_len=4)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_utf8_skip_counts_per_file_in_manifest_and_summary(tmp_path, cli, capsys):
    paths = bad_inputs(tmp_path)
    order = [paths[k] for k in ("good", "whole", "jsonl", "surrogate", "parquet")]
    code, out, err = run_cli(cli, capsys, order, tmp_path / "out", "--on-bad-utf8", "skip")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    skipped = {str(p): 1 for p in order[1:]}
    assert manifest["skipped_bad_utf8"] == skipped
    # good.jsonl 30, data.jsonl 2, surrogate.jsonl 1, table.parquet 2; whole.txt is left out
    assert manifest["documents"] == 35
    for path in order[1:]:
        assert f"skipped 1 documents that are not valid UTF-8 in {path}" in out

    reader = read_documents(paths["lines"], split_lines=True, on_bad_utf8="skip")
    assert list(reader) == ["ok one", "ok two", "ok four"]
    assert reader.bad_utf8 == {str(paths["lines"]): 1}
    assert list(reader) == ["ok one", "ok two", "ok four"]  # a second pass counts afresh
    assert reader.bad_utf8 == {str(paths["lines"]): 1}
    with pytest.raises(ValueError, match=r"on_bad_utf8 \(--on-bad-utf8\) = 'ignore'"):
        read_documents(paths["good"], on_bad_utf8="ignore")


def test_a_corpus_of_only_bad_utf8_says_so(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "\xff"}\n{"text": "\xfe"}\n')
    with pytest.raises(ValueError, match=r"empty corpus.*2 skipped as not UTF-8"):
        prepare_corpus(
            read_documents(bad, on_bad_utf8="skip"),
            tmp_path / "o",
            tokenizer_spec="byte",
            seq_len=4,
        )


# ---------------------------------------------------------------------------------------------
# Vocabulary too large for the token type


@pytest.fixture(scope="module")
def big_vocab(tmp_path_factory) -> str:
    """A word-level tokenizer.json with 70,000 words: ids beyond uint16."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("big") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


def test_uint16_with_a_large_vocabulary_is_an_error_naming_both(tmp_path, big_vocab, cli, capsys):
    docs = [f"w{i} w{69_999 - i} w65536 w3" for i in range(40)]
    expected_vocab = 70_001 + 109  # all reserved tokens but [UNK] are appended
    with pytest.raises(
        ValueError, match=rf"uint16 holds ids 0..65535.*vocab_size is {expected_vocab}"
    ):
        prepare_corpus(docs, tmp_path / "a", tokenizer_spec=big_vocab, seq_len=8, dtype="uint16")
    assert nothing_left(tmp_path)

    m = prepare_corpus(docs, tmp_path / "b", tokenizer_spec=big_vocab, seq_len=8)  # auto
    assert m["dtype"] == "int32" and m["vocab_size"] == expected_vocab
    shard = pa.ipc.open_file(str(tmp_path / "b" / m["splits"]["train"]["shards"][0]["file"]))
    tokens = shard.read_all().column("tokens").combine_chunks().flatten().to_numpy()
    eos = m["eos_id"]
    assert eos == 70_001 and tokens.dtype == np.int32 and tokens.max() == eos  # ids kept whole
    assert 70_000 in tokens and 65_537 in tokens  # "w69999", "w65536"

    src = write_jsonl(tmp_path / "in.jsonl", docs)
    code, _, err = run_cli(
        cli, capsys, [src], tmp_path / "c", "--tokenizer", big_vocab, "--dtype", "uint16"
    )
    assert code == 1 and "uint16" in err and str(expected_vocab) in err
    with pytest.raises(ValueError, match=r"dtype \(--dtype\) = 'int8' is unknown"):
        prepare_corpus(docs, tmp_path / "d", tokenizer_spec="byte", seq_len=8, dtype="int8")


# ---------------------------------------------------------------------------------------------
# Failures with worker processes


def test_failures_in_worker_runs_leave_nothing_behind(tmp_path):
    good = write_jsonl(tmp_path / "a.jsonl", GOOD * 40)
    bad = tmp_path / "z.jsonl"
    bad.write_bytes(b'{"text": "fine"}\n{"text": "broken \xff"}\n')
    with pytest.raises(ValueError, match=r"z\.jsonl, line 2: not valid UTF-8"):
        prepare_corpus(
            read_documents([good, bad]),
            tmp_path / "out",
            tokenizer_spec="byte",
            seq_len=8,
            workers=2,
        )
    assert nothing_left(tmp_path, "a.jsonl", "z.jsonl")

    docs: list = [*GOOD[:5], b"bytes, not text", *GOOD[5:]]
    with pytest.raises(TypeError, match="document 5 is bytes, not str"):
        prepare_corpus(docs, tmp_path / "out", tokenizer_spec="byte", seq_len=8, workers=2)
    assert nothing_left(tmp_path, "a.jsonl", "z.jsonl")
    with pytest.raises(ValueError, match=r"workers \(--workers\) = 0"):
        prepare_corpus(GOOD, tmp_path / "out", tokenizer_spec="byte", seq_len=8, workers=0)
