"""Masked language modelling (BERT, whole-word, SpanBERT) with the NSP and SOP pair tasks.

Legend: B = batch, S = sample_len (seq_len + 1 tokens per packed row), T = seq_len (tokens fed
to the model), N = T - 3, the content budget of a pair sequence.

Objectives (data.objective):
    mlm       [CLS] row[:T-2] [SEP]; no pair task. The row runs across documents with the
              <eos> that ends each one between them (RoBERTa's FULL-SENTENCES), and
              attention crosses it; with data.document_attention, position ids restart and
              attention stops at the row's document boundaries instead.
    mlm_nsp   [CLS] A [SEP] B [SEP] <pad>...; nsp_labels 0 = B is the text that follows A,
              1 = B is not the continuation.
    mlm_sop   [CLS] A [SEP] B [SEP] <pad>... with A, B consecutive in one document, swapped
              with probability data.mlm.pair_swap_prob; nsp_labels 1 = swapped.
Token types are 0 for [CLS], A and the first [SEP], 1 for B and the second [SEP], 0 for padding.

Pairs come from the row alone, so they stay a pure function of (seed, sample id). A row is
split into documents at `doc_start` and after every <eos> (the <eos> tokens themselves are
dropped from pairs), and segments never cross a document boundary: a segment containing an
<eos> would reveal the label (only continuations could hold one). Split points are sentence
starts (`sent_start`) where the loader provides them, else any token. The rules:

* A begins at the start of the row's longest document piece and ends at a split point k in
  its first half, so A is a prefix of that piece's sentences.
* NSP negative source, drawn before the label so that lengths never reveal it: the longest
  *other* document of the row when it can fill at least half of B's room; otherwise the
  same document, restarting at a sentence start j after a random jump of at most an eighth
  of the piece past k (a "later part of the row", with at least one token skipped).
* B has one length m for both labels: the least of what the continuation, the negative
  source and the budget allow. Label 0 takes B = row[k : k+m], label 1 takes row[j : j+m].
  The rest of the sequence is padding (and attention_mask False); the continuation is never
  longer than the negative could be, so padding carries no information about the label.
  The price is padding. Measured on the built-in corpus: with the byte tokenizer, the
  loader's sentence starts and seq_len 128, 4.1% of the tokens for NSP and 0.5% for SOP;
  with byte-level BPE (4k vocabulary), no sentence starts and seq_len 512, 11.5% and 6%.
* SOP: A and B split the longest piece (up to N tokens) at a sentence start; both come from
  one document, so only their order differs between the labels.
* A row that cannot hold both a positive and a negative (its longest piece has under three
  tokens and no other document stands beside it: a row of almost only <eos>) gets the
  continuation and an ignored nsp label (-100), so no label is decided by a row's shape.

Masking (data.mlm): `mask_prob` of the non-special tokens of the final sequence are chosen
(rounded, at least one), by unit: `token`; `word` (whole-word masking: a word is a token that
starts one plus the continuation tokens after it, see `word_start_table`); or `span` (SpanBERT:
span lengths in words drawn from a geometric distribution with parameter span_p truncated to
1..span_max and renormalised, mean 3.8 words at the defaults, at random word anchors, until
the budget is met); or `ngram` (UniLM: spans of 1, 2 or 3 tokens with probabilities 0.8,
0.1, 0.1, drawn the same way over tokens); or `phrase` (ERNIE's phrase level without a
phrase lexicon, as ERNIE-Gram's n-grams: spans of 1, 2 or 3 whole words with P(n) = 6/11,
3/11, 2/11, drawn the same way over words); or `knowledge` (ERNIE 1.0: each sample is masked
at one level drawn from data.mlm.knowledge_stages, with its own random stream: `token`, or
`phrase`, or `entity`, which falls back to `phrase` on a corpus without entity spans, with
a warning). When the batch carries corpus spans (`span_start` bool [B, S], True where a span
begins, and `span_kind` int8 [B, S], SPAN_KINDS' code of the span holding each token, 0
outside spans), the phrase and entity levels mask, instead of n-grams, units that are the
spans of that kind (each whole; a span cut by a segment start counts from there) and the
words outside them, chosen as whole words are (ERNIE 1.0 masks segments, uniformly).
Whole units are taken in random order while they fit the budget (one that would overflow it
is skipped), so words and spans may leave it a token or two short (a unit longer than the
budget, such as a long entity in a short row, is never taken). Of the chosen tokens,
replace_with_mask become [MASK], replace_with_random a uniformly drawn non-special token, the
rest stay; labels hold the original id there and -100 elsewhere. Special tokens ([CLS], [SEP],
<pad>, <eos>, ...) are never chosen. Masks are redrawn for every sample id, so masking is
dynamic (RoBERTa) for free.
"""

