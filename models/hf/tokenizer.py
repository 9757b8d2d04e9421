"""A Loom tokenizer in the form `transformers.AutoTokenizer.from_pretrained(DIR)` loads.

The result is a `tokenizers` tokenizer (`tokenizer.json`) wrapped by transformers' generic fast
tokenizer class, with the special-token roles (eos, pad, mask, cls, sep, unk) and the text
template of the model family (`TokenConventions` in models/hf/common.py). This module takes
plain values (a `tokenizers.Tokenizer`, a SentencePiece model's bytes, the reserved tokens'
ids) and imports nothing from the data pipeline; launch/export_hf.py finds a run's tokenizer.

Sources:
- `byte_tokenizer`: Loom's byte layout, byte b is id b and the reserved tokens follow at their
  ids; byte-level pre-tokenization with no merges encodes every text to its UTF-8 bytes, and
  the byte-level decoder decodes (invalid UTF-8 becomes U+FFFD, as in Loom).
- a trained or given `tokenizers.Tokenizer` (bpe, wordpiece, unigram, tokenizer.json): used as
  it is, its post-processor replaced by the family's template.
- `sentencepiece_tokenizer`: a SentencePiece model (unigram or BPE) converted with
  transformers' own converter; the pieces that hold a reserved token (the model's unknown,
  eos, pad or a control piece) are renamed to Loom's name, and the reserved tokens Loom
  appended after the pieces are appended at the same ids.

Every reserved token is a special token of the result. Loom encodes text containing
"[MASK]" or "<eos>" as plain text; a transformers tokenizer, this one included, turns such
strings into their special ids unless called with `split_special_tokens=True`. Any reserved
token that cannot keep its Loom id raises ConfigError naming it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import ConfigError
from models.hf.common import TokenConventions

if TYPE_CHECKING:  # tokenizers and transformers are imported when exporting
    from tokenizers import Tokenizer

__all__ = ["byte_tokenizer", "save_tokenizer", "sentencepiece_tokenizer"]

N_BYTES = 256
# The generic fast-tokenizer class: transformers 5 also calls it TokenizersBackend, which
# earlier releases cannot load by that name.
TOKENIZER_CLASS = "PreTrainedTokenizerFast"
_SP_MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}
# SentencePiece piece types that encoding produces: normal, user-defined, byte.
_SP_PRODUCED = (1, 4, 6)


def _byte_to_char() -> dict[int, str]:
    """Byte-level pre-tokenization's alphabet: every byte as one printable character
    (the printable Latin-1 bytes are themselves, the rest are shifted past 255)."""
    from tokenizers import pre_tokenizers

    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = [b for b in range(N_BYTES) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(N_BYTES + i) for i, b in enumerate(shifted)})
    if set(table.values()) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise RuntimeError("tokenizers' byte-level alphabet is not the expected one")
    return table


def byte_tokenizer(special_ids: Mapping[str, int]) -> Tokenizer:
    """Loom's byte tokenizer: ids 0..255 are the UTF-8 bytes, the reserved tokens follow."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: b for b, char in _byte_to_char().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # One pre-token per text (no regex split) and no merges: each byte is one token.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    _add_special_tokens(tok, special_ids)
    return tok


def sentencepiece_tokenizer(model_proto: bytes, special_ids: Mapping[str, int]) -> Tokenizer:
    """A SentencePiece model (unigram or BPE) with Loom's reserved tokens at their ids."""
    try:
        from sentencepiece import sentencepiece_model_pb2
        from transformers.convert_slow_tokenizer import SpmConverter
    except ImportError as err:
        raise ConfigError(f"converting a SentencePiece model needs {err.name}") from None
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    kind = _SP_MODEL_TYPES.get(proto.trainer_spec.model_type, "unknown")
    pieces = _sentencepiece_pieces(proto, special_ids)
    if kind == "unigram":
        vocab: Any = pieces
    elif kind == "bpe":
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    else:
        raise ConfigError(
            f"a SentencePiece model of type {kind} has no Hugging Face tokenizers equivalent"
        )
    unk_id = proto.trainer_spec.unk_id
    if 0 <= unk_id < len(pieces):
        proto.trainer_spec.unk_piece = pieces[unk_id][0]
    # legacy=True: the dummy prefix goes before every text, as SentencePiece adds it.
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)
    if tok is None:
        raise ConfigError("transformers could not convert the SentencePiece model")
    _add_special_tokens(tok, special_ids)
    return tok


