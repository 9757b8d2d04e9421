"""XLNet's permutation language modelling with partial prediction (Yang et al. 2019):
data.objective=plm.

The model reads the window unmasked; its query stream predicts a few targets, each from the
tokens before it in a random factorisation order. Options in data.plm. The rules, per sample,
with T = seq_len, A = T - 2 tokens of segment A and P = max(1, round(A * predict_ratio)):

1. Layout (XLNet's single segment "A <sep> <cls>"): input_ids are the first A tokens of the
   row, then [SEP], then [CLS]; the inputs are not masked. token_type_ids are 0 on the A
   tokens and [SEP], 2 on [CLS] (XLNet's segment id of <cls>).
2. Targets, P of them, only ever A tokens ([SEP] and [CLS] are never predicted), chosen in
   spans as XLNet's sampler does. From the left of the row, while fewer than P are chosen:
   draw a span length L uniformly from 1..max_span, shortened to the targets still missing;
   cut a context of round(L / predict_ratio) tokens from the left of what remains of the row
   (all of it when fewer remain, L then shortened to the context) and place the span
   uniformly inside the context. When the row runs out first, the missing targets are drawn
   uniformly, without replacement, from the A positions not yet chosen (so a few targets do
   not form spans). That is rare, since the last context, cut at the row's end, can hold a
   span as long as itself: it takes contexts that rounding makes longer than
   L / predict_ratio. target_positions are the P targets in ascending order and labels the
   tokens there.
3. Factorisation order: the T - P other tokens, [SEP] and [CLS] included, come first (rank -1,
   all seeing each other); the P targets follow in a uniformly random order (ranks 0..P-1).
   perm_mask[i, j] (True: i must not see the content of j) = j is a target and
   rank_self(i) <= rank(j), with rank_self(i) = rank(i) for a target and 0 otherwise. So a
   non-target sees every non-target and no target, and a target sees every non-target and the
   targets before it in the order, never its own content (the content stream adds itself back
   in the model; the query stream must not).

    seq_len = 14, predict_ratio = 1/3: A = 12, P = 4
    input_ids         x0 x1 x2 x3 x4 x5 x6 x7 x8 x9 x10 x11 [SEP] [CLS]
    token_type_ids    0  0  0  0  0  0  0  0  0  0  0   0   0     2
    spans             L = 2 in the context x0..x5, placed at x3; L = 3 shortened to the 2
                      targets missing, in the context x6..x11, placed at x6
    target_positions  3 4 6 7                labels  x3 x4 x6 x7
    order             x6 x3 x7 x4            ranks   1 3 0 2 (of positions 3 4 6 7)
    perm_mask         columns 3 4 6 7 (every other column is all False):
        non-target    1 1 1 1
        row 6         1 1 1 1                (rank 0: sees no target)
        row 3         1 1 0 1                (rank 1: sees x6)
        row 7         0 1 0 1                (rank 2: sees x6 and x3)
        row 4         0 1 0 0                (rank 3: sees x6, x3 and x7)

P depends on nothing but seq_len, so every batch has the same shapes. The window may span
several packed documents; their <eos> separators are ordinary tokens (and can be targets).

As with XLNet's own sampler, positions are not all equally likely targets: contexts tile the
row from its left end, a span touches its context's edges less often than its middle, and
the tokens after the context that completes the P targets are never predicted. At the
defaults every context is 6L tokens and starts at a multiple of 6: position 0 is a target
with probability 0.08, the positions inside the row 0.15 to 0.18 (by position mod 6), and
when seq_len - 2 exceeds 6P its last seq_len - 2 - 6P tokens never are.

Randomness: one stream per sample, sample_rng(seed, sample id, salt=SALT), drawn in a fixed
order (each span's length then its offset in its context, the filled positions, the order of
the targets), so a sample's targets and order depend on nothing but (seed, sample id).

Legend: B = batch, R = row length (seq_len + 1 from the loader), T = seq_len, A = T - 2,
P = targets, S = spans.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.objectives import sample_rng, special_id

__all__ = [
    "CLS_SEGMENT",
    "SALT",
    "Factorisation",
    "PermutationLM",
    "fill_targets",
    "num_targets",
    "permutation_mask",
    "sample_spans",
]

# Apart from mlm's (1, 2, 6), UniLM's (3), StructBERT's (4, 5), ELECTRA's (7), BART's
# denoising (8) and MASS's (9) streams.
SALT = 10
# XLNet's segment id of <cls>; the A tokens and their <sep> are segment 0.
CLS_SEGMENT = 2


class Factorisation(NamedTuple):
    """One sample's targets and the order in which they are predicted."""

    spans: np.ndarray
    """int64 [S, 2]: (start, length) of each span of targets, in draw order (left to right)."""
    filled: np.ndarray
    """int64 [F]: the targets drawn one by one after the row ran out, in draw order."""
    order: np.ndarray
    """int64 [P]: every target position, in factorisation order (rank 0 first)."""

    @property
    def positions(self) -> np.ndarray:
        """int64 [P]: the target positions in ascending order."""
        return np.sort(self.order)


def num_targets(seq_len: int, predict_ratio: float) -> int:
    """P: targets per sample, max(1, round((seq_len - 2) * predict_ratio))."""
    return max(1, round((seq_len - 2) * predict_ratio))