from __future__ import annotations

import numpy as np
import torch

from common.log import warn_once
from data_pipeline.config import KNOWLEDGE_STAGES, DataConfig
from data_pipeline.documents import SPAN_CODES
from data_pipeline.objectives import IGNORE_INDEX, random_token_ids, sample_rng
from data_pipeline.objectives.clm import document_mask, document_positions

__all__ = [
    "MaskedLM",
    "knowledge_stage",
    "nsp_layout",
    "sample_spans",
    "sop_layout",
    "span_length_probs",
    "word_start_table",
]

NAMES = ("mlm", "mlm_nsp", "mlm_sop")
# Independent streams per sample, so changing the masking leaves the pairs as they were.
_PAIR_SALT = 1
_MASK_SALT = 2
# The knowledge-masking level of a sample (3 is UniLM's task, 4 and 5 StructBERT's streams,
# 7 ELECTRA's sampling noise).
_STAGE_SALT = 6
# NSP negatives from A's own document skip ahead by at most this share of the piece.
_MAX_JUMP_FRACTION = 0.125
# Span masking gives up after this many anchors in a row that cannot start a span.
_MAX_FAILED_ANCHORS = 32

# UniLM's n-gram masking: P(1, 2, 3 tokens) of a masked unit.
NGRAM_PROBS = np.array([0.8, 0.1, 0.1])
# Codes of batch["span_kind"] (0: a token outside every corpus span).
SPAN_KINDS = SPAN_CODES
# Phrase masking: P(1, 2, 3 words) of a masked unit, proportional to 1/n. ERNIE-Gram takes its
# n-grams (n <= 3) from a lexicon; without one, 1/n keeps most units short (mean 1.64 words,
# so a 15% budget still spreads over many places) while a third of the masked tokens or more
# fall in multi-word phrases.
PHRASE_PROBS = np.array([6.0, 3.0, 2.0]) / 11.0
# Units whose masking groups the tokens of a word (they need the word-start tables).
_WORD_UNITS = ("word", "span", "phrase", "knowledge")

_WHITESPACE_BYTES = frozenset(b" \t\n\r\x0b\x0c")
# How byte-level BPE (GPT-2's byte-to-unicode map) and SentencePiece spell whitespace.
_SPACE_MARKERS = frozenset("Ġ▁ ")
_WHITESPACE_CHARS = frozenset("ĠĊĉčċČ▁ \t\n\r")


