"""BART's denoising (Lewis et al. 2020, section 2.2): data.objective=denoising.

The encoder reads a corrupted window of the packed row and the decoder writes the window back.
Options in data.denoising; the defaults are BART-large's mix (text infilling of 30% of the
tokens, every sample's sentences permuted). The rules, per sample, with W = seq_len:

1. The window is the first W tokens of the row (its last token is unused). The target is the
   window unchanged: labels = window, every token scored, and decoder_input_ids = <eos>
   window[:-1] (BART starts its decoder with </s>).
2. Sentence permutation, with probability permute_sentences: the window is cut into pieces at
   sentence starts (sent_start | doc_start; position 0 always starts a piece) and the pieces
   of each document are shuffled uniformly among that document's places; documents keep
   their order. As in mlm, a document also starts after every <eos>, and an <eos> is a piece
   of its own that never moves, so each document still ends with its <eos> (BART keeps its
   closing </s> in place).
3. Text infilling of n = round(W * infill_ratio) tokens of the (permuted) window: span lengths
   are drawn from Poisson(poisson_lambda) until they sum to >= n, and the last is shortened
   so they sum to exactly n (n = 0 draws none). The k spans, zero-length ones included, are
   interleaved uniformly with the W - n other tokens: k of the W - n + k slots are chosen
   without replacement, and the spans fill them in draw order. A span of L >= 1 tokens is
   replaced by one [MASK]; a span of length 0 inserts one [MASK] at its slot. Token masking
   and token deletion then take disjoint random sets of round(W * mask_ratio) and
   round(W * delete_ratio) of the W - n tokens that infilling left (never an inserted
   [MASK]): the first become [MASK], the second are removed. Each [MASK] that infilling or
   masking emitted then becomes, with probability random_ratio, a uniformly drawn
   non-special token (fairseq's --mask-random).
4. Rotation, with probability rotate: the source is rotated to begin at its token at an
   offset drawn uniformly from [1, len) (a one-token source stays as it is).
5. The source holds W - n - deleted + k tokens: a span of L >= 1 tokens never lengthens it,
   so only zero-length insertions can push it past W. Those that do not fit are dropped, the
   last ones first, before step 3's random replacement. That takes a small poisson_lambda
   (many empty spans): at BART's lambda = 3 the source is about W - 2n/3 tokens long.
   input_ids are padded with <pad> to W, and attention_mask is True on the source's tokens.

    window             a b c . d e . f g <eos> h i    pieces "abc." "de." "fg" <eos> of one
    permuted           d e . a b c . f g <eos> h i    document, then "hi" of the next
    source (n = 4)     d [MASK] a b [MASK] f g <eos> [MASK] h i    spans of 2, 2 and 0 tokens
    decoder_input_ids  <eos> a b c . d e . f g <eos> h
    labels             a b c . d e . f g <eos> h i

The window may span several packed documents; apart from the permutation their <eos>
separators are ordinary tokens (T5's span corruption treats them the same way).

Randomness: one stream per sample, sample_rng(seed, sample id, salt=SALT), drawn in a fixed
order (the permutation and rotation coins, the piece order, span lengths, span slots, the
masked and deleted tokens, the random replacements, the rotation offset), so a sample's noise
depends on nothing but (seed, sample id) and its row.

Legend: B = batch, R = row length (seq_len + 1 from the loader), W = window = seq_len,
N = seq_len (encoder length), T = seq_len (decoder length), P = pieces of the window,
K = infilling spans, Q = tokens of the infilled window, M = source tokens (M <= W).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.objectives import random_token_ids, sample_rng, special_id

__all__ = [
    "INSERTED",
    "KEPT",
    "MASKED",
    "SALT",
    "SPAN",
    "Denoising",
    "Noised",
    "drop_insertions",
    "infill",
    "mask_and_delete",
    "permute_pieces",
    "piece_order",
    "poisson_spans",
    "replace_random",
    "rotate",
    "sentence_pieces",
    "span_slots",
]

# Apart from mlm's (1, 2, 6), UniLM's (3), StructBERT's (4, 5) and ELECTRA's (7) streams.
SALT = 8
# What each source token is: a window token left alone, the [MASK] of a span of >= 1 tokens,
# a [MASK] inserted by a zero-length span, a window token masked one for one.
KEPT, SPAN, INSERTED, MASKED = 0, 1, 2, 3
# Poisson draws per round of `poisson_spans` (about the spans one window needs, so one round
# mostly suffices), capped so that a tiny poisson_lambda cannot allocate without bound.
_MAX_DRAWS = 1 << 16


class Noised(NamedTuple):
    """One sample's source, and where each of its tokens came from."""

    window: np.ndarray
    """int64 [W]: the window after sentence permutation (the source is noised from it)."""
    source: np.ndarray
    """int64 [M]: the encoder's tokens."""
    kind: np.ndarray
    """int8 [M]: KEPT, SPAN, INSERTED or MASKED, for each source token."""
    origin: np.ndarray
    """int64 [M]: the (permuted) window position of a KEPT or MASKED token, the first
    position a SPAN covered, -1 for an INSERTED [MASK]."""


