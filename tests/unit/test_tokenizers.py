"""Tokenizers: byte-level round trips, reserved special tokens, deterministic training,
unigram and SentencePiece models."""

from __future__ import annotations

import json
import pickle

import pytest

from data_pipeline.tokenizers import (
    SPECIAL_TOKENS,
    ByteTokenizer,
    SentencePieceTokenizer,
    _canonical_unigram,
    build_tokenizer,
    load_tokenizer,
    needs_training,
)

TEXT = "Hello, world! naïve café — 日本語 🙂 tab\tnewline\n"


@pytest.fixture(scope="module")
def train_texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:25]] + [TEXT, "the cat sat on the mat " * 20]


@pytest.fixture(scope="module")
def trained(train_texts):
    """build_tokenizer(spec) on train_texts, trained once per spec for this module."""
    cache: dict = {}

    def get(spec: str):
        if spec not in cache:
            cache[spec] = build_tokenizer(spec, train_texts=train_texts)
        return cache[spec]

    return get


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


@pytest.mark.parametrize("spec", ["bpe:600", "wordpiece:600", "unigram:600"])
def test_trained_tokenizers_are_deterministic(spec, train_texts):
    a = build_tokenizer(spec, train_texts=iter(train_texts))
    b = build_tokenizer(spec, train_texts=list(train_texts))
    assert a.identity() == b.identity()
    assert a.hf_tokenizer.get_vocab() == b.hf_tokenizer.get_vocab()
    assert a.encode(TEXT) == b.encode(TEXT)


@pytest.mark.parametrize("spec", ["bpe:600", "wordpiece:600", "unigram:600"])
def test_trained_tokenizers_reserve_the_special_tokens(spec, trained):
    tok = trained(spec)
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


@pytest.mark.parametrize("spec", ["byte", "bpe:600", "wordpiece:600", "unigram:600"])
def test_save_and_load_round_trip(spec, trained, tmp_path):
    tok = trained(spec)
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
    with pytest.raises(ValueError, match="tokenizer.kind='charlevel' is unknown"):
        load_tokenizer({"kind": "charlevel"}, tmp_path)
    with pytest.raises(ValueError, match="'sentencepiece' names no 'file'"):
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


@pytest.mark.parametrize(
    "spec", ["", "sentencepiece", "bpe", "bpe:abc", "char:100", "bpe:10", "unigram:300"]
)
def test_bad_spec_names_the_field_and_value(spec):
    with pytest.raises(ValueError, match=r"data\.tokenizer / --tokenizer") as info:
        build_tokenizer(spec, train_texts=["x"])
    assert repr(spec) in str(info.value)


def test_training_without_texts_is_an_error():
    with pytest.raises(ValueError, match="train_texts"):
        build_tokenizer("bpe:1000")
    with pytest.raises(FileNotFoundError, match="no_such.json"):
        build_tokenizer("/no/where/no_such.json")
    with pytest.raises(FileNotFoundError, match="no_such.model"):
        build_tokenizer("/no/where/no_such.model")
    assert needs_training("bpe:1000") and needs_training("wordpiece:10")
    assert needs_training("unigram:1000")
    assert not needs_training("byte") and not needs_training("x/tokenizer.json")
    assert not needs_training("x/unigram:3.model")


# ---------------------------------------------------------------------------------------------
# Unigram


def test_unigram_round_trip_on_bytes(trained):
    tok = trained("unigram:600")
    assert tok.kind == "unigram" and tok.vocab_size == 600
    ids = tok.encode(TEXT)
    assert len(ids) < len(TEXT.encode("utf-8"))  # multi-byte pieces were learned
    assert tok.decode(ids) == TEXT  # byte-level: lossless, no unknown token
    assert tok.special_tokens["[UNK]"] not in tok.encode("\x00\x7f 🙂 ⸘")
    assert list(tok.special_tokens.values()) == list(range(len(SPECIAL_TOKENS)))


def test_unigram_numbering_ignores_the_trainers_float_and_hash_order():
    # What the trainer returns: EM scores noisy in the last bits, and symbols it added back on
    # a 1e-4 ladder above the lowest score, in an arbitrary order.
    lowest = -12.0
    run_a = [
        ("the", -3.1000000000000001),
        ("he", -3.1000000000000005),  # equal to "the" after rounding: ordered by piece
        ("t", -5.0),
        ("qz", lowest),
        ("x", lowest),
        ("y", lowest + 1e-4),
        ("z", lowest + 2e-4),
    ]
    run_b = [
        ("z", lowest),
        ("he", -3.0999999999999996),
        ("t", -5.0),
        ("x", lowest + 1e-4),
        ("qz", lowest),
        ("the", -3.1),
        ("y", lowest + 2e-4),
    ]
    a, b = _canonical_unigram(run_a), _canonical_unigram(run_b)
    assert a == b
    assert [p for p, _ in a] == ["he", "the", "t", "x", "y", "qz", "z"]
    assert [s for _, s in a] == [-3.1, -3.1, -5.0, -11.9998, -11.9999, -12.0, -12.0]


