"""ERNIE knowledge spans end to end: prepare_data --spans -> shards -> loader batch -> masks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from data_pipeline.config import DataConfig
from data_pipeline.dataset import PackedDataset
from data_pipeline.micro_batch import MicroBatchPlan
from data_pipeline.objectives import IGNORE_INDEX
from data_pipeline.objectives.mlm import MaskedLM
from data_pipeline.prepare import prepare_corpus
from data_pipeline.rows import span_marks
from tests.unit.test_prepare_bad_input import cli, run_cli, write_jsonl  # noqa: F401

ENTITIES = ("Barack Obama", "New York City", "United Nations")
PHRASES = ("met the",)


def make_docs(n: int) -> list[str]:
    return [
        f"Doc {i}: Barack Obama visited New York City{'!' * (i % 3)}. "
        f"He met the United Nations there {i * 7} times."
        for i in range(n)
    ]


def span_records(docs: list[str]) -> list[dict]:
    records = []
    for i, text in enumerate(docs):
        spans = [[text.find(e), text.find(e) + len(e), "entity"] for e in ENTITIES]
        spans += [[text.find(p), text.find(p) + len(p), "phrase"] for p in PHRASES]
        if i % 5 != 4:  # some documents have no spans
            records.append({"doc": i, "spans": spans})
    return records


def write_spans(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ernie")
    docs = make_docs(60)
    spans = write_spans(tmp / "spans.jsonl", span_records(docs))
    common = dict(
        tokenizer_spec="byte", seq_len=63, val_fraction=0.0, rows_per_batch=4, max_rows_per_shard=8
    )
    with_spans = prepare_corpus(docs, tmp / "with", spans=spans, **common)
    without = prepare_corpus(docs, tmp / "without", **common)
    return tmp, with_spans, without


def runs(start_S: np.ndarray, kind_S: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, end, kind) of each span of a row: from a start while the kind holds."""
    out = []
    for s in np.flatnonzero(start_S).tolist():
        e = s + 1
        while e < len(kind_S) and kind_S[e] == kind_S[s] and not start_S[e]:
            e += 1
        out.append((s, e, int(kind_S[s])))
    return out


def test_prepared_spans_mark_the_span_tokens(corpora):
    tmp, manifest, plain = corpora
    assert manifest["schema_version"] == 3 and plain["schema_version"] == 2
    assert manifest["spans"]["spans"] == 48 * 4
    assert "spans" not in plain
    ds, ds_plain = PackedDataset(tmp / "with"), PackedDataset(tmp / "without")
    assert ds.has_spans and not ds_plain.has_spans
    rows = np.arange(len(ds))
    batch, batch_plain = ds.gather_batch(rows), ds_plain.gather_batch(rows)
    # With the byte tokenizer, cutting at spans changes no token; boundaries are as before.
    for key in ("tokens", "doc_start", "sent_start"):
        assert (batch[key] == batch_plain[key]).all()
    assert "span_start" not in batch_plain
    tokens = batch["tokens"].numpy()
    seen = {1: set(), 2: set()}
    for r in range(len(rows)):
        for s, e, kind in runs(batch["span_start"][r].numpy(), batch["span_kind"][r].numpy()):
            text = bytes(tokens[r, s:e].astype(np.uint8).tolist()).decode()
            if e < tokens.shape[1]:  # a span at the row's end may continue in the next row
                seen[kind].add(text)
    # A span starts at the whitespace before it, as sentences do.
    assert seen[2] == {" " + e for e in ENTITIES}
    assert seen[1] == {" " + p for p in PHRASES}


def test_loader_plan_hands_out_the_spans(corpora):
    tmp, _, _ = corpora
    ds = PackedDataset(tmp / "with")
    rows = np.array([5, 0, 17, 3, 9, 11, 2, 8])
    plan = MicroBatchPlan([(ds, rows, None)], size=8, micro_batch_size=4, sample_ids=rows)
    whole = ds.gather_batch(rows)
    for m in range(2):
        got = plan.micro_batch(m)
        for key in ("tokens", "doc_start", "sent_start", "span_start", "span_kind"):
            assert (got[key] == whole[key][4 * m : 4 * m + 4]).all(), key
        assert got["span_kind"].dtype.itemsize == 1
    # A blend with a corpus without spans hands out none.
    plain = PackedDataset(tmp / "without")
    mixed = MicroBatchPlan(
        [(ds, rows[:4], np.arange(4)), (plain, rows[4:], np.arange(4, 8))],
        size=8,
        micro_batch_size=8,
    )
    assert "span_start" not in mixed.micro_batch(0)


