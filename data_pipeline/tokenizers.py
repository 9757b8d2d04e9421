"""Tokenizers behind one small interface.

The kinds:
- ``byte``: ids 0..255 are the UTF-8 bytes, the reserved special tokens follow; needs no file.
- ``bpe:VOCAB`` / ``wordpiece:VOCAB`` / ``unigram:VOCAB``: trained with Hugging Face
  ``tokenizers`` on the corpus. bpe and unigram work on UTF-8 bytes (GPT-2 style byte-level
  pre-tokenization), so every text round-trips and none needs an unknown token.
- a path to an existing ``tokenizer.json``: loaded as is; any reserved special token it lacks is
  appended after its vocabulary, so every objective finds the tokens it needs.
- a path to a SentencePiece ``.model`` file, run with the ``sentencepiece`` package. Its pieces
  keep their ids. A reserved token takes an existing piece only where that piece is never
  produced from plain text: <eos>, <pad> and [UNK] take the model's own eos, pad and unknown
  pieces (when the model defines them), and any other reserved token takes a *control* piece of
  the same name. Every remaining reserved token gets a new id after the last piece, in
  ``SPECIAL_TOKENS`` order - also when the model has a normal or user-defined piece of that
  name, since such a piece is produced from text and would let the corpus forge it.

Every kind holds all of ``SPECIAL_TOKENS``. Text is always encoded as plain text: a document that
literally contains "<eos>" or "[MASK]" is not turned into the special id, so corpus text can never
forge document boundaries or masks.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from common.errors import ConfigError, DataError
from data_pipeline.corpus_format import MissingCorpusFileError

# The order is part of the on-disk format (it fixes the special ids of the byte and trained
# tokenizers): append new tokens at the end, never reorder.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<eos>",
    "<pad>",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "<sop>",
    "<eop>",
    "[sMASK]",
    "[gMASK]",
    *(f"<extra_id_{i}>" for i in range(100)),
)
EOS_TOKEN = "<eos>"
PAD_TOKEN = "<pad>"
UNK_TOKEN = "[UNK]"
TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
TRAINED_KINDS = ("bpe", "wordpiece", "unigram")
SPEC_HELP = (
    "expected 'byte', 'bpe:VOCAB', 'wordpiece:VOCAB', 'unigram:VOCAB', a path to a "
    "tokenizer.json or a path to a SentencePiece .model file"
)


class Tokenizer(ABC):
    """What the data pipeline needs from a tokenizer."""

    kind: str
    vocab_size: int
    special_tokens: dict[str, int]

    @property
    def eos_id(self) -> int:
        return self.special_tokens[EOS_TOKEN]

    @property
    def pad_id(self) -> int:
        return self.special_tokens[PAD_TOKEN]

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings inside it are encoded as plain text."""

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Token ids of several texts, one int64 array each (faster than encode in a loop)."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def encode_concat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of all `texts` end to end (int64) and the token count of each (int64)."""
        encoded = self.encode_batch(texts)
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        ids = np.concatenate(encoded) if encoded else np.zeros(0, dtype=np.int64)
        return ids.astype(np.int64, copy=False), lengths

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special tokens appear as their strings."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of one id (a special token's name, a byte, a piece)."""

    @abstractmethod
    def _content_hash(self) -> str: ...

    def identity(self) -> dict:
        """JSON-able description that pins this exact vocabulary (for the corpus manifest)."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "sha256": self._content_hash()}

    def save(self, directory: str | Path) -> dict:
        """Write whatever files rebuilding this tokenizer needs; return its manifest entry."""
        return self.identity()


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then SPECIAL_TOKENS in order."""

    kind = "byte"

    def __init__(self) -> None:
        self.special_tokens = {tok: 256 + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = 256 + len(SPECIAL_TOKENS)
        self._id_to_special = {i: tok for tok, i in self.special_tokens.items()}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int64) for t in texts]

    def encode_concat(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        # One array for all texts: corpus preparation encodes sentence by sentence.
        data = [t.encode("utf-8") for t in texts]
        lengths = np.fromiter(map(len, data), dtype=np.int64, count=len(data))
        return np.frombuffer(b"".join(data), dtype=np.uint8).astype(np.int64), lengths

    def decode(self, ids: Iterable[int]) -> str:
        pieces: list[str] = []
        pending = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                pending.append(i)
                continue
            if pending:
                pieces.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            if i not in self._id_to_special:
                raise ValueError(
                    f"token id {i} is outside the byte vocabulary (size {self.vocab_size})"
                )
            pieces.append(self._id_to_special[i])
        if pending:
            pieces.append(pending.decode("utf-8", errors="replace"))
        return "".join(pieces)

    def id_to_token(self, token_id: int) -> str:
        """A special token's name, else the byte as the latin-1 character of the same value."""
        token_id = int(token_id)
        if 0 <= token_id < 256:
            return chr(token_id)
        if token_id not in self._id_to_special:
            raise ValueError(f"token id {token_id} is outside the byte vocabulary")
        return self._id_to_special[token_id]

    def _content_hash(self) -> str:
        return _sha256_json({"kind": "byte", "special_tokens": list(SPECIAL_TOKENS)})


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers.Tokenizer` holding every reserved special token."""

    def __init__(self, kind: str, tok) -> None:
        self._setup(kind, tok)

    def _setup(self, kind: str, tok) -> None:
        tok.no_padding()
        tok.no_truncation()
        # Adds only the reserved tokens that are missing (appended after the vocabulary) and
        # marks existing ones special; ids already assigned never move.
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        tok.encode_special_tokens = True
        vocab = tok.get_vocab(with_added_tokens=True)
        self.kind = kind
        self._tok = tok
        self.special_tokens = {t: vocab[t] for t in SPECIAL_TOKENS}
        # max id + 1 rather than the token count: a hand-written tokenizer.json may leave holes.
        self.vocab_size = max(vocab.values()) + 1

    def __getstate__(self) -> dict:
        # `tokenizers` pickles through its JSON form, which drops `encode_special_tokens`: a
        # copy sent to a worker process would turn text spelling "[MASK]" into the mask id.
        return {"kind": self.kind, "json": self._tok.to_str()}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer as _HF

        self._setup(state["kind"], _HF.from_str(state["json"]))

    @property
    def hf_tokenizer(self):
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tok

    def id_to_token(self, token_id: int) -> str:
        token = self._tok.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"token id {token_id} is not in the {self.kind} vocabulary")
        return token

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets.
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _content_hash(self) -> str:
        # Hash the vocabulary, merges and added tokens rather than the whole JSON, whose
        # layout changes between `tokenizers` releases.
        state = json.loads(self._tok.to_str())
        model = state.get("model", {})
        merges = [
            m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges") or []
        ]
        added = sorted((t["id"], t["content"]) for t in state.get("added_tokens", []))
        vocab = model.get("vocab") or {}
        if isinstance(vocab, dict):  # Unigram models store a list of [piece, score] instead
            vocab = sorted(vocab.items(), key=lambda kv: kv[1])
        return _sha256_json(
            {
                "model": model.get("type"),
                "vocab": vocab,
                "merges": merges,
                "added_tokens": added,
            }
        )

    def save(self, directory: str | Path) -> dict:
        self._tok.save(str(Path(directory) / TOKENIZER_FILE))
        return {**self.identity(), "file": TOKENIZER_FILE}


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model; reserved tokens are mapped as the module docstring describes."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, *, source: str = "<memory>") -> None:
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError, TypeError) as err:
            raise ValueError(f"SentencePiece model {source} could not be loaded: {err}") from None
        self._proto = bytes(model_proto)
        self._source = source
        self._pieces = self._sp.get_piece_size()
        self.special_tokens, self.vocab_size = _map_sentencepiece_specials(self._sp)
        self._id_to_special = {i: tok for tok, i in self.special_tokens.items()}

    @classmethod
    def from_file(cls, path: str | Path) -> SentencePieceTokenizer:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise OSError(f"SentencePiece model {path} cannot be read: {err}") from None
        return cls(data, source=str(path))

    def __getstate__(self) -> dict:
        return {"proto": self._proto, "source": self._source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"], source=state["source"])

    @property
    def sp_processor(self):
        """The wrapped `sentencepiece.SentencePieceProcessor`."""
        return self._sp

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        if not texts:
            return []
        encoded = self._sp.encode(list(texts), out_type=int)
        return [np.asarray(ids, dtype=np.int64) for ids in encoded]

    def decode(self, ids: Iterable[int]) -> str:
        # SentencePiece decodes control pieces to "", so reserved tokens are written here.
        pieces: list[str] = []
        run: list[int] = []
        for i in ids:
            i = int(i)
            if i not in self._id_to_special and 0 <= i < self._pieces:
                run.append(i)
                continue
            if i not in self._id_to_special:
                raise ValueError(
                    f"token id {i} is outside the SentencePiece vocabulary (size {self.vocab_size})"
                )
            if run:
                pieces.append(self._sp.decode(run))
                run = []
            pieces.append(self._id_to_special[i])
        if run:
            pieces.append(self._sp.decode(run))
        return "".join(pieces)

    def id_to_token(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        if not 0 <= token_id < self._pieces:
            raise ValueError(f"token id {token_id} is outside the SentencePiece vocabulary")
        return self._sp.id_to_piece(token_id)

    def _content_hash(self) -> str:
        model = hashlib.sha256(self._proto).hexdigest()
        return _sha256_json({"sentencepiece": model, "special_tokens": self.special_tokens})

    def save(self, directory: str | Path) -> dict:
        (Path(directory) / SENTENCEPIECE_FILE).write_bytes(self._proto)
        return {**self.identity(), "file": SENTENCEPIECE_FILE}


def _map_sentencepiece_specials(sp) -> tuple[dict[str, int], int]:
    """Reserved token -> id for a SentencePiece model, and the vocabulary size with them."""
    pieces = sp.get_piece_size()
    by_role = {EOS_TOKEN: sp.eos_id(), PAD_TOKEN: sp.pad_id(), UNK_TOKEN: sp.unk_id()}
    control = {sp.id_to_piece(i): i for i in range(pieces) if sp.is_control(i)}
    ids: dict[str, int] = {}
    taken: set[int] = set()
    next_id = pieces
    for name in SPECIAL_TOKENS:
        token_id = by_role.get(name, -1)
        if token_id < 0:
            token_id = control.get(name, -1)
        if token_id < 0 or token_id in taken:
            token_id, next_id = next_id, next_id + 1
        ids[name] = token_id
        taken.add(token_id)
    return ids, next_id


def build_tokenizer(spec: str, *, train_texts: Iterable[str] | None = None) -> Tokenizer:
    """The tokenizer named by `spec` (see SPEC_HELP and the module docstring).

    bpe, wordpiece and unigram are trained on `train_texts`; training is deterministic (same
    texts -> same vocabulary and ids).
    """
    check_spec(spec)
    spec = spec.strip()
    if spec == "byte":
        return ByteTokenizer()
    if spec.endswith((".json", ".model")):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data.tokenizer / --tokenizer={spec!r}: no such file {path}")
        if spec.endswith(".model"):
            return SentencePieceTokenizer.from_file(path)
        return _load_hf_file(path, kind="file")
    kind, vocab_size = _parse_trained_spec(spec)
    if train_texts is None:
        raise ValueError(f"data.tokenizer / --tokenizer={spec!r} must be trained: pass train_texts")
    if kind == "bpe":
        return _train_byte_bpe(train_texts, vocab_size)
    if kind == "unigram":
        return _train_byte_unigram(train_texts, vocab_size)
    return _train_wordpiece(train_texts, vocab_size)


def check_spec(spec: str) -> None:
    """ConfigError unless `spec` has the form of a tokenizer spec (see SPEC_HELP); a named
    file is looked for only when the tokenizer is built."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"data.tokenizer / --tokenizer={spec!r} is empty; {SPEC_HELP}")
    spec = spec.strip()
    if spec != "byte" and not spec.endswith((".json", ".model")):
        _parse_trained_spec(spec)


def _parse_trained_spec(spec: str) -> tuple[str, int]:
    kind, sep, size_text = spec.partition(":")
    if not sep or kind not in TRAINED_KINDS:
        raise ConfigError(
            f"data.tokenizer / --tokenizer={spec!r} is not a tokenizer spec; {SPEC_HELP}"
        )
    try:
        vocab_size = int(size_text)
    except ValueError:
        raise ConfigError(
            f"data.tokenizer / --tokenizer={spec!r}: vocabulary size {size_text!r} "
            "is not an integer"
        ) from None
    # bpe and unigram hold all 256 byte symbols; wordpiece starts from the corpus's characters,
    # which it always keeps (its vocabulary exceeds VOCAB when they alone are more).
    minimum = len(SPECIAL_TOKENS) + 1 if kind == "wordpiece" else 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ConfigError(
            f"data.tokenizer / --tokenizer={spec!r}: vocabulary size must be >= {minimum} "
            f"(the {len(SPECIAL_TOKENS)} reserved special tokens plus an alphabet)"
        )
    return kind, vocab_size


def needs_training(spec: str) -> bool:
    """Whether `spec` names a tokenizer that build_tokenizer trains on texts."""
    if not isinstance(spec, str) or spec.strip().endswith((".json", ".model")):
        return False
    return spec.strip().split(":", 1)[0] in TRAINED_KINDS


def load_tokenizer(entry: dict, base_dir: str | Path) -> Tokenizer:
    """Rebuild the tokenizer described by a manifest entry (see `Tokenizer.save`)."""
    kind = entry.get("kind")
    if kind == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
        where = "the built-in byte tokenizer"
    elif kind in (*TRAINED_KINDS, "file", "sentencepiece"):
        if not entry.get("file"):
            raise DataError(f"manifest tokenizer entry of kind {kind!r} names no 'file'")
        path = Path(base_dir) / entry["file"]
        if not path.is_file():
            raise MissingCorpusFileError(f"tokenizer file {path} named by the manifest is missing")
        if kind == "sentencepiece":
            tokenizer = SentencePieceTokenizer.from_file(path)
        else:
            tokenizer = _load_hf_file(path, kind=kind)
        where = str(path)
    else:
        raise DataError(
            f"manifest tokenizer.kind={kind!r} is unknown "
            "(byte | bpe | wordpiece | unigram | file | sentencepiece)"
        )
    found = tokenizer.identity()
    for key in ("vocab_size", "sha256"):
        if key in entry and entry[key] != found[key]:
            raise DataError(
                f"tokenizer {where} does not match the manifest: {key} is {found[key]!r}, "
                f"the manifest pins {entry[key]!r}"
            )
    return tokenizer


def _load_hf_file(path: Path, *, kind: str) -> HFTokenizer:
    from tokenizers import Tokenizer as _HF

    try:
        tok = _HF.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception
        raise ValueError(f"tokenizer file {path} could not be loaded: {err}") from err
    return HFTokenizer(kind, tok)


def _train_byte_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = _HF(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer("bpe", tok)


_UNIGRAM_SCORE_DECIMALS = 6
_FALLBACK_SCORE_STEP = 1e-4  # UnigramTrainer's score step between alphabet symbols it adds back


def _train_byte_unigram(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Unigram LM over byte-level symbols, numbered reproducibly (see _canonical_unigram)."""
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw = _HF(models.Unigram())
    raw.pre_tokenizer = pre_tokenizer
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        unk_token=UNK_TOKEN,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(texts, trainer)
    trained = json.loads(raw.to_str())["model"]["vocab"]
    pieces = [(tok, 0.0) for tok in SPECIAL_TOKENS]
    pieces += _canonical_unigram([(p, s) for p, s in trained if p not in set(SPECIAL_TOKENS)])
    unk_id = SPECIAL_TOKENS.index(UNK_TOKEN)
    tok = _HF(models.Unigram(pieces, unk_id=unk_id, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return HFTokenizer("unigram", tok)


def _canonical_unigram(pieces: list[tuple[str, float]]) -> list[tuple[str, float]]:
    """Trained (piece, score) pairs in an order that does not depend on the trainer's threads.

    `tokenizers`' UnigramTrainer is not reproducible: its EM sums floats in a varying order, so
    scores differ in the last bits and near-equal pieces swap places; and the alphabet symbols
    that EM dropped or never saw are added back at the lowest score + 0, 1e-4, 2e-4, ... in
    hash-set order. So scores are rounded, the single symbols on that ladder get its scores
    handed out in symbol order, and pieces are numbered by (score descending, piece).
    """
    rounded = [(round(s, _UNIGRAM_SCORE_DECIMALS), p) for p, s in pieces]
    if not rounded:
        return []
    lowest = min(s for s, _ in rounded)
    rungs: dict[int, list[tuple[float, str]]] = {}
    for score, piece in rounded:
        rung = round((score - lowest) / _FALLBACK_SCORE_STEP)
        if len(piece) == 1 and abs(score - lowest - rung * _FALLBACK_SCORE_STEP) < 3e-6:
            rungs.setdefault(rung, []).append((score, piece))
    ladder: list[tuple[float, str]] = []
    rung = 0
    while rung in rungs:  # the ladder is unbroken from the lowest score up
        ladder += rungs[rung]
        rung += 1
    on_ladder = {p for _, p in ladder}
    handed = zip(sorted((s for s, _ in ladder), reverse=True), sorted(on_ladder), strict=True)
    ordered = [(s, p) for s, p in rounded if p not in on_ladder] + list(handed)
    ordered.sort(key=lambda sp: (-sp[0], sp[1]))
    return [(p, s) for s, p in ordered]


# `tokenizers`' WordPieceTrainer numbers the "##x" continuation characters in hash-map order, so
# two runs on the same texts give different vocabularies. We instead train plain BPE (which is
# deterministic) on words whose continuation characters are moved into the supplementary
# private-use planes, then map the learned pieces back to WordPiece's "##" form.
_PLANE_15 = 0xF0000  # continuation of a BMP character: 0xF0000 + ord(c)
_PLANE_16 = 0x100000  # continuation of a plane-1 character: 0x100000 + ord(c) - 0x10000
_MARKABLE_LIMIT = "\U0001fffe"  # words with a character at or above this are left out of training


class _MarkTable(dict):
    """str.translate table moving a character to its continuation code point (memoised)."""

    def __missing__(self, o: int) -> int:
        value = _PLANE_15 + o if o < 0x10000 else _PLANE_16 + o - 0x10000
        self[o] = value
        return value


def _unmark_piece(piece: str) -> str:
    def unmark(c: str) -> str:
        o = ord(c)
        if o >= _PLANE_16:
            return chr(o - _PLANE_16 + 0x10000)
        return chr(o - _PLANE_15) if o >= _PLANE_15 else c

    text = "".join(unmark(c) for c in piece)
    return "##" + text if ord(piece[0]) >= _PLANE_15 else text


def _train_wordpiece(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    from tokenizers import Tokenizer as _HF
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
    )
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    table = _MarkTable()

    def marked_texts() -> Iterable[str]:
        for text in texts:
            words = pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
            yield " ".join(
                w[0] + w[1:].translate(table) for w, _ in words if max(w) < _MARKABLE_LIMIT
            )

    bpe = _HF(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    bpe.train_from_iterator(marked_texts(), trainer)

    vocab: dict[str, int] = {}
    for piece, _ in sorted(bpe.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]):
        token = piece if piece in SPECIAL_TOKENS else _unmark_piece(piece)
        vocab.setdefault(token, len(vocab))
    tok = _HF(models.WordPiece(vocab=vocab, unk_token=UNK_TOKEN, continuing_subword_prefix="##"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return HFTokenizer("wordpiece", tok)


def _sha256_json(obj) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