def _sentencepiece_pieces(proto, special_ids: Mapping[str, int]) -> list[tuple[str, float]]:
    """(piece, score) by id, ready for `tokenizers`.

    SentencePiece never produces its unknown, control and unused pieces from text, but a
    `tokenizers` unigram model would (their score, 0, beats any split): they get a score below
    every other path. Those that hold a Loom reserved token take its name, so both decode
    the same.
    """
    by_id = {token_id: name for name, token_id in special_ids.items()}
    pieces = [(p.piece, p.score) for p in proto.pieces]
    floor = min((score for _, score in pieces), default=0.0) - 1e6
    taken = {piece for piece, _ in pieces}
    for i, p in enumerate(proto.pieces):
        if p.type in _SP_PRODUCED:
            continue
        name = by_id.get(i, p.piece)
        if name != p.piece and name in taken:
            raise ConfigError(
                f"reserved token {name} (id {i}) takes the SentencePiece piece {p.piece!r}, "
                f"but the model also has a piece named {name!r}"
            )
        pieces[i] = (name, floor)
    return pieces


def _add_special_tokens(tok: Tokenizer, special_ids: Mapping[str, int]) -> None:
    """Make every reserved token special at its Loom id: one that names an existing entry
    (a SentencePiece control piece, a trained tokenizer's own) keeps it; the others are
    appended in id order, which must leave no gap."""
    from tokenizers import AddedToken

    for name, token_id in sorted(special_ids.items(), key=lambda kv: kv[1]):
        content = tok.id_to_token(token_id)
        if content is None:
            size = tok.get_vocab_size(with_added_tokens=True)
            if token_id != size:
                raise ConfigError(
                    f"reserved token {name} has id {token_id}, but the next free id is {size}"
                )
            content = name
        tok.add_special_tokens([AddedToken(content, special=True, normalized=False)])
        if tok.token_to_id(content) != token_id:
            raise ConfigError(
                f"reserved token {name} (id {token_id}) cannot keep its id: {content!r} is "
                f"entry {tok.token_to_id(content)} of the vocabulary"
            )


def _template(tok: Tokenizer, parts: tuple[str, ...], ids: Mapping[str, int]) -> str:
    """A TemplateProcessing template in Loom token names -> the same in `tok`'s strings."""
    out = []
    for part in parts:
        name, colon, type_id = part.partition(":")
        out.append(name if name.startswith("$") else tok.id_to_token(ids[name]))
        out[-1] += colon + type_id
    return " ".join(out)


def _apply_conventions(
    tok: Tokenizer, conventions: TokenConventions, special_ids: Mapping[str, int]
) -> dict[str, str]:
    """Set the family's template on `tok`; return the transformers role -> token string."""
    from tokenizers import processors

    in_template = {
        part.partition(":")[0]
        for parts in (conventions.single, conventions.pair)
        for part in parts or ()
        if not part.startswith("$")
    }
    missing = sorted((set(conventions.roles.values()) | in_template) - set(special_ids))
    if missing:
        raise ConfigError(f"the tokenizer has no {missing} token, which the model family needs")
    roles = {role: tok.id_to_token(special_ids[name]) for role, name in conventions.roles.items()}
    if conventions.single is None:
        tok.post_processor = None  # Loom's objective adds nothing around a text
    else:
        tok.post_processor = processors.TemplateProcessing(
            single=_template(tok, conventions.single, special_ids),
            pair=_template(tok, conventions.pair or conventions.single, special_ids),
            special_tokens=[
                (tok.id_to_token(special_ids[n]), special_ids[n]) for n in sorted(in_template)
            ],
        )
    return roles


def save_tokenizer(
    tok: Tokenizer,
    directory: str | Path,
    *,
    conventions: TokenConventions,
    special_ids: Mapping[str, int],
    max_length: int,
) -> list[str]:
    """Write `tok` with the family's conventions into `directory` (tokenizer.json,
    tokenizer_config.json and what else transformers writes); return the file names."""
    from tokenizers import Tokenizer as _Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = _Tokenizer.from_str(tok.to_str())  # the caller's object stays as it was
    tok.no_padding()
    tok.no_truncation()
    roles = _apply_conventions(tok, conventions, special_ids)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    before = set(directory.iterdir())
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        clean_up_tokenization_spaces=False,  # decode must give back the text exactly
        model_max_length=max_length,
        model_input_names=list(conventions.input_names),
        **roles,
    )
    wrapped.save_pretrained(directory)
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = TOKENIZER_CLASS
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", "utf-8")
    return sorted(p.name for p in set(directory.iterdir()) - before)