# ---------------------------------------------------------------------------------------------
# SentencePiece


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, train_texts) -> str:
    """A tiny SentencePiece unigram model trained here: unk 0, bos 1, eos 2, pad 3, a control
    piece [MASK] and a user-defined piece [CLS]."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(train_texts), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(root / "sp"),
        vocab_size=300,
        model_type="unigram",
        pad_id=3,
        control_symbols=["[MASK]"],
        user_defined_symbols=["[CLS]"],
        minloglevel=2,
    )
    return str(root / "sp.model")


def test_sentencepiece_reserved_ids(sp_model):
    tok = build_tokenizer(sp_model)
    sp = tok.sp_processor
    pieces = sp.get_piece_size()
    assert (pieces, sp.piece_to_id("[MASK]"), sp.piece_to_id("[CLS]")) == (300, 4, 5)
    # the model's own unk/eos/pad pieces and the control piece of the same name
    assert tok.special_tokens["[UNK]"] == 0
    assert tok.special_tokens["<eos>"] == tok.eos_id == 2
    assert tok.special_tokens["<pad>"] == tok.pad_id == 3
    assert tok.special_tokens["[MASK]"] == 4
    # the rest after the vocabulary, in SPECIAL_TOKENS order; the user-defined "[CLS]" piece
    # is produced from text, so the reserved [CLS] does not take it
    mapped = {"[UNK]", "<eos>", "<pad>", "[MASK]"}
    appended = [tok.special_tokens[t] for t in SPECIAL_TOKENS if t not in mapped]
    assert appended == list(range(pieces, pieces + len(SPECIAL_TOKENS) - 4))
    assert tok.special_tokens["[CLS]"] == pieces
    assert tok.vocab_size == pieces + len(SPECIAL_TOKENS) - 4
    assert tok.id_to_token(4) == "[MASK]" and tok.id_to_token(pieces) == "[CLS]"


def test_sentencepiece_encodes_plain_text_only(sp_model):
    tok = build_tokenizer(sp_model)
    text = "The assert statement is a convenient way to insert debugging assertions."
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert [a.tolist() for a in tok.encode_batch([text, "x"])] == [ids, tok.encode("x")]
    forged = tok.encode("a <eos> [MASK] <pad> [CLS] b")
    assert not set(forged) & {tok.eos_id, tok.pad_id, tok.special_tokens["[MASK]"]}
    assert tok.special_tokens["[CLS]"] not in forged
    assert tok.decode([tok.special_tokens["[CLS]"], *tok.encode("hi"), tok.eos_id]) == (
        "[CLS]hi<eos>"
    )
    with pytest.raises(ValueError, match="outside the SentencePiece vocabulary"):
        tok.decode([tok.vocab_size])


def test_sentencepiece_save_load_and_pickle(sp_model, tmp_path):
    tok = build_tokenizer(sp_model)
    entry = tok.save(tmp_path)
    assert entry["kind"] == "sentencepiece" and entry["file"] == "tokenizer.model"
    again = load_tokenizer(json.loads(json.dumps(entry)), tmp_path)
    assert again.identity() == tok.identity() and again.special_tokens == tok.special_tokens
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.encode(TEXT) == tok.encode(TEXT) and copy.identity() == tok.identity()
    (tmp_path / "broken.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"broken\.model could not be loaded"):
        build_tokenizer(str(tmp_path / "broken.model"))


def test_sentencepiece_without_pad_appends_it(tmp_path, train_texts):
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(train_texts[:10]), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "m"), vocab_size=200, minloglevel=2
    )
    tok = SentencePieceTokenizer.from_file(tmp_path / "m.model")
    assert tok.eos_id == 2 and tok.special_tokens["[UNK]"] == 0
    assert tok.pad_id == 200 == tok.special_tokens["<pad>"]  # pad is off by default
    assert tok.vocab_size == 200 + len(SPECIAL_TOKENS) - 2


# ---------------------------------------------------------------------------------------------
# Pickling (worker processes) and id_to_token


@pytest.mark.parametrize("spec", ["byte", "bpe:600", "unigram:600", "wordpiece:600"])
def test_pickled_copy_still_encodes_special_strings_as_text(spec, trained):
    tok = trained(spec)
    copy = pickle.loads(pickle.dumps(tok))
    text = "x [MASK] <eos> [sMASK] y"
    assert copy.encode(text) == tok.encode(text)
    forgeable = set(tok.special_tokens.values()) - {tok.special_tokens["[UNK]"]}
    assert not set(copy.encode(text)) & forgeable
    assert copy.identity() == tok.identity()


def test_id_to_token(trained):
    byte = ByteTokenizer()
    assert byte.id_to_token(104) == "h" and byte.id_to_token(byte.eos_id) == "<eos>"
    wp = trained("wordpiece:600")
    pieces = [wp.id_to_token(i) for i in wp.encode("statements")]
    assert "".join(p.removeprefix("##") for p in pieces) == "statements"
    assert not pieces[0].startswith("##") and all(p.startswith("##") for p in pieces[1:])
    assert wp.id_to_token(wp.special_tokens["[MASK]"]) == "[MASK]"
    with pytest.raises(ValueError, match="not in the wordpiece vocabulary"):
        wp.id_to_token(wp.vocab_size + 5)
    ids, lengths = byte.encode_concat(["ab", "", "ü"])
    assert ids.tolist() == [97, 98, 195, 188] and lengths.tolist() == [2, 0, 2]
