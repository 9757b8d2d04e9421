"""MASS, masked sequence-to-sequence pretraining (Song et al. 2019): data.objective=mass.

The encoder reads the window with one fragment of consecutive tokens masked; the decoder
predicts that fragment from the encoder and the fragment's own earlier tokens. Options in
data.mass. The rules, per sample, with W = seq_len and k = max(1, round(W * fragment_ratio)):

1. The window is the first W tokens of the row (its last token is unused). The fragment is
   window[u : u + k], with u drawn uniformly from [0, W - k].
2. Encoder: input_ids are the window with each fragment token, independently, replaced by
   [MASK] with probability replace_with_mask, by a uniformly drawn non-special token with
   probability replace_with_random, and kept otherwise (the paper's 80/10/10, section 4.1);
   attention_mask is all True (no padding).
3. Decoder: labels[i] = window[i] for u <= i < u + k and -100 elsewhere; decoder_input_ids[i]
   = window[i - 1] for u < i < u + k and [MASK] everywhere else, position u included: the
   fragment shifted right by one with every other decoder position masked, as Figure 1 of
   the paper draws it. The decoder keeps all W positions, so its positions are the
   encoder's (the paper feeds only the fragment's positions; the others cost compute here
   but carry no label).

    window             x1 x2 x3 x4 x5 x6 x7 x8        (k = 4, u = 2)
    input_ids          x1 x2 _  _  _  _  x7 x8        (_ = [MASK], a random or the same token)
    decoder_input_ids  _  _  _  x3 x4 x5 _  _
    labels             .  .  x3 x4 x5 x6 .  .         (. = -100)

The window may span several packed documents; their <eos> separators are ordinary tokens.

Randomness: one stream per sample, sample_rng(seed, sample id, salt=SALT): the start u, then
one uniform and one random-token draw per fragment token, so a sample's fragment and noise
depend on nothing but (seed, sample id).

Legend: B = batch, R = row length (seq_len + 1 from the loader), W = window = seq_len,
N = seq_len (encoder length), T = seq_len (decoder length), K = fragment length k.
"""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.objectives import IGNORE_INDEX, random_token_ids, sample_rng, special_id

__all__ = ["SALT", "MaskedSeq2Seq", "fragment_length", "fragment_targets", "mask_fragment"]

# Apart from mlm's (1, 2, 6), UniLM's (3), StructBERT's (4, 5), ELECTRA's (7) and BART's
# denoising (8) streams.
SALT = 9


def fragment_length(seq_len: int, fragment_ratio: float) -> int:
    """k: tokens of the masked fragment, max(1, round(seq_len * fragment_ratio))."""
    return max(1, round(seq_len * fragment_ratio))


def fragment_targets(
    window_BW: np.ndarray, start_B: np.ndarray, *, length: int, mask_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(decoder_input_ids [B, T], labels [B, T]) of fragments of `length` tokens starting at
    `start_B` (rule 3 of the module docstring; T = W)."""
    pos_BT = np.broadcast_to(np.arange(window_BW.shape[1]), window_BW.shape)
    offset_BT = pos_BT - start_B[:, None]
    inside_BT = (offset_BT >= 0) & (offset_BT < length)
    labels_BT = np.where(inside_BT, window_BW, IGNORE_INDEX)
    previous_BT = np.roll(window_BW, 1, axis=1)
    fed_BT = inside_BT & (offset_BT > 0)
    decoder_input_ids_BT = np.where(fed_BT, previous_BT, mask_id)
    return decoder_input_ids_BT, labels_BT


def mask_fragment(
    window_BW: np.ndarray, start_B: np.ndarray, replacement_BK: np.ndarray
) -> np.ndarray:
    """input_ids [B, N]: the window with window[start + j] replaced by replacement_BK[:, j]
    for j < K (N = W)."""
    input_ids_BN = window_BW.copy()
    pos_BK = start_B[:, None] + np.arange(replacement_BK.shape[1])
    np.put_along_axis(input_ids_BN, pos_BK, replacement_BK, axis=1)
    return input_ids_BN


class MaskedSeq2Seq:
    """data.objective=mass; options in data.mass (see the module docstring).

    Output: input_ids [B, N], attention_mask bool [B, N] (all True), decoder_input_ids
    [B, T] and labels [B, T] (-100 outside the fragment). `draw(window, sample_id)` is one
    sample's fragment start and encoder tokens for it.
    """

    @staticmethod
    def target_length(cfg: DataConfig, seq_len: int) -> int:
        """Decoder tokens per sample: every window position, seq_len."""
        return seq_len

    def __init__(self, name: str, *, cfg: DataConfig, tokenizer, seq_len: int, seed: int):
        cfg.mass.validate()
        cfg.check_objective(name, seq_len=seq_len)
        self.opts, self.seq_len, self.seed = cfg.mass, seq_len, seed
        self.length = fragment_length(seq_len, cfg.mass.fragment_ratio)
        self.mask_id = special_id(tokenizer, "[MASK]")
        self.random_ids = random_token_ids(tokenizer)

    def draw(self, window_W: np.ndarray, *, sample_id: int) -> tuple[int, np.ndarray]:
        """(start u, encoder tokens [K] of the fragment) of one sample with window `window_W`
        (rules 1 and 2 of the module docstring)."""
        rng = sample_rng(self.seed, sample_id, salt=SALT)
        k = self.length
        start = int(rng.integers(self.seq_len - k + 1))
        action_K = rng.random(k)
        random_K = self.random_ids[rng.integers(len(self.random_ids), size=k)]
        to_mask_K = action_K < self.opts.replace_with_mask
        to_random_K = ~to_mask_K & (
            action_K < self.opts.replace_with_mask + self.opts.replace_with_random
        )
        tokens_K = window_W[start : start + k].copy()
        tokens_K[to_mask_K] = self.mask_id
        tokens_K[to_random_K] = random_K[to_random_K]
        return start, tokens_K

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens_BR = batch["tokens"]
        if tokens_BR.dim() != 2 or tokens_BR.shape[1] < self.seq_len:
            raise ValueError(
                f"mass needs tokens [batch, >= seq_len = {self.seq_len}], got shape "
                f"{tuple(tokens_BR.shape)}"
            )
        window_BW = tokens_BR[:, : self.seq_len].numpy().astype(np.int64)
        draws = [
            self.draw(window_BW[i], sample_id=sample_id)
            for i, sample_id in enumerate(batch["sample_ids"].tolist())
        ]
        start_B = np.array([d[0] for d in draws], dtype=np.int64)
        replacement_BK = np.array([d[1] for d in draws], dtype=np.int64).reshape(-1, self.length)
        input_ids_BN = mask_fragment(window_BW, start_B, replacement_BK)
        decoder_input_ids_BT, labels_BT = fragment_targets(
            window_BW, start_B, length=self.length, mask_id=self.mask_id
        )
        return {
            "input_ids": torch.from_numpy(input_ids_BN),
            "attention_mask": torch.from_numpy(np.ones(input_ids_BN.shape, dtype=bool)),
            "decoder_input_ids": torch.from_numpy(decoder_input_ids_BT),
            "labels": torch.from_numpy(labels_BT),
        }