def word_start_table(tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-id tables (marker, ends_space, pure_space), each bool [vocab_size].

    A token begins a word when it carries a word-start marker (WordPiece: no "##" prefix;
    byte-level BPE / SentencePiece: a leading 'Ġ' / '▁' on a piece that is not all
    whitespace), when it follows a special token or the start of the sequence, or when it is
    not pure whitespace and follows a token ending in whitespace (the byte tokenizer, and BPE
    pieces after a newline). Whitespace-only tokens thus end the word before them.
    """
    v = tokenizer.vocab_size
    marker, ends_space, pure_space = (np.zeros(v, dtype=bool) for _ in range(3))
    if tokenizer.kind == "byte":
        space = np.array(sorted(_WHITESPACE_BYTES))
        ends_space[space] = pure_space[space] = True
        return marker, ends_space, pure_space
    pieces = [tokenizer.id_to_token(i) for i in range(v)]
    # WordPiece marks continuations ("##ing") rather than word starts.
    wordpiece = tokenizer.kind == "wordpiece" or any(p.startswith("##") for p in pieces if p)
    for i, piece in enumerate(pieces):
        if not piece:
            continue
        if wordpiece:
            marker[i] = not piece.startswith("##")
            continue
        pure_space[i] = set(piece) <= _WHITESPACE_CHARS
        # A lone 'Ġ' before an unmarked piece is trailing space, as with bytes: no word start.
        marker[i] = piece[0] in _SPACE_MARKERS and not pure_space[i]
        ends_space[i] = piece[-1] in _WHITESPACE_CHARS
    return marker, ends_space, pure_space


def knowledge_stage(seed: int, sample_id: int, shares) -> str:
    """The ERNIE masking level (token | phrase | entity) of one sample, drawn with `shares`."""
    rng = sample_rng(seed, sample_id, salt=_STAGE_SALT)
    return KNOWLEDGE_STAGES[int(rng.choice(len(KNOWLEDGE_STAGES), p=np.asarray(shares)))]


def span_length_probs(p: float, max_len: int) -> np.ndarray:
    """P(length = 1..max_len): geometric(p) truncated to max_len and renormalised (SpanBERT)."""
    lengths = np.arange(1, max_len + 1)
    probs = p * (1 - p) ** (lengths - 1)
    return probs / probs.sum()


def sample_spans(
    unit_len: np.ndarray,
    budget: int,
    rng: np.random.Generator,
    *,
    p: float = 0.2,
    max_len: int = 10,
    probs: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """SpanBERT span selection over words: (chosen bool [n_words], drawn span lengths).

    Each span draws a length in units from `probs` (P(length = 1..), by default
    `span_length_probs(p, max_len)`) and a random anchor unit, then covers that many
    consecutive units, stopping early at an already chosen unit, the end of the sequence,
    or a unit that would overflow `budget` (in tokens).
    """
    n = len(unit_len)
    chosen = np.zeros(n, dtype=bool)
    drawn: list[int] = []
    probs = span_length_probs(p, max_len) if probs is None else probs
    max_len = len(probs)
    total, failures = 0, 0
    while total < budget and failures < _MAX_FAILED_ANCHORS and n:
        length = int(rng.choice(max_len, p=probs)) + 1
        anchor = int(rng.integers(n))
        end = anchor
        while (
            end < n
            and end - anchor < length
            and not chosen[end]
            and total + unit_len[end] <= budget
        ):
            total += int(unit_len[end])
            end += 1
        if end == anchor:
            failures += 1
            continue
        failures = 0
        chosen[anchor:end] = True
        drawn.append(length)
    return chosen, np.asarray(drawn, dtype=np.int64)


def _pieces(tokens_S: np.ndarray, bound_S: np.ndarray, eos_id: int) -> list[tuple[int, int]]:
    """[start, end) of each document piece of a row, <eos> tokens excluded, empty ones dropped."""
    starts = np.flatnonzero(bound_S).tolist() + [len(tokens_S)]
    pieces = []
    for s, e in zip(starts[:-1], starts[1:], strict=True):
        keep = np.flatnonzero(tokens_S[s:e] != eos_id)
        if len(keep):
            # A document ends with its <eos>; anything after it up to the next start is kept.
            pieces.append((s + int(keep[0]), s + int(keep[-1]) + 1))
    return pieces


def _split_point(rng: np.random.Generator, sent_S: np.ndarray, lo: int, hi: int) -> int:
    """A sentence start in [lo, hi], uniformly; any token position there if none is."""
    candidates = np.flatnonzero(sent_S[lo : hi + 1]) + lo
    if len(candidates):
        return int(rng.choice(candidates))
    return int(rng.integers(lo, hi + 1))


def _longest(pieces: list[tuple[int, int]]) -> int:
    return int(np.argmax([e - s for s, e in pieces]))


def nsp_layout(
    rng: np.random.Generator,
    pieces: list[tuple[int, int]],
    sent_S: np.ndarray,
    *,
    budget: int,
    negative_prob: float,
    split_anywhere: bool = False,
) -> tuple[list[tuple[int, int]], int]:
    """Segments [(a0, a1), (b0, b1)] of the row and the NSP label (see the module docstring).

    `split_anywhere` draws A's end from the whole piece rather than its first half, so A and
    B have the same length distribution (mlm_struct swaps them for its "previous" class).
    """
    i = _longest(pieces)
    s, e = pieces[i]
    room = min(e - s, budget)
    if room < 2:
        return [(s, s + room), (s, s)], IGNORE_INDEX
    last = s + room - 1 if split_anywhere else s + max(1, room // 2)
    k = _split_point(rng, sent_S, s + 1, last)
    b_room = min(e - k, budget - (k - s))
    others = [piece for j, piece in enumerate(pieces) if j != i]
    j, neg_room = k, 0
    if others:
        o0, o1 = others[_longest(others)]
        if 2 * (o1 - o0) >= b_room:
            j, neg_room = o0, o1 - o0
    if neg_room == 0:
        max_jump = max(1, int(_MAX_JUMP_FRACTION * room))
        if k + 1 < e:
            j = _split_point(rng, sent_S, k + 1, min(e - 1, k + max_jump))
            neg_room = e - j
    if neg_room == 0:
        # Only a 2-token piece gets here; its label would always be 0, so it is not scored.
        return [(s, k), (k, k + b_room)], IGNORE_INDEX
    label = int(rng.random() < negative_prob)
    m = min(b_room, neg_room)
    b0 = j if label else k
    return [(s, k), (b0, b0 + m)], label


def sop_layout(
    rng: np.random.Generator,
    pieces: list[tuple[int, int]],
    sent_S: np.ndarray,
    *,
    budget: int,
    swap_prob: float,
) -> tuple[list[tuple[int, int]], int]:
    """Segments in model order and the SOP label (1 = the two halves were swapped)."""
    s, e = pieces[_longest(pieces)]
    room = min(e - s, budget)
    if room < 2:
        return [(s, s + room), (s, s)], IGNORE_INDEX
    k = _split_point(rng, sent_S, s + 1, s + room - 1)
    a, b = (s, k), (k, s + room)
    if rng.random() < swap_prob:
        return [b, a], 1
    return [a, b], 0


class MaskedLM:
    """data.objective = mlm | mlm_nsp | mlm_sop (module docstring); picklable for workers."""

    def __init__(self, name: str, *, cfg: DataConfig, tokenizer, seq_len: int, seed: int):
        if name not in NAMES:
            raise ValueError(f"data.objective={name!r} is not a masked-LM task; use one of {NAMES}")
        cfg.mlm.validate()
        cfg.check_objective(name, seq_len=seq_len)
        self.name = name
        self.mlm = cfg.mlm
        self.seq_len = seq_len
        self.seed = seed
        self.pairs = name != "mlm"
        self.document_attention = cfg.document_attention
        special = tokenizer.special_tokens
        try:
            self.cls_id, self.sep_id = special["[CLS]"], special["[SEP]"]
            self.mask_id, self.pad_id = special["[MASK]"], special["<pad>"]
            self.eos_id = special["<eos>"]
        except KeyError as err:
            raise ValueError(f"the tokenizer lacks the special token {err.args[0]}") from None
        v = tokenizer.vocab_size
        self.is_special = np.zeros(v, dtype=bool)
        self.is_special[[i for i in special.values() if i < v]] = True
        self.random_ids = random_token_ids(tokenizer)
        by_word = self.mlm.unit in _WORD_UNITS
        self.tables = word_start_table(tokenizer) if by_word else None

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens_BS, bound_BS, sent_BS, ids = self._read(batch)
        rows = [
            self._assemble(tokens_BS[i], bound_BS[i], sent_BS[i], ids[i]) for i in range(len(ids))
        ]
        input_ids_BT = np.stack([r[0] for r in rows])
        types_BT = np.stack([r[1] for r in rows])
        spans = None
        if self.mlm.unit == "knowledge" and "span_start" in batch:
            spans = self._span_marks(batch, tokens_BS, bound_BS, sent_BS, ids)
        out = self._mask(input_ids_BT, ids, spans=spans)
        out["token_type_ids"] = torch.from_numpy(types_BT)
        out["attention_mask"] = torch.from_numpy(input_ids_BT != self.pad_id)
        if self.pairs:
            out["nsp_labels"] = torch.tensor([r[2] for r in rows], dtype=torch.int64)
        elif self.document_attention:
            doc_start_BT = np.zeros_like(input_ids_BT, dtype=bool)
            doc_start_BT[:, 2:-1] = bound_BS[:, 1 : self.seq_len - 2]
            doc_start_BT = torch.from_numpy(doc_start_BT)
            out["position_ids"] = document_positions(doc_start_BT)
            out["attn_mask"] = document_mask(doc_start_BT)
        return out

    def _read(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[int]]:
        """(tokens [B, S], document starts, sentence-or-document starts, sample ids) of a
        loader batch, whose rows must hold seq_len + 1 tokens."""
        tokens_BS = batch["tokens"].numpy()
        s = tokens_BS.shape[1]
        if s != self.seq_len + 1:
            raise ValueError(
                f"{self.name}: batch tokens have {s} columns, expected seq_len + 1 = "
                f"{self.seq_len + 1}"
            )
        bound_BS, sent_BS = self._boundaries(batch, tokens_BS)
        return tokens_BS, bound_BS, sent_BS, batch["sample_ids"].tolist()

    def _boundaries(
        self, batch: dict[str, torch.Tensor], tokens_BS: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(document starts, sentence-or-document starts), each bool [B, S]."""
        bound_BS = self._doc_bounds(batch, tokens_BS)
        return bound_BS, bound_BS | _optional(batch, "sent_start", tokens_BS.shape)

    def _doc_bounds(self, batch: dict[str, torch.Tensor], tokens_BS: np.ndarray) -> np.ndarray:
        """Where documents begin: the loader's doc_start, after every <eos>, and column 0."""
        bound_BS = _optional(batch, "doc_start", tokens_BS.shape).copy()
        bound_BS[:, 1:] |= tokens_BS[:, :-1] == self.eos_id
        bound_BS[:, 0] = True
        return bound_BS

    def _assemble(
        self, tokens_S: np.ndarray, bound_S: np.ndarray, sent_S: np.ndarray, sample_id: int
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(input ids [T], token types [T], pair label) of one row, before masking."""
        if not self.pairs:
            return self._single(tokens_S)
        layout = nsp_layout if self.name == "mlm_nsp" else sop_layout
        ids_T, types_T, label, _ = self._pair(
            tokens_S, bound_S, sent_S, sample_id, layout, self.mlm.pair_swap_prob
        )
        return ids_T, types_T, label

    def _span_marks(
        self,
        batch: dict[str, torch.Tensor],
        tokens_BS: np.ndarray,
        bound_BS: np.ndarray,
        sent_BS: np.ndarray,
        sample_ids: list[int],
    ) -> tuple[np.ndarray, np.ndarray]:
        """(span starts bool [B, T], span kinds int8 [B, T]) at the model's positions."""
        start_BS = _optional(batch, "span_start", tokens_BS.shape)
        kind_BS = batch["span_kind"].numpy()
        if kind_BS.shape != tokens_BS.shape:
            raise ValueError(
                f"batch['span_kind'] has shape {kind_BS.shape}, expected {tokens_BS.shape}"
            )
        b, t = len(tokens_BS), self.seq_len
        start_BT = np.zeros((b, t), dtype=bool)
        kind_BT = np.zeros((b, t), dtype=np.int8)
        for i, sample_id in enumerate(sample_ids):
            src_T = self._sources(tokens_BS[i], bound_BS[i], sent_BS[i], sample_id)
            known = src_T >= 0
            start_BT[i, known] = start_BS[i, src_T[known]]
            kind_BT[i, known] = kind_BS[i, src_T[known]]
        return start_BT, kind_BT

    def _sources(
        self, tokens_S: np.ndarray, bound_S: np.ndarray, sent_S: np.ndarray, sample_id: int
    ) -> np.ndarray:
        """int64 [T]: the row position each model position was copied from, -1 for the
        special tokens and padding (the same layout `_assemble` draws)."""
        t = self.seq_len
        src_T = np.full(t, -1, dtype=np.int64)
        if not self.pairs:
            src_T[1 : t - 1] = np.arange(t - 2)
            return src_T
        layout = nsp_layout if self.name == "mlm_nsp" else sop_layout
        segments, _ = self._segments(
            tokens_S, bound_S, sent_S, sample_id, layout, self.mlm.pair_swap_prob
        )
        (a0, a1), (b0, b1) = segments
        src_T[1 : 1 + a1 - a0] = np.arange(a0, a1)
        src_T[a1 - a0 + 2 : a1 - a0 + 2 + b1 - b0] = np.arange(b0, b1)
        return src_T

    def _single(self, tokens_S: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """[CLS] row[:T-2] [SEP], token types 0, no pair label."""
        t = self.seq_len
        ids_T = np.concatenate([[self.cls_id], tokens_S[: t - 2], [self.sep_id]])
        return ids_T.astype(np.int64), np.zeros(t, dtype=np.int64), IGNORE_INDEX

    def _pair(
        self,
        tokens_S: np.ndarray,
        bound_S: np.ndarray,
        sent_S: np.ndarray,
        sample_id: int,
        layout,
        prob: float,
    ) -> tuple[np.ndarray, np.ndarray, int, int]:
        """(ids [T], token types [T], pair label, length of [CLS] A [SEP]) of the pair that
        `layout` (nsp_layout or sop_layout, with probability `prob`) picks from the row."""
        t = self.seq_len
        segments, label = self._segments(tokens_S, bound_S, sent_S, sample_id, layout, prob)
        (a0, a1), (b0, b1) = segments
        ids_T = np.full(t, self.pad_id, dtype=np.int64)
        types_T = np.zeros(t, dtype=np.int64)
        parts = [[self.cls_id], tokens_S[a0:a1], [self.sep_id], tokens_S[b0:b1], [self.sep_id]]
        seq = np.concatenate(parts)
        ids_T[: len(seq)] = seq
        types_T[a1 - a0 + 2 : len(seq)] = 1
        return ids_T, types_T, label, a1 - a0 + 2

    def _segments(
        self,
        tokens_S: np.ndarray,
        bound_S: np.ndarray,
        sent_S: np.ndarray,
        sample_id: int,
        layout,
        prob: float,
    ) -> tuple[list[tuple[int, int]], int]:
        """The two segments `layout` picks from the row for this sample, and its label."""
        rng = sample_rng(self.seed, sample_id, salt=_PAIR_SALT)
        pieces = _pieces(tokens_S, bound_S, self.eos_id) or [(0, 0)]
        prob_key = "negative_prob" if layout is nsp_layout else "swap_prob"
        return layout(rng, pieces, sent_S, budget=self.seq_len - 3, **{prob_key: prob})

    def _mask(
        self,
        input_ids_BT: np.ndarray,
        sample_ids: list[int],
        *,
        spans: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Choose, replace and label the masked tokens of every row; `spans`: the corpus
        spans at the model's positions (see `_span_marks`), when the batch has them."""
        candidate_BT = ~self.is_special[input_ids_BT]
        unit_start_BT = candidate_BT if self.tables is None else self._word_starts(input_ids_BT)
        masked_BT = input_ids_BT.copy()
        labels_BT = np.full_like(input_ids_BT, IGNORE_INDEX)
        for i, sample_id in enumerate(sample_ids):
            rng = sample_rng(self.seed, sample_id, salt=_MASK_SALT)
            unit = self._row_unit(sample_id, has_spans=spans is not None)
            starts_T = candidate_BT[i] if unit == "token" else unit_start_BT[i]
            if spans is not None and unit in SPAN_KINDS:
                code = SPAN_KINDS[unit]
                starts_T = _span_units(starts_T, spans[0][i], spans[1][i] == code, candidate_BT[i])
                unit = "word"  # spans and the words outside them, taken whole
            pos = self._choose(rng, candidate_BT[i], starts_T, unit=unit)
            labels_BT[i, pos] = input_ids_BT[i, pos]
            action = rng.random(len(pos))
            to_mask = action < self.mlm.replace_with_mask
            to_random = ~to_mask & (
                action < self.mlm.replace_with_mask + self.mlm.replace_with_random
            )
            masked_BT[i, pos[to_mask]] = self.mask_id
            picks = rng.integers(len(self.random_ids), size=int(to_random.sum()))
            masked_BT[i, pos[to_random]] = self.random_ids[picks]
        return {
            "input_ids": torch.from_numpy(masked_BT),
            "labels": torch.from_numpy(labels_BT),
        }

    def _row_unit(self, sample_id: int, *, has_spans: bool = False) -> str:
        """The masking unit of one sample: data.mlm.unit, or its knowledge level."""
        if self.mlm.unit != "knowledge":
            return self.mlm.unit
        stage = knowledge_stage(self.seed, sample_id, self.mlm.knowledge_stages)
        if stage == "entity" and not has_spans:
            warn_once(
                "data.mlm.unit=knowledge: the corpus has no entity spans; entity-level "
                "samples are masked at phrase level"
            )
            return "phrase"
        return stage

    def _word_starts(self, input_ids_BT: np.ndarray) -> np.ndarray:
        marker, ends_space, pure_space = self.tables
        special_BT = self.is_special[input_ids_BT]
        after_break_BT = np.ones_like(special_BT)
        after_break_BT[:, 1:] = special_BT[:, :-1]
        after_space_BT = np.zeros_like(special_BT)
        after_space_BT[:, 1:] = ends_space[input_ids_BT[:, :-1]]
        start_BT = marker[input_ids_BT] | after_break_BT
        start_BT |= after_space_BT & ~pure_space[input_ids_BT]
        return start_BT & ~special_BT

    def _choose(
        self,
        rng: np.random.Generator,
        candidate_T: np.ndarray,
        unit_start_T: np.ndarray,
        *,
        unit: str | None = None,
    ) -> np.ndarray:
        """Positions chosen for prediction in one row, by `unit` (default data.mlm.unit)."""
        unit = unit or self.mlm.unit
        pos = np.flatnonzero(candidate_T)
        if not len(pos):
            return pos
        budget = max(1, round(self.mlm.mask_prob * len(pos)))
        unit_of = np.cumsum(unit_start_T[pos]) - 1
        unit_of -= unit_of[0]  # a row cannot start inside a word: specials precede it
        unit_len = np.bincount(unit_of)
        if unit == "span":
            chosen, _ = sample_spans(
                unit_len, budget, rng, p=self.mlm.span_p, max_len=self.mlm.span_max
            )
        elif unit == "ngram":
            chosen, _ = sample_spans(unit_len, budget, rng, probs=NGRAM_PROBS)
        elif unit == "phrase":
            chosen, _ = sample_spans(unit_len, budget, rng, probs=PHRASE_PROBS)
        else:
            chosen = _greedy_units(unit_len, budget, rng)
        return pos[chosen[unit_of]]


def _span_units(
    word_start_T: np.ndarray, start_T: np.ndarray, inside_T: np.ndarray, candidate_T: np.ndarray
) -> np.ndarray:
    """Unit starts that make each span (a run of `inside_T`, split at `start_T`) one unit and
    leave the words outside spans as they are; the token after a span starts a unit too."""
    prev_inside_T = np.zeros_like(inside_T)
    prev_inside_T[1:] = inside_T[:-1]
    begins_T = inside_T & (start_T | ~prev_inside_T)
    after_T = ~inside_T & prev_inside_T & candidate_T
    return (word_start_T & ~inside_T) | begins_T | after_T


def _greedy_units(unit_len: np.ndarray, budget: int, rng: np.random.Generator) -> np.ndarray:
    """Units in random order, each taken if it still fits the budget (BERT's rule).

    Vectorised by rounds: each round takes the longest prefix that fits and drops the unit
    that overflowed, so there are as many rounds as skipped units, not as units.
    """
    chosen = np.zeros(len(unit_len), dtype=bool)
    order = rng.permutation(len(unit_len))
    lens = unit_len[order]
    remaining = budget
    while remaining > 0 and len(order):
        fits = np.cumsum(lens) <= remaining
        k = len(fits) if fits.all() else int(fits.argmin())
        chosen[order[:k]] = True
        remaining -= int(lens[:k].sum())
        keep = lens[k + 1 :] <= remaining
        order, lens = order[k + 1 :][keep], lens[k + 1 :][keep]
    return chosen


def _optional(batch: dict[str, torch.Tensor], key: str, shape: tuple[int, int]) -> np.ndarray:
    if key not in batch:
        return np.zeros(shape, dtype=bool)
    value = batch[key].numpy().astype(bool, copy=False)
    if value.shape != shape:
        raise ValueError(f"batch[{key!r}] has shape {value.shape}, expected {shape}")
    return value