def sample_spans(
    rng: np.random.Generator,
    num_tokens: int,
    *,
    num_predict: int,
    max_span: int,
    predict_ratio: float,
) -> np.ndarray:
    """int64 [S, 2]: (start, length) of the spans XLNet's sampler places in a row of
    `num_tokens` tokens (rule 2 of the module docstring). The lengths sum to at most
    `num_predict`, less when the row runs out first."""
    spans, chosen, cur = [], 0, 0
    while chosen < num_predict and cur < num_tokens:
        length = min(int(rng.integers(1, max_span + 1)), num_predict - chosen)
        context = min(round(length / predict_ratio), num_tokens - cur)
        length = min(length, context)
        start = cur + int(rng.integers(context - length + 1))
        spans.append((start, length))
        chosen += length
        cur += context
    return np.array(spans, dtype=np.int64).reshape(-1, 2)


def fill_targets(
    rng: np.random.Generator, num_tokens: int, spans_S2: np.ndarray, *, num_predict: int
) -> np.ndarray:
    """int64 [F]: num_predict - (tokens in the spans) positions of the row outside the spans,
    drawn uniformly without replacement."""
    taken = np.zeros(num_tokens, dtype=bool)
    for start, length in spans_S2:
        taken[start : start + length] = True
    missing = num_predict - int(taken.sum())
    if missing <= 0:
        return np.zeros(0, dtype=np.int64)
    return rng.choice(np.flatnonzero(~taken), size=missing, replace=False).astype(np.int64)


def permutation_mask(rank_BT: np.ndarray) -> np.ndarray:
    """bool [B, T, T]: perm_mask of the ranks (-1 for a non-target, 0..P-1 for the targets in
    factorisation order): [b, i, j] = j is a target and rank_self(i) <= rank(j), with
    rank_self = max(rank, 0) (rule 3 of the module docstring)."""
    is_target_B1T = (rank_BT >= 0)[:, None, :]
    rank_self_BT1 = np.maximum(rank_BT, 0)[:, :, None]
    return is_target_B1T & (rank_self_BT1 <= rank_BT[:, None, :])


class PermutationLM:
    """data.objective=plm; options in data.plm (see the module docstring).

    Output: input_ids [B, T] (A [SEP] [CLS], unmasked), token_type_ids [B, T] (0, then 2 on
    [CLS]), perm_mask bool [B, T, T] (True: may not see), target_positions [B, P] (ascending)
    and labels [B, P], all int64 but perm_mask. `draw(sample_id)` is one sample's targets and
    their order.
    """

    @staticmethod
    def target_length(cfg: DataConfig, seq_len: int) -> int:
        """Predicted positions per sample, P (the query stream's length, for FLOPs)."""
        return num_targets(seq_len, cfg.plm.predict_ratio)

    def __init__(self, name: str, *, cfg: DataConfig, tokenizer, seq_len: int, seed: int):
        cfg.plm.validate()
        cfg.check_objective(name, seq_len=seq_len)
        self.opts, self.seq_len, self.seed = cfg.plm, seq_len, seed
        self.num_tokens = seq_len - 2
        self.num_predict = num_targets(seq_len, cfg.plm.predict_ratio)
        self.sep_id = special_id(tokenizer, "[SEP]")
        self.cls_id = special_id(tokenizer, "[CLS]")

    def draw(self, *, sample_id: int) -> Factorisation:
        """The targets and factorisation order of sample `sample_id` (rules 2 and 3 of the
        module docstring); they do not depend on the sample's tokens."""
        rng = sample_rng(self.seed, sample_id, salt=SALT)
        a, p = self.num_tokens, self.num_predict
        spans_S2 = sample_spans(
            rng,
            a,
            num_predict=p,
            max_span=self.opts.max_span,
            predict_ratio=self.opts.predict_ratio,
        )
        filled_F = fill_targets(rng, a, spans_S2, num_predict=p)
        in_spans = [np.arange(start, start + length) for start, length in spans_S2]
        positions_P = np.sort(np.concatenate([*in_spans, filled_F]))
        return Factorisation(spans_S2, filled_F, rng.permutation(positions_P))

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens_BR = batch["tokens"]
        if tokens_BR.dim() != 2 or tokens_BR.shape[1] < self.num_tokens:
            raise ValueError(
                f"plm needs tokens [batch, >= seq_len - 2 = {self.num_tokens}], got shape "
                f"{tuple(tokens_BR.shape)}"
            )
        b, t = tokens_BR.shape[0], self.seq_len
        input_ids_BT = np.empty((b, t), dtype=np.int64)
        input_ids_BT[:, : self.num_tokens] = tokens_BR[:, : self.num_tokens].numpy()
        input_ids_BT[:, -2], input_ids_BT[:, -1] = self.sep_id, self.cls_id
        token_type_ids_BT = np.zeros((b, t), dtype=np.int64)
        token_type_ids_BT[:, -1] = CLS_SEGMENT
        rank_BT = np.full((b, t), -1, dtype=np.int64)
        target_positions_BP = np.empty((b, self.num_predict), dtype=np.int64)
        for i, sample_id in enumerate(batch["sample_ids"].tolist()):
            order_P = self.draw(sample_id=sample_id).order
            rank_BT[i, order_P] = np.arange(self.num_predict)
            target_positions_BP[i] = np.sort(order_P)
        return {
            "input_ids": torch.from_numpy(input_ids_BT),
            "token_type_ids": torch.from_numpy(token_type_ids_BT),
            "perm_mask": torch.from_numpy(permutation_mask(rank_BT)),
            "target_positions": torch.from_numpy(target_positions_BP),
            "labels": torch.from_numpy(np.take_along_axis(input_ids_BT, target_positions_BP, 1)),
        }
