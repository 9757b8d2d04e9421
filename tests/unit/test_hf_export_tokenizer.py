"""Every kind of Loom tokenizer, written by launch/export_hf.py for transformers: the folder's
AutoTokenizer encodes texts to Loom's ids and decodes them back as Loom does, with the family's
special tokens; what cannot be represented is refused with a reason instead."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from data_pipeline.tokenizers import SPECIAL_TOKENS, build_tokenizer
from models import hf as hf_convert

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def _load_script():
    spec = importlib.util.spec_from_file_location("export_hf", ROOT / "launch" / "export_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


export_hf = _load_script()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Real prose (pydoc topics) to train on and to compare with, beyond the probe texts."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:30]]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, texts):
    """Train a small SentencePiece model: sp_model(name, **trainer options) -> path."""
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("spm")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(texts), encoding="utf-8")

    def train(name: str, **options) -> str:
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(root / name), minloglevel=2, **options
        )
        return str(root / f"{name}.model")

    return train


def write(tokenizer, tmp_path: Path, family: str = "gpt"):
    out = tmp_path / "hf"
    out.mkdir(parents=True, exist_ok=True)
    files, problem = export_hf.write_tokenizer(
        tokenizer, out, family=family, max_length=128, vocab_size=tokenizer.vocab_size
    )
    return out, files, problem


def assert_same_as_loom(tokenizer, directory: Path, texts: list[str]) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    for text in texts:
        ids = tokenizer.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == ids, text[:60]
        assert hf.decode(ids) == tokenizer.decode(ids), text[:60]
    for name, token_id in tokenizer.special_tokens.items():
        assert hf.convert_ids_to_tokens(token_id) == tokenizer.id_to_token(token_id), name
    assert len(hf) == tokenizer.vocab_size


@pytest.mark.parametrize("spec", ["byte", "bpe:600", "wordpiece:600", "unigram:600"])
def test_built_and_trained_tokenizers_keep_loom_ids(spec, tmp_path, texts):
    tokenizer = build_tokenizer(spec, train_texts=texts)
    out, files, problem = write(tokenizer, tmp_path)
    assert problem is None
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert not (out / ".tokenizer").exists()
    assert_same_as_loom(tokenizer, out, texts[:10])
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["clean_up_tokenization_spaces"] is False


def test_byte_tokenizer_ids_and_invalid_utf8(tmp_path):
    tokenizer = build_tokenizer("byte")
    out, _, problem = write(tokenizer, tmp_path)
    assert problem is None
    hf = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf("é")["input_ids"] == [0xC3, 0xA9] == tokenizer.encode("é")
    assert (hf.eos_token, hf.eos_token_id, hf.pad_token_id) == ("<eos>", 256, 257)
    assert hf.convert_tokens_to_ids(f"<extra_id_{99}>") == 256 + len(SPECIAL_TOKENS) - 1
    # Lone and truncated UTF-8 sequences around a reserved token decode as Loom's do.
    ids = [0xC3, 256, 0xE6, 0x97, 65, 257, 0xF0, 0x9F, 0xA4]
    assert hf.decode(ids) == tokenizer.decode(ids)


def test_tokenizer_json_file_keeps_its_ids(tmp_path, texts):
    trained = build_tokenizer("bpe:500", train_texts=texts)
    path = tmp_path / "given.json"
    trained.hf_tokenizer.save(str(path))
    tokenizer = build_tokenizer(str(path))
    assert tokenizer.kind == "file"
    out, _, problem = write(tokenizer, tmp_path)
    assert problem is None
    assert_same_as_loom(tokenizer, out, texts[:5])


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_keeps_its_ids(model_type, tmp_path, texts, sp_model):
    path = sp_model(f"sp_{model_type}", vocab_size=400, model_type=model_type, pad_id=3)
    tokenizer = build_tokenizer(path)
    out, _, problem = write(tokenizer, tmp_path, family="t5")
    assert problem is None
    hf = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    sp, specials = tokenizer.sp_processor, set(tokenizer.special_tokens.values())
    same = 0
    for text in texts:
        ids, got = tokenizer.encode(text), hf(text, add_special_tokens=False)["input_ids"]
        if got != ids:
            # A unigram lattice may hold several best splits ("**" + "*" or "*" + "**"):
            # SentencePiece and tokenizers break such ties differently.
            assert model_type == "unigram", text[:60]
            score = sum(map(sp.get_score, ids))
            assert sum(map(sp.get_score, got)) == pytest.approx(score, abs=1e-4), text[:60]
        same += got == ids
        # Loom decodes the pieces between reserved tokens ([UNK] here) apart, which loses a
        # space after each: compare without them.
        plain, got_plain = ([i for i in x if i not in specials] for x in (ids, got))
        assert hf.decode(plain) == tokenizer.decode(plain) == sp.decode(plain)
        assert hf.decode(got_plain) == sp.decode(plain), text[:60]
    assert same >= 0.9 * len(texts)
    unk = tokenizer.special_tokens["[UNK]"]
    assert hf.decode([unk]) == tokenizer.decode([unk]) == "[UNK]"
    # Reserved tokens appended after the pieces keep their ids; <eos> is the model's own.
    for name in ("[MASK]", "<extra_id_0>", "<extra_id_99>"):
        assert hf.convert_tokens_to_ids(name) == tokenizer.special_tokens[name]
    assert hf.eos_token_id == tokenizer.eos_id == 2 and hf.pad_token_id == tokenizer.pad_id == 3
    assert hf("x")["input_ids"] == [*tokenizer.encode("x"), tokenizer.eos_id]  # T5: text <eos>


def test_sentencepiece_piece_named_like_a_reserved_token_is_refused(tmp_path, sp_model):
    """A user-defined "[CLS]" piece comes from text, so Loom gives [CLS] a new id; one
    tokenizer.json cannot hold the name twice, so no tokenizer is written."""
    path = sp_model("sp_cls", vocab_size=300, user_defined_symbols=["[CLS]"])
    tokenizer = build_tokenizer(path)
    out, files, problem = write(tokenizer, tmp_path, family="bert")
    assert files == [] and "[CLS]" in problem
    assert not (out / "tokenizer.json").exists() and not (out / ".tokenizer").exists()


def test_family_templates(tmp_path):
    tokenizer = build_tokenizer("byte")
    ids = tokenizer.special_tokens
    for family, one, two in [
        ("gpt", [97], [97, 98]),
        (
            "bert",
            [ids["[CLS]"], 97, ids["[SEP]"]],
            [ids["[CLS]"], 97, ids["[SEP]"], 98, ids["[SEP]"]],
        ),
        ("t5", [97, ids["<eos>"]], [97, ids["<eos>"], 98, ids["<eos>"]]),
    ]:
        out, _, problem = write(tokenizer, tmp_path / family, family=family)
        assert problem is None
        hf = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
        assert hf("a")["input_ids"] == one, family
        assert hf("a", "b")["input_ids"] == two, family
        roles = hf_convert.token_conventions(family).roles
        for role, name in roles.items():
            assert getattr(hf, f"{role}_id") == ids[name], (family, role)
    bert = transformers.AutoTokenizer.from_pretrained(tmp_path / "bert" / "hf")
    assert bert("a", "b")["token_type_ids"] == [0, 0, 0, 1, 1]
    assert bert("a [MASK] b")["input_ids"][2:5] == [32, ids["[MASK]"], 32]


def test_tokenizer_larger_than_the_model_is_refused(tmp_path):
    tokenizer = build_tokenizer("byte")
    files, problem = export_hf.write_tokenizer(
        tokenizer, tmp_path, family="gpt", max_length=64, vocab_size=300
    )
    assert files == [] and "366 ids but the model 300 rows" in problem