def test_objective_masks_prepared_entities_whole(corpora):
    tmp, _, _ = corpora
    ds = PackedDataset(tmp / "with")
    rows = np.arange(len(ds))
    plan = MicroBatchPlan(
        [(ds, rows, None)], size=len(rows), micro_batch_size=len(rows), sample_ids=rows
    )
    batch = plan.micro_batch(0)
    cfg = DataConfig()
    cfg.mlm.unit = "knowledge"
    cfg.mlm.knowledge_stages = [0.0, 0.0, 1.0]
    cfg.mlm.mask_prob = 0.3  # byte-level entities (13-15 tokens) need a budget over 9 tokens
    obj = MaskedLM("mlm", cfg=cfg, tokenizer=ds.tokenizer, seq_len=63, seed=0)
    out = obj(batch)
    chosen = (out["labels"] != IGNORE_INDEX).numpy()
    # Model position j + 1 holds row token j ([CLS] first).
    masked_entities = 0
    for r in range(len(rows)):
        start, kind = batch["span_start"][r].numpy(), batch["span_kind"][r].numpy()
        for s, e, k in runs(start[: 63 - 2], kind[: 63 - 2]):
            if k != 2:
                continue
            picked = chosen[r, s + 1 : e + 1]
            assert picked.all() or not picked.any(), (r, s, e)
            masked_entities += int(picked.all())
    assert masked_entities >= 10


def test_span_marks_rule():
    phrase = np.array([[0, 1, 0, 0, 0, 0, 0, 0]], dtype=bool)
    entity = np.array([[0, 0, 0, 1, 0, 1, 0, 0]], dtype=bool)
    end = np.array([[0, 0, 1, 0, 0, 1, 0, 1]], dtype=bool)  # an end may meet the next start
    start, kind = span_marks(phrase, entity, end)
    assert kind.tolist() == [[0, 1, 0, 2, 2, 2, 2, 0]]
    assert start.tolist() == [[False, True, False, True, False, True, False, False]]


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"doc": 1, "spans": [[0, 4, "person"]]}', "kind one of"),
        ('{"doc": 1, "spans": [[5, 4, "entity"]]}', "0 <= start < end"),
        ('{"doc": 1, "spans": [[0, 4, "entity"], [2, 6, "phrase"]]}', "overlap"),
        ('{"doc": 1, "spans": [[0, 400, "entity"]]}', "ends past the document's"),
        ('{"doc": 0, "spans": []}', "already has spans"),
        ('{"doc": "1", "spans": []}', "must be a document index"),
        ("not json", "invalid JSON"),
        ('{"doc": 6, "spans": [[0, 4, "entity"]]}', "the input has 6 documents"),
    ],
)
def test_bad_span_record_is_one_line_naming_file_and_line(cli, capsys, tmp_path, line, problem):  # noqa: F811
    docs = write_jsonl(tmp_path / "docs.jsonl", make_docs(6))
    spans = tmp_path / "spans.jsonl"
    spans.write_text('{"doc": 0, "spans": [[0, 3, "phrase"]]}\n' + line + "\n", encoding="utf-8")
    code, _, err = run_cli(cli, capsys, [docs], tmp_path / "out", "--spans", str(spans))
    assert code != 0 and not (tmp_path / "out").exists()
    assert len(err.strip().splitlines()) == 1, err
    assert f"{spans}, line 2" in err and problem in err, err


def test_cli_writes_spans_and_reports_them(cli, capsys, tmp_path):  # noqa: F811
    docs = make_docs(20)
    inputs = write_jsonl(tmp_path / "docs.jsonl", docs)
    spans = write_spans(tmp_path / "spans.jsonl", span_records(docs))
    code, out, err = run_cli(cli, capsys, [inputs], tmp_path / "out", "--spans", str(spans))
    assert code == 0, err
    assert "knowledge spans from" in out
    assert PackedDataset(tmp_path / "out").has_spans


