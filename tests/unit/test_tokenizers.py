"""Tokenizers: byte-level round trips, reserved special tokens, deterministic training."""

from __future__ import annotations

import json

import pytest

from data_pipeline.tokenizers import (
    SPECIAL_TOKENS,
    ByteTokenizer,
    build_tokenizer,
    load_tokenizer,
    needs_training,
)

TEXT = "Hello, world! naïve café — 日本語 🙂 tab\tnewline\n"


@pytest.fixture(scope="module")
def train_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:25]] + [TEXT, "the cat sat on the mat " * 20]


def test_byte_round_trip_including_non_ascii():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.decode(ids) == TEXT
    assert [t.tolist() for t in tok.encode_batch([TEXT, ""])] == [ids, []]


def test_byte_special_tokens_are_reserved_after_the_bytes():
    tok = ByteTokenizer()
    assert list(tok.special_tokens) == list(SPECIAL_TOKENS)
    ids = list(tok.special_tokens.values())
    assert ids == list(range(256, 256 + len(SPECIAL_TOKENS)))
    assert tok.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert tok.eos_id == tok.special_tokens["<eos>"] != tok.pad_id == tok.special_tokens["<pad>"]
    for name in ("[CLS]", "[SEP]", "[MASK]", "<sop>", "<eop>", "[sMASK]", "[gMASK]"):
        assert name in tok.special_tokens
    assert "<extra_id_0>" in tok.special_tokens and "<extra_id_99>" in tok.special_tokens
    assert tok.decode([104, 105, tok.eos_id]) == "hi<eos>"
    # Corpus text spelling a special token stays plain text.
    assert tok.encode("<eos>") == list(b"<eos>")


def test_identity_is_json_and_stable():
    a, b = ByteTokenizer().identity(), ByteTokenizer().identity()
    assert a == b and a["kind"] == "byte" and a["vocab_size"] == 366
    json.dumps(a)


@pytest.mark.parametrize("spec", ["bpe:600", "wordpiece:600"])
def test_trained_tokenizers_are_deterministic(spec, train_texts):
    a = build_tokenizer(spec, train_texts=iter(train_texts))
    b = build_tokenizer(spec, train_texts=list(train_texts))
    assert a.identity() == b.identity()
    assert a.hf_tokenizer.get_vocab() == b.hf_tokenizer.get_vocab()
    assert a.encode(TEXT) == b.encode(TEXT)


@pytest.mark.parametrize("spec", ["bpe:600", "wordpiece:600"])
def test_trained_tokenizers_reserve_the_special_tokens(spec, train_texts):
    tok = build_tokenizer(spec, train_texts=train_texts)
    assert set(tok.special_tokens) == set(SPECIAL_TOKENS)
    assert len(set(tok.special_tokens.values())) == len(SPECIAL_TOKENS)
    assert max(tok.special_tokens.values()) < tok.vocab_size
    # Spelling a special token in the text does not produce its id.
    assert tok.eos_id not in tok.encode("a <eos> b [MASK]")
    assert tok.special_tokens["[MASK]"] not in tok.encode("a <eos> b [MASK]")


def test_bpe_round_trip(train_texts):
    tok = build_tokenizer("bpe:800", train_texts=train_texts)
    ids = tok.encode(TEXT)
    assert len(ids) < len(TEXT.encode("utf-8"))  # merges were learned
    assert tok.decode(ids) == TEXT
    assert max(ids) < tok.vocab_size


def test_wordpiece_round_trip(train_texts):
    tok = build_tokenizer("wordpiece:800", train_texts=train_texts)
    text = "The cat sat on the mat, and the function returns an object."
    ids = tok.encode(text)
    assert tok.special_tokens["[UNK]"] not in ids
    assert tok.decode(ids) == text
    # lowercase is off: case survives
    assert tok.decode(tok.encode("The")) == "The"


@pytest.mark.parametrize("spec", ["byte", "bpe:600", "wordpiece:600"])
def test_save_and_load_round_trip(spec, train_texts, tmp_path):
    tok = build_tokenizer(spec, train_texts=train_texts)
    entry = tok.save(tmp_path)
    json.dumps(entry)
    again = load_tokenizer(entry, tmp_path)
    assert again.identity() == tok.identity()
    assert again.encode(TEXT) == tok.encode(TEXT)
    assert again.special_tokens == tok.special_tokens


def test_load_rejects_a_different_vocabulary(train_texts, tmp_path):
    tok = build_tokenizer("bpe:600", train_texts=train_texts)
    entry = tok.save(tmp_path)
    entry["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="tokenizer.json.*does not match the manifest"):
        load_tokenizer(entry, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_tokenizer({**entry, "file": "nope.json"}, tmp_path)
    with pytest.raises(ValueError, match="tokenizer.kind"):
        load_tokenizer({"kind": "sentencepiece"}, tmp_path)


def test_existing_tokenizer_json_gets_the_missing_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = build_tokenizer(str(path))
    assert tok.encode("hello world") == [1, 2]  # existing ids never move
    assert tok.special_tokens["[UNK]"] == 0
    assert sorted(tok.special_tokens.values())[1:] == list(range(3, 3 + len(SPECIAL_TOKENS) - 1))
    assert tok.vocab_size == 3 + len(SPECIAL_TOKENS) - 1
    out = tmp_path / "saved"
    out.mkdir()
    assert load_tokenizer(tok.save(out), out).identity() == tok.identity()


@pytest.mark.parametrize("spec", ["", "sentencepiece", "bpe", "bpe:abc", "char:100", "bpe:10"])
def test_bad_spec_names_the_field_and_value(spec):
    with pytest.raises(ValueError, match=r"data\.tokenizer / --tokenizer") as info:
        build_tokenizer(spec, train_texts=["x"])
    assert repr(spec) in str(info.value)


def test_training_without_texts_is_an_error():
    with pytest.raises(ValueError, match="train_texts"):
        build_tokenizer("bpe:1000")
    with pytest.raises(FileNotFoundError, match="no_such.json"):
        build_tokenizer("/no/where/no_such.json")
    assert needs_training("bpe:1000") and needs_training("wordpiece:10")
    assert not needs_training("byte") and not needs_training("x/tokenizer.json")