# ---- sentence permutation ----------------------------------------------------------------


def sentence_pieces(
    window_W: np.ndarray, doc_start_W: np.ndarray, sent_start_W: np.ndarray, *, eos_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start of each piece, its document number, whether it stays put), each [P].

    Pieces begin at position 0, sentence and document starts, every <eos> and the token after
    it (which begins a document); an <eos> piece stays put.
    """
    eos_W = window_W == eos_id
    doc_W = np.asarray(doc_start_W, dtype=bool).copy()
    doc_W[1:] |= eos_W[:-1]
    doc_W[0] = True
    starts_P = np.flatnonzero(doc_W | np.asarray(sent_start_W, dtype=bool) | eos_W)
    doc_P = (np.cumsum(doc_W) - 1)[starts_P]
    return starts_P, doc_P, eos_W[starts_P]


def piece_order(rng: np.random.Generator, doc_P: np.ndarray, fixed_P: np.ndarray) -> np.ndarray:
    """int64 [P]: which piece goes to each piece's place. The movable pieces of each document
    are shuffled uniformly among that document's movable places; fixed pieces stay."""
    order_P = np.arange(len(doc_P))
    movable = np.flatnonzero(~fixed_P)
    keys = rng.random(len(movable))
    # Sorting by document, then by a uniform key, shuffles within each document: `movable`
    # lists the places document by document, since documents follow each other.
    order_P[movable] = movable[np.lexsort((keys, doc_P[movable]))]
    return order_P


def permute_pieces(window_W: np.ndarray, starts_P: np.ndarray, order_P: np.ndarray) -> np.ndarray:
    """The window with its pieces (starting at `starts_P`) laid out as `order_P` says: place j
    holds piece order_P[j]."""
    w = len(window_W)
    lengths_P = np.diff(np.append(starts_P, w))
    placed_P = lengths_P[order_P]
    shift_W = np.repeat(starts_P[order_P] - (np.cumsum(placed_P) - placed_P), placed_P)
    return window_W[np.arange(w) + shift_W]


# ---- text infilling, masking, deletion ----------------------------------------------------


def poisson_spans(rng: np.random.Generator, num_tokens: int, lam: float) -> np.ndarray:
    """int64 [K]: span lengths ~ Poisson(lam) drawn until they sum to >= num_tokens, the last
    shortened so they sum to exactly num_tokens (no spans for 0)."""
    if num_tokens <= 0:
        return np.zeros(0, dtype=np.int64)
    per_round = min(int(num_tokens / lam) + 8, _MAX_DRAWS)
    draws, total = [], 0
    while total < num_tokens:
        draws.append(rng.poisson(lam, size=per_round))
        total += int(draws[-1].sum())
    lengths_K = np.concatenate(draws)
    k = int(np.searchsorted(np.cumsum(lengths_K), num_tokens)) + 1
    lengths_K = lengths_K[:k].astype(np.int64)
    lengths_K[-1] -= int(lengths_K.sum()) - num_tokens
    return lengths_K


def span_slots(rng: np.random.Generator, num_others: int, num_spans: int) -> np.ndarray:
    """int64 [K], ascending: the slots of `num_spans` spans among num_others + num_spans items,
    a uniform interleaving of the spans with the other tokens."""
    return np.sort(rng.choice(num_others + num_spans, size=num_spans, replace=False))