def test_spans_do_not_depend_on_the_worker_count(corpora, tmp_path):
    tmp, manifest, _ = corpora
    docs = make_docs(60)
    spans = write_spans(tmp_path / "spans.jsonl", span_records(docs))
    two = prepare_corpus(
        docs,
        tmp_path / "two",
        tokenizer_spec="byte",
        seq_len=63,
        val_fraction=0.0,
        rows_per_batch=4,
        max_rows_per_shard=8,
        spans=spans,
        workers=2,
    )
    sums = [[s["sha256"] for s in m["splits"]["train"]["shards"]] for m in (manifest, two)]
    assert sums[0] == sums[1]


# -- the lexicon form of --spans -------------------------------------------------------------


def write_lexicon(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_lexicon_finds_the_longest_entry_at_each_place_on_word_boundaries(tmp_path):
    from data_pipeline.documents import SPAN_CODES, read_lexicon

    lex = read_lexicon(
        write_lexicon(
            tmp_path / "lexicon.tsv",
            [
                "# comment",
                "entity\tNew York",
                "entity\tNew York City",
                "phrase\tart",
                "",
                "entity\t北京大学",
                "phrase\t大学",
            ],
        )
    )
    e, p = SPAN_CODES["entity"], SPAN_CODES["phrase"]
    text = "A party in New York City, art in New York. 我在北京大学学习，大学很大"
    found = [(text[a:b], kind) for a, b, kind in lex.find(text)]
    # "art" inside "party" is not a word; the longer entry wins where both start; Chinese
    # needs no boundary, and "大学" inside "北京大学" is taken by the longer entry.
    assert found == [
        ("New York City", e),
        ("art", p),
        ("New York", e),
        ("北京大学", e),
        ("大学", p),
    ]
    assert lex.find("nothing here") == [] and len(lex) == 5


def test_lexicon_spans_equal_the_same_spans_listed_per_document(tmp_path):
    docs = make_docs(30)
    units = [*((e, "entity") for e in ENTITIES), *((p, "phrase") for p in PHRASES)]
    listed = [
        {"doc": i, "spans": [[text.find(x), text.find(x) + len(x), kind] for x, kind in units]}
        for i, text in enumerate(docs)
    ]
    lexicon = write_lexicon(
        tmp_path / "lexicon.tsv",
        [f"entity\t{e}" for e in ENTITIES] + [f"phrase\t{p}" for p in PHRASES],
    )
    common = dict(
        tokenizer_spec="byte", seq_len=63, val_fraction=0.0, rows_per_batch=4, max_rows_per_shard=8
    )
    by_doc = prepare_corpus(
        docs, tmp_path / "listed", spans=write_spans(tmp_path / "s.jsonl", listed), **common
    )
    by_lexicon = prepare_corpus(docs, tmp_path / "lexicon", spans=lexicon, **common)
    two_workers = prepare_corpus(docs, tmp_path / "two", spans=lexicon, workers=2, **common)
    sums = [
        [s["sha256"] for s in m["splits"]["train"]["shards"]]
        for m in (by_doc, by_lexicon, two_workers)
    ]
    assert sums[0] == sums[1] == sums[2]
    assert by_lexicon["spans"] == {"source": str(lexicon), "spans": 30 * 4}


@pytest.mark.parametrize(
    "line, problem",
    [
        ("person\tBarack Obama", "KIND one of"),
        ("entity Barack Obama", "KIND<TAB>TEXT"),
        ("entity\t Barack Obama", "without surrounding spaces"),
        ("phrase\tBarack Obama", "listed as another kind on line 1"),
    ],
)
def test_bad_lexicon_line_is_one_line_naming_file_and_line(cli, capsys, tmp_path, line, problem):  # noqa: F811
    docs = write_jsonl(tmp_path / "docs.jsonl", make_docs(6))
    lexicon = write_lexicon(tmp_path / "lexicon.tsv", ["entity\tBarack Obama", line])
    code, _, err = run_cli(cli, capsys, [docs], tmp_path / "out", "--spans", str(lexicon))
    assert code != 0 and not (tmp_path / "out").exists()
    assert len(err.strip().splitlines()) == 1, err
    assert f"{lexicon}, line 2" in err and problem in err, err
