"""Corpus preparation: packing, sentences, manifest, splits, input reading, worker processes,
progress, the CLI and the sample corpus. (Bad input: test_prepare_bad_input.py.)"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from data_pipeline import encoding as encoding_mod
from data_pipeline import prepare as prepare_mod
from data_pipeline import sample_corpus
from data_pipeline.corpus_format import shard_schema, token_dtype
from data_pipeline.documents import read_documents, split_sentences
from data_pipeline.prepare import (
    CorpusExistsError,
    ProgressPrinter,
    prepare_corpus,
    validation_score,
)
from data_pipeline.tokenizers import ByteTokenizer

REPO = Path(__file__).resolve().parents[2]
EOS = ByteTokenizer().eos_id


def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = [
        "alpha",
        "beta",
        "gamma",
        "delta",
        "epsilon",
        "zeta",
        "eta",
        "theta",
        "iota",
        "kappa",
        "lambda",
        "mu",
    ]
    return [f"doc{i} " + " ".join(rng.choices(words, k=rng.randint(1, 30))) for i in range(n)]


def read_split(
    out: Path, manifest: dict, split: str, column: str = "doc_offsets"
) -> tuple[np.ndarray, list[list[int]]]:
    """All rows of a split ([rows, sample_len]) and their doc_offsets (or another offsets
    column), read with plain pyarrow."""
    rows, offsets = [], []
    for shard in manifest["splits"][split]["shards"]:
        table = pa.ipc.open_file(pa.memory_map(str(out / shard["file"]))).read_all()
        tokens = table.column("tokens").combine_chunks()
        rows.append(tokens.flatten().to_numpy().reshape(-1, manifest["sample_len"]))
        offsets += table.column(column).to_pylist()
    empty = np.zeros((0, manifest["sample_len"]), dtype=np.int64)
    return (np.concatenate(rows) if rows else empty), offsets


def expected_stream(docs: list[str]) -> list[int]:
    stream: list[int] = []
    for d in docs:
        stream += list(d.encode("utf-8")) + [EOS]
    return stream


def split_of(docs: list[str], seed: int, fraction: float) -> dict[str, list[str]]:
    val = [d for i, d in enumerate(docs) if validation_score(i, seed) < fraction]
    train = [d for i, d in enumerate(docs) if validation_score(i, seed) >= fraction]
    assert val and train, "pick a seed that puts documents in both splits"
    return {"train": train, "val": val}


def test_rows_are_the_documents_concatenated_with_eos(tmp_path):
    docs, seed, frac = make_docs(60), 7, 0.2
    out = tmp_path / "corpus"
    manifest = prepare_corpus(
        docs,
        out,
        tokenizer_spec="byte",
        seq_len=15,
        val_fraction=frac,
        seed=seed,
        rows_per_batch=4,
        max_rows_per_shard=12,
    )
    L = manifest["sample_len"]
    for split, split_docs in split_of(docs, seed, frac).items():
        rows, _ = read_split(out, manifest, split)
        stream = expected_stream(split_docs)
        n_rows = len(stream) // L
        assert rows.shape == (n_rows, L)
        assert rows.reshape(-1).tolist() == stream[: n_rows * L]
        entry = manifest["splits"][split]
        assert entry["rows"] == n_rows and entry["tokens"] == n_rows * L
        assert entry["dropped_tokens"] == len(stream) - n_rows * L
        assert entry["documents"] == len(split_docs)
    train_shards = manifest["splits"]["train"]["shards"]
    assert len(train_shards) > 1 and all(s["rows"] == 12 for s in train_shards[:-1])


def test_manifest_fields_and_counts_add_up(tmp_path):
    docs = make_docs(80)
    out = tmp_path / "corpus"
    m = prepare_corpus(
        docs,
        out,
        tokenizer_spec="byte",
        seq_len=31,
        val_fraction=0.1,
        seed=3,
        rows_per_batch=8,
        max_rows_per_shard=16,
        source_desc="unit test",
    )
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["schema_version"] == 2 and m["created_by"] == "loom" and m["source"] == "unit test"
    assert m["tokenizer"] == ByteTokenizer().identity()
    assert (m["vocab_size"], m["eos_id"], m["pad_id"]) == (366, EOS, EOS + 1)
    assert (m["seq_len"], m["sample_len"], m["dtype"], m["rows_per_batch"]) == (31, 32, "uint16", 8)
    assert m["documents"] == 80 == sum(s["documents"] for s in m["splits"].values())
    assert m["sentences"] == sum(len(split_sentences(d)) for d in docs)
    assert m["sentence_splitter"] == "punct-newline-v1"
    assert m["skipped_bad_utf8"] == {} and m["skipped_empty_documents"] == 0
    all_tokens = sum(len(d.encode()) + 1 for d in docs)
    written = sum(s["tokens"] for s in m["splits"].values())
    assert written + m["dropped_tokens"] == all_tokens
    for split in m["splits"].values():
        assert split["rows"] == sum(s["rows"] for s in split["shards"])
        assert split["tokens"] == sum(s["tokens"] for s in split["shards"]) == split["rows"] * 32
        # documents starting in the rows, plus any whose start fell in the dropped tail
        assert sum(s["documents"] for s in split["shards"]) <= split["documents"]
        for shard in split["shards"]:
            path = out / shard["file"]
            assert path.stat().st_size == shard["bytes"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            sizes = [reader.get_batch(b).num_rows for b in range(reader.num_record_batches)]
            assert all(n == 8 for n in sizes[:-1]) and sum(sizes) == shard["rows"]
            assert reader.schema.field("tokens").type == pa.list_(pa.uint16(), 32)
            assert reader.schema.field("doc_offsets").type == pa.list_(pa.int32())
            assert reader.schema.field("sent_offsets").type == pa.list_(pa.int32())
            assert reader.schema.equals(shard_schema(np.dtype(np.uint16), 32))
            sents = reader.read_all().column("sent_offsets").to_pylist()
            assert shard["sentences"] == sum(map(len, sents))
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".arrow")) == [
        "manifest.json"
    ]


def test_doc_offsets_on_a_hand_made_corpus(tmp_path):
    # byte tokens + eos: "abc"->4, "de"->3, "fghij"->6, "k"->2, "lmnopqrstu"->11; rows of 4
    docs = ["abc", "de", "fghij", "k", "lmnopqrstu"]
    seed = next(s for s in range(1000) if all(validation_score(i, s) >= 0.5 for i in range(5)))
    # all five fall into train; the split rule then moves the one closest to val (tested below)
    moved = min(range(5), key=lambda i: validation_score(i, seed))
    out = tmp_path / "c"
    m = prepare_corpus(docs, out, tokenizer_spec="byte", seq_len=3, val_fraction=0.5, seed=seed)
    train_docs = [d for i, d in enumerate(docs) if i != moved]
    rows, offsets = read_split(out, m, "train")
    stream = expected_stream(train_docs)
    starts, pos = [], 0
    for d in train_docs:
        starts.append(pos)
        pos += len(d) + 1
    assert rows.reshape(-1).tolist() == stream[: len(rows) * 4]
    assert offsets == [
        [s - 4 * r for s in starts if 4 * r <= s < 4 * r + 4] for r in range(len(rows))
    ]
    val_rows, _ = read_split(out, m, "val")
    assert m["splits"]["val"]["documents"] == 1
    assert m["splits"]["val"]["rows"] == len(val_rows) == (len(docs[moved]) + 1) // 4

    # A literal hand check on one layout: "abc<eos>" "de<eos>f" ...
    out2 = tmp_path / "c2"
    m2 = prepare_corpus(["abc", "de", "fghij"] * 20, out2, tokenizer_spec="byte", seq_len=3)
    rows2, offsets2 = read_split(out2, m2, "train")
    assert rows2[0].tolist() == [97, 98, 99, EOS] and offsets2[0] == [0]


@pytest.mark.parametrize(
    ("text", "sentences"),
    [
        ("Hi there. How? Fine!  Thanks.", ["Hi there.", " How?", " Fine!", "  Thanks."]),
        ("Title\n\nFirst para. Second\nline", ["Title", "\n\nFirst para.", " Second", "\nline"]),
        ('He said "stop." Then (he left.) Ok', ['He said "stop."', " Then (he left.)", " Ok"]),
        ("\n\n  Lead. x", ["\n\n  Lead.", " x"]),  # leading space stays with the first
        ("Wait... what?! ok", ["Wait...", " what?!", " ok"]),
        ("3.14 is pi.", ["3.14 is pi."]),  # no space after the point: no break
        ("e.g. this", ["e.g.", " this"]),  # the rule is simple on purpose
        ("a\r\nb", ["a", "\r\nb"]),
        ("trailing. \n", ["trailing. \n"]),
        ("   ", ["   "]),
    ],
)  # fmt: skip
def test_split_sentences_rule(text, sentences):
    assert split_sentences(text) == sentences
    assert "".join(split_sentences(text)) == text


def test_sent_offsets_on_a_hand_made_corpus(tmp_path):
    # seed 12 keeps documents 0 and 1 in train and sends 2 to val (val_fraction 0.5)
    assert [validation_score(i, 12) < 0.5 for i in range(3)] == [False, False, True]
    docs = ["Hi. Yo!\nOk", "A b. C", "held out. for validation"]
    out = tmp_path / "c"
    m = prepare_corpus(docs, out, tokenizer_spec="byte", seq_len=7, val_fraction=0.5, seed=12)
    # train stream: H i . _ Y o ! \n O k <eos> A _ b . _ C <eos>   (rows of 8: "C<eos>" dropped)
    #               0 1 2 3 4 5 6 7  8 9 10    11 ...  14  16 17
    # sentences: "Hi." 0, " Yo!" 3, "\nOk" 7 | "A b." 11, " C" 15
    rows, doc_offsets = read_split(out, m, "train")
    _, sent_offsets = read_split(out, m, "train", column="sent_offsets")
    assert ByteTokenizer().decode(rows.reshape(-1)) == "Hi. Yo!\nOk<eos>A b. "
    assert doc_offsets == [[0], [3]]
    assert sent_offsets == [[0, 3, 7], [3, 7]]
    assert m["splits"]["train"]["sentences"] == 5 and m["sentences"] == 7
    assert [s["sentences"] for s in m["splits"]["train"]["shards"]] == [5]


def test_sent_offsets_follow_the_sentences_across_batches_and_shards(tmp_path):
    rng = random.Random(3)
    words = ["alpha", "beta.", "gamma!", "delta?", "eps\n", "zeta", '"eta."']
    docs = [" ".join(rng.choices(words, k=rng.randint(1, 40))) for _ in range(150)]
    out = tmp_path / "c"
    m = prepare_corpus(
        docs, out, tokenizer_spec="byte", seq_len=15, rows_per_batch=4, max_rows_per_shard=8
    )
    L = m["sample_len"]
    for split, split_docs in split_of(docs, 1234, 0.05).items():
        starts, doc_starts, pos = [], [], 0
        for d in split_docs:
            doc_starts.append(pos)
            for sentence in split_sentences(d):
                starts.append(pos)
                pos += len(sentence.encode())
            pos += 1  # <eos>
        rows, sent_offsets = read_split(out, m, split, column="sent_offsets")
        _, doc_offsets = read_split(out, m, split)
        expected = [
            [s - L * r for s in starts if L * r <= s < L * (r + 1)] for r in range(len(rows))
        ]
        assert sent_offsets == expected
        for r, offsets in enumerate(doc_offsets):  # every document start is a sentence start
            assert set(offsets) <= set(sent_offsets[r])
        assert len(m["splits"][split]["shards"]) > 1 or split == "val"
        assert m["splits"][split]["sentences"] == len(starts)


def test_worker_count_does_not_change_the_output(tmp_path, monkeypatch):
    monkeypatch.setattr(encoding_mod, "_CHUNK_DOCS", 16)  # many chunks in flight at once
    docs = make_docs(300, seed=9)
    docs[7] = "spelled specials: [MASK] <eos> [sMASK]. Next sentence!"
    docs[8] = "   "
    src = tmp_path / "in.jsonl"
    lines = [json.dumps({"text": d}).encode() for d in docs] + [b'{"text": "bad \xff"}']
    src.write_bytes(b"\n".join(lines) + b"\n")
    manifests, files = [], []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}"
        manifests.append(
            prepare_corpus(
                read_documents(src, on_bad_utf8="skip"),
                out,
                tokenizer_spec="bpe:400",
                seq_len=31,
                rows_per_batch=4,
                max_rows_per_shard=8,
                workers=workers,
            )
        )
        data = [p for p in out.iterdir() if p.name != "manifest.json"]  # it holds created_at
        files.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in data})
    a, b = manifests
    assert files[0] == files[1] and len(files[0]) > 4 and "tokenizer.json" in files[0]
    del a["created_at"], b["created_at"]
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert a["skipped_empty_documents"] == 1 and a["skipped_bad_utf8"] == {str(src): 1}


def test_split_is_deterministic_and_disjoint(tmp_path):
    docs = make_docs(100, seed=5)
    a = prepare_corpus(docs, tmp_path / "a", tokenizer_spec="byte", seq_len=7, seed=11)
    b = prepare_corpus(docs, tmp_path / "b", tokenizer_spec="byte", seq_len=7, seed=11)
    c = prepare_corpus(docs, tmp_path / "c", tokenizer_spec="byte", seq_len=7, seed=12)
    shas = lambda m: [s["sha256"] for sp in m["splits"].values() for s in sp["shards"]]  # noqa: E731
    assert shas(a) == shas(b) and shas(a) != shas(c)

    def texts(out, m, split):
        rows, _ = read_split(out, m, split)
        tok = ByteTokenizer()
        return set(tok.decode(rows.reshape(-1)).split("<eos>")[:-1])  # last may be cut

    train, val = texts(tmp_path / "a", a, "train"), texts(tmp_path / "a", a, "val")
    assert val and train and not (train & val)
    expected_val = {d for i, d in enumerate(docs) if validation_score(i, 11) < 0.05}
    assert val <= expected_val


def test_every_split_gets_a_document(tmp_path):
    one = prepare_corpus(["x" * 50], tmp_path / "one", tokenizer_spec="byte", seq_len=7)
    assert (one["splits"]["train"]["documents"], one["splits"]["val"]["documents"]) == (1, 0)
    two = prepare_corpus(["x" * 50, "y" * 50], tmp_path / "two", tokenizer_spec="byte", seq_len=7)
    assert (two["splits"]["train"]["documents"], two["splits"]["val"]["documents"]) == (1, 1)


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "corpus"
    prepare_corpus(make_docs(10), out, tokenizer_spec="byte", seq_len=7)
    with pytest.raises(CorpusExistsError, match=str(out)):
        prepare_corpus(make_docs(10), out, tokenizer_spec="byte", seq_len=7)
    m = prepare_corpus(make_docs(20), out, tokenizer_spec="byte", seq_len=7, overwrite=True)
    assert m["documents"] == 20
    assert json.loads((out / "manifest.json").read_text())["documents"] == 20
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]  # no temporary leftovers
    (tmp_path / "empty").mkdir()  # an empty directory is fine to fill
    prepare_corpus(make_docs(10), tmp_path / "empty", tokenizer_spec="byte", seq_len=7)


def test_a_failure_leaves_nothing_behind(tmp_path):
    def docs():
        yield from make_docs(30)
        raise RuntimeError("input broke")

    with pytest.raises(RuntimeError, match="input broke"):
        prepare_corpus(docs(), tmp_path / "corpus", tokenizer_spec="byte", seq_len=7)
    assert list(tmp_path.iterdir()) == []


def test_empty_corpus_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        prepare_corpus([], tmp_path / "a", tokenizer_spec="byte", seq_len=7)
    with pytest.raises(ValueError, match="empty corpus"):
        prepare_corpus(["", "  \n"], tmp_path / "b", tokenizer_spec="byte", seq_len=7)
    with pytest.raises(ValueError, match="too small"):
        prepare_corpus(["ab"], tmp_path / "c", tokenizer_spec="byte", seq_len=7)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="seq_len"):
        prepare_corpus(["abc"], tmp_path / "a", tokenizer_spec="byte", seq_len=0)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_corpus(["abc"], tmp_path / "a", tokenizer_spec="byte", seq_len=4, val_fraction=1.0)
    with pytest.raises(ValueError, match="max_rows_per_shard"):
        prepare_corpus(
            ["abc"],
            tmp_path / "a",
            tokenizer_spec="byte",
            seq_len=4,
            rows_per_batch=4,
            max_rows_per_shard=6,
        )
    with pytest.raises(ValueError, match="--tokenizer"):
        prepare_corpus(["abc"], tmp_path / "a", tokenizer_spec="nonsense", seq_len=4)


def test_narrowest_token_type():
    assert token_dtype(366) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.int32


@pytest.mark.parametrize("spec", ["bpe:400", "unigram:400"])
def test_trained_tokenizer_is_stored_with_the_corpus(tmp_path, spec):
    from data_pipeline.tokenizers import load_tokenizer

    docs = iter(make_docs(200))  # a one-shot iterator: training needs a second pass
    out = tmp_path / "trained"
    m = prepare_corpus(docs, out, tokenizer_spec=spec, seq_len=15)
    assert m["tokenizer"]["kind"] == spec.split(":")[0]
    assert m["tokenizer"]["file"] == "tokenizer.json"
    assert m["dtype"] == "uint16" and m["documents"] == 200
    tok = load_tokenizer(m["tokenizer"], out)
    rows, _ = read_split(out, m, "train")
    first = next(i for i in range(200) if validation_score(i, 1234) >= 0.05)
    assert tok.decode(rows.reshape(-1).tolist()).startswith(make_docs(200)[first] + "<eos>")


def test_read_documents_formats(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("whole file\n\nsecond paragraph\n", encoding="utf-8")
    (tmp_path / "d" / "sub" / "a.jsonl").write_text(
        '{"text": "j1", "id": 1}\n\n{"text": "j2 ü"}\n', encoding="utf-8"
    )
    (tmp_path / "d" / "notes.md").write_text("ignored in a directory")
    (tmp_path / "d" / ".hidden.txt").write_text("ignored")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["p1", "p2"]}), tmp_path / "c.parquet")

    assert list(read_documents([tmp_path / "d"])) == [
        "whole file\n\nsecond paragraph\n",
        "j1",
        "j2 ü",
    ]
    assert list(read_documents(tmp_path / "d" / "b.txt", split_lines=True)) == [
        "whole file",
        "second paragraph",
    ]
    assert list(read_documents(str(tmp_path / "d" / "**" / "*.jsonl"))) == ["j1", "j2 ü"]
    assert list(read_documents(tmp_path / "c.parquet", text_key="body")) == ["p1", "p2"]
    with pytest.raises(ValueError, match=r"c\.parquet: no column 'text'"):
        list(read_documents([tmp_path / "c.parquet"]))
    with pytest.raises(FileNotFoundError, match="matches no files"):
        read_documents(str(tmp_path / "*.nothing"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_documents(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"notes\.md.*unsupported"):
        read_documents(tmp_path / "d" / "notes.md")


def test_jsonl_errors_name_file_and_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.jsonl, line 2: no field 'text'"):
        list(read_documents(path))
    path.write_text('{"text": "ok"}\n\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.jsonl, line 3: field 'text' is int"):
        list(read_documents(path))
    path.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"data\.jsonl, line 2: invalid JSON"):
        list(read_documents(path))


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_printer_reports_rates_and_eta():
    clock, stream = FakeClock(), io.StringIO()
    printer = ProgressPrinter(stream, total_bytes=1000, interval=1.0, clock=clock)
    clock.now += 0.5
    printer.update(documents=10, tokens=100, bytes_read=100)
    assert stream.getvalue() == ""  # within the interval
    clock.now += 1.5
    printer.update(documents=20, tokens=2000, bytes_read=250)
    line = stream.getvalue()
    assert line.endswith("\n") and "\r" not in line  # not a terminal: whole lines
    assert "20 documents (10/s)" in line and "2,000 tokens (1,000/s)" in line
    assert "25.0% ETA 0:00:06" in line  # 2 s for a quarter: 6 s to go

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    term = Terminal()
    printer = ProgressPrinter(term, total_documents=40, clock=clock)
    clock.now += 1.0
    printer.update(documents=10, tokens=10)
    printer.update(documents=40, tokens=40, final=True)
    assert term.getvalue().startswith("\r") and term.getvalue().count("\r") == 2
    assert "100.0% ETA 0:00:00" in term.getvalue() and term.getvalue().endswith("\n")


def test_prepare_reports_progress(tmp_path):
    stream = io.StringIO()
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_docs(50)))
    prepare_corpus(
        read_documents(src), tmp_path / "o", tokenizer_spec="byte", seq_len=8, progress=stream
    )
    last = stream.getvalue().splitlines()[-1]
    assert last.startswith("tokenised 50 documents") and "tokens (" in last
    assert "100.0% ETA 0:00:00" in last


def test_cli_writes_a_corpus_and_reports(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "prepare_data_cli", REPO / "launch" / "prepare_data.py"
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"content": d}) + "\n" for d in make_docs(40)))
    out = tmp_path / "out"
    args = ["--input", str(src), "--output", str(out), "--tokenizer", "byte", "--seq-len", "16"]
    assert cli.main([*args, "--text-key", "content", "--val-fraction", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "val" in printed and "documents" in printed
    assert json.loads((out / "manifest.json").read_text())["documents"] == 40
    assert cli.main(args) == 1  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert cli.main([*args, "--overwrite"]) == 1  # default --text-key is missing
    assert "line 1: no field 'text'" in capsys.readouterr().err
    more = ["--text-key", "content", "--overwrite", "--workers", "2", "--dtype", "int32"]
    assert cli.main([*args, *more]) == 0
    captured = capsys.readouterr()
    assert "tokenised 40 documents" in captured.err and "int32 tokens" in captured.out
    assert json.loads((out / "manifest.json").read_text())["dtype"] == "int32"


def test_sample_corpus_is_prepared_once(tmp_path, monkeypatch):
    docs = sample_corpus.sample_documents()
    assert docs == sample_corpus.sample_documents()
    assert 1_000_000 < sum(map(len, docs)) < 3_000_000
    kwargs = dict(cache_dir=str(tmp_path), tokenizer_spec="byte", seq_len=128, val_fraction=0.05)
    first = sample_corpus.ensure_sample_corpus(**kwargs)
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] > 5000 and manifest["splits"]["val"]["rows"] > 0
    assert manifest["schema_version"] == 2 and manifest["sentences"] > 10 * len(docs)
    shard = pa.ipc.open_file(str(first / manifest["splits"]["train"]["shards"][0]["file"]))
    assert shard.schema.names == ["tokens", "doc_offsets", "sent_offsets"]

    def must_not_run(*args, **kw):
        raise AssertionError("prepared again")

    monkeypatch.setattr(sample_corpus, "prepare_corpus", must_not_run)
    assert sample_corpus.ensure_sample_corpus(**kwargs) == first
    other = sample_corpus.sample_corpus_key(tokenizer_spec="byte", seq_len=64, val_fraction=0.05)
    assert other != first.name
    # a corpus cached by an older version (schema 1, no sent_offsets) is never reused
    monkeypatch.setattr(sample_corpus, "SAMPLE_CORPUS_VERSION", 1)
    assert (
        sample_corpus.sample_corpus_key(**{k: kwargs[k] for k in kwargs if k != "cache_dir"})
        != first.name
    )


def test_sample_corpus_race_keeps_the_winner(tmp_path, monkeypatch):
    real = prepare_mod.prepare_corpus
    kwargs = dict(cache_dir=str(tmp_path), tokenizer_spec="byte", seq_len=64, val_fraction=0.05)

    def racing(documents, output_dir, **kw):
        real(["another process won " * 20] * 4, output_dir, **kw)  # lands first
        return real(documents, output_dir, **kw)

    monkeypatch.setattr(sample_corpus, "prepare_corpus", racing)
    path = sample_corpus.ensure_sample_corpus(**kwargs)
    assert json.loads((path / "manifest.json").read_text())["documents"] == 4
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