def infill(
    window_W: np.ndarray, lengths_K: np.ndarray, slots_K: np.ndarray, *, mask_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source [Q], kind [Q], origin [Q]) of the window with span j (lengths_K[j] tokens) at
    item slots_K[j]: each span of >= 1 tokens becomes one [MASK], a zero-length span inserts
    one. Q = W - sum(lengths_K) + K; see `Noised` for kind and origin."""
    w = len(window_W)
    q = w - int(lengths_K.sum()) + len(lengths_K)
    width_Q = np.ones(q, dtype=np.int64)
    width_Q[slots_K] = lengths_K
    origin_Q = np.cumsum(width_Q) - width_Q  # the first window position each item covers
    kind_Q = np.full(q, KEPT, dtype=np.int8)
    kind_Q[slots_K] = np.where(lengths_K > 0, SPAN, INSERTED)
    source_Q = window_W[np.minimum(origin_Q, w - 1)]
    source_Q[slots_K] = mask_id
    origin_Q[kind_Q == INSERTED] = -1
    return source_Q, kind_Q, origin_Q


def mask_and_delete(
    rng: np.random.Generator,
    source_M: np.ndarray,
    kind_M: np.ndarray,
    origin_M: np.ndarray,
    *,
    num_mask: int,
    num_delete: int,
    mask_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token masking and deletion: of the KEPT tokens, a random `num_mask` become [MASK]
    (MASKED) and another `num_delete` are removed; the rest keep their order."""
    kept = np.flatnonzero(kind_M == KEPT)
    chosen = kept[rng.choice(len(kept), size=num_mask + num_delete, replace=False)]
    source_M, kind_M = source_M.copy(), kind_M.copy()
    source_M[chosen[:num_mask]] = mask_id
    kind_M[chosen[:num_mask]] = MASKED
    keep_M = np.ones(len(source_M), dtype=bool)
    keep_M[chosen[num_mask:]] = False
    return source_M[keep_M], kind_M[keep_M], origin_M[keep_M]


def drop_insertions(
    source_M: np.ndarray, kind_M: np.ndarray, origin_M: np.ndarray, *, max_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The source cut to `max_len` tokens by dropping its last INSERTED [MASK] tokens (only
    insertions make a source longer than its window, so there are always enough)."""
    excess = len(source_M) - max_len
    if excess <= 0:
        return source_M, kind_M, origin_M
    keep_M = np.ones(len(source_M), dtype=bool)
    keep_M[np.flatnonzero(kind_M == INSERTED)[-excess:]] = False
    return source_M[keep_M], kind_M[keep_M], origin_M[keep_M]


def replace_random(
    rng: np.random.Generator,
    source_M: np.ndarray,
    kind_M: np.ndarray,
    *,
    ratio: float,
    random_ids: np.ndarray,
) -> np.ndarray:
    """The source with each emitted [MASK] (every token not KEPT) replaced, with probability
    `ratio`, by a uniform draw from `random_ids`."""
    masks = np.flatnonzero(kind_M != KEPT)
    chosen = masks[rng.random(len(masks)) < ratio]
    source_M = source_M.copy()
    source_M[chosen] = random_ids[rng.integers(len(random_ids), size=len(chosen))]
    return source_M


def rotate(arrays: tuple[np.ndarray, ...], offset: int) -> tuple[np.ndarray, ...]:
    """Each array rotated to begin at its element `offset`."""
    return tuple(np.concatenate([a[offset:], a[:offset]]) for a in arrays)


# ---- the objective -------------------------------------------------------------------------


class Denoising:
    """data.objective=denoising; options in data.denoising (see the module docstring).

    Output: input_ids [B, N] (the source, padded with <pad>), attention_mask bool [B, N],
    decoder_input_ids [B, T] (<eos> then the window shifted right) and labels [B, T] (the
    window). `noise(...)` is one sample's source with where its tokens came from.
    """

    @staticmethod
    def target_length(cfg: DataConfig, seq_len: int) -> int:
        """Decoder tokens per sample: the whole window, seq_len."""
        return seq_len

    def __init__(self, name: str, *, cfg: DataConfig, tokenizer, seq_len: int, seed: int):
        cfg.denoising.validate()
        cfg.check_objective(name, seq_len=seq_len)
        self.opts, self.seq_len, self.seed = cfg.denoising, seq_len, seed
        self.num_infill, self.num_mask, self.num_delete = cfg.denoising.counts(seq_len)
        self.mask_id = special_id(tokenizer, "[MASK]")
        self.eos_id, self.pad_id = int(tokenizer.eos_id), int(tokenizer.pad_id)
        self.random_ids = random_token_ids(tokenizer)

    def noise(
        self,
        window_W: np.ndarray,
        doc_start_W: np.ndarray,
        sent_start_W: np.ndarray,
        *,
        sample_id: int,
    ) -> Noised:
        """One sample's source from its window and the window's document and sentence starts
        (rules 2 to 5 of the module docstring)."""
        opts, w = self.opts, len(window_W)
        rng = sample_rng(self.seed, sample_id, salt=SALT)
        permute_coin, rotate_coin = rng.random(2)
        if permute_coin < opts.permute_sentences:
            starts_P, doc_P, fixed_P = sentence_pieces(
                window_W, doc_start_W, sent_start_W, eos_id=self.eos_id
            )
            window_W = permute_pieces(window_W, starts_P, piece_order(rng, doc_P, fixed_P))
        lengths_K = poisson_spans(rng, self.num_infill, opts.poisson_lambda)
        slots_K = span_slots(rng, w - self.num_infill, len(lengths_K))
        parts = infill(window_W, lengths_K, slots_K, mask_id=self.mask_id)
        parts = mask_and_delete(
            rng, *parts, num_mask=self.num_mask, num_delete=self.num_delete, mask_id=self.mask_id
        )
        source_M, kind_M, origin_M = drop_insertions(*parts, max_len=w)
        if opts.random_ratio > 0:
            source_M = replace_random(
                rng, source_M, kind_M, ratio=opts.random_ratio, random_ids=self.random_ids
            )
        if rotate_coin < opts.rotate and len(source_M) > 1:
            offset = int(rng.integers(1, len(source_M)))
            source_M, kind_M, origin_M = rotate((source_M, kind_M, origin_M), offset)
        return Noised(window_W, source_M, kind_M, origin_M)

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens_BR = batch["tokens"]
        if tokens_BR.dim() != 2 or tokens_BR.shape[1] < self.seq_len:
            raise ValueError(
                f"denoising needs tokens [batch, >= seq_len = {self.seq_len}], got shape "
                f"{tuple(tokens_BR.shape)}"
            )
        w = self.seq_len
        window_BW = tokens_BR[:, :w].numpy().astype(np.int64)
        doc_start_BW = _starts(batch, "doc_start", w)
        sent_start_BW = doc_start_BW | _starts(batch, "sent_start", w)
        b = len(window_BW)
        input_ids_BN = np.full((b, w), self.pad_id, dtype=np.int64)
        attention_mask_BN = np.zeros((b, w), dtype=bool)
        for i, sample_id in enumerate(batch["sample_ids"].tolist()):
            source_M = self.noise(
                window_BW[i], doc_start_BW[i], sent_start_BW[i], sample_id=sample_id
            ).source
            input_ids_BN[i, : len(source_M)] = source_M
            attention_mask_BN[i, : len(source_M)] = True
        start_B1 = np.full((b, 1), self.eos_id, dtype=np.int64)
        decoder_input_ids_BT = np.concatenate([start_B1, window_BW[:, :-1]], axis=1)
        return {
            "input_ids": torch.from_numpy(input_ids_BN),
            "attention_mask": torch.from_numpy(attention_mask_BN),
            "decoder_input_ids": torch.from_numpy(decoder_input_ids_BT),
            "labels": torch.from_numpy(window_BW),
        }


def _starts(batch: dict[str, torch.Tensor], key: str, w: int) -> np.ndarray:
    """bool [B, W]: the first W columns of batch[key], all False when the batch lacks it."""
    tokens_BR = batch["tokens"]
    if key not in batch:
        return np.zeros((tokens_BR.shape[0], w), dtype=bool)
    starts_BR = batch[key].numpy().astype(bool, copy=False)
    if starts_BR.shape != tuple(tokens_BR.shape):
        raise ValueError(
            f"batch[{key!r}] has shape {starts_BR.shape}, expected {tuple(tokens_BR.shape)}"
        )
    return starts_BR[:, :w]
