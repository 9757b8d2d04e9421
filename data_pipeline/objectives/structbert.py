"""StructBERT (Wang et al. 2019): masked LM plus the word and sentence structural objectives.

Legend: B = batch, S = sample_len (seq_len + 1 tokens per packed row), T = seq_len.

data.objective = mlm_struct builds [CLS] S1 [SEP] S2 [SEP] <pad>... from a row (mlm.py's pair
rules) and trains three things at once:

* Masked LM exactly as mlm.py (data.mlm: 15% of the non-special tokens, 80/10/10).
* Word structural objective (WSO): the sequence is tiled into non-overlapping n-grams of
  data.mlm.shuffle_len tokens (K = 3, trigrams) from an offset drawn per sample; an n-gram
  whose tokens are all unmasked and non-special (and not all one id) is a candidate, and each
  candidate is shuffled with probability data.mlm.shuffle_prob (the paper's 5%) into a
  uniformly drawn order that changes it. The model predicts the original token at every
  shuffled position through the MLM head, so those targets join "labels" (see below).
* Sentence structural objective (SSO): a 3-way label in "nsp_labels", a third each:
  0 = S2 follows S1, 1 = S2 precedes S1, 2 = S2 comes from another document (or a later part
  of the row, as NSP's negatives). Classes 0 and 2 are nsp_layout's continuation and
  negative; class 1 is class 0's two segments swapped, as sop_layout swaps. A's end is drawn
  from the whole piece (nsp_layout's split_anywhere), so S1 and S2 have one length
  distribution and the [SEP] position does not give "previous" away. A row too short for a
  pair gets -100, as in mlm_nsp. The model's pair head needs model.pair_classes = 3.

Why the WSO targets share "labels" with MLM: the paper scores shuffled and masked positions
with the same output softmax, so it is one classification over the vocabulary; one label
tensor keeps one MLM head pass (no second (B, T, V) logits tensor, FLOPs as BERT's), and
works unchanged with the chunked LM loss, pipeline stages and the vocab-parallel head. The
price: the LM loss is the mean over masked and shuffled targets together (about 4 of them
for every 15 masked at the defaults), not a separate "loss_wso" metric.

Randomness is a pure function of (seed, sample id): the pair geometry and the masks use
mlm.py's streams, the SSO class and the shuffles streams of their own.
"""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.objectives import IGNORE_INDEX, sample_rng
from data_pipeline.objectives.mlm import MaskedLM, nsp_layout

__all__ = ["NEXT", "PREVIOUS", "RANDOM", "StructuralLM", "shuffle_ngrams", "sso_layout"]

# SSO classes (nsp_labels).
NEXT, PREVIOUS, RANDOM = 0, 1, 2
# Apart from mlm.py's pair (1) and mask (2) streams and UniLM's task stream (3).
_SHUFFLE_SALT = 4
_SSO_SALT = 5


def sso_layout(
    rng: np.random.Generator,
    pieces: list[tuple[int, int]],
    sent_S: np.ndarray,
    *,
    budget: int,
    label: int,
) -> tuple[list[tuple[int, int]], int]:
    """Segments in model order and the SSO label for class `label` (module docstring)."""
    negative_prob = 1.0 if label == RANDOM else 0.0
    segments, nsp = nsp_layout(
        rng, pieces, sent_S, budget=budget, negative_prob=negative_prob, split_anywhere=True
    )
    if nsp == IGNORE_INDEX:
        return segments, IGNORE_INDEX
    if label == PREVIOUS:
        return segments[::-1], PREVIOUS
    return segments, label


def shuffle_ngrams(
    ids_T: np.ndarray, free_T: np.ndarray, rng: np.random.Generator, *, prob: float, n: int = 3
) -> tuple[np.ndarray, np.ndarray, int]:
    """(ids with the chosen n-grams shuffled, their start positions, number of candidates).

    The row is tiled into n-grams from an offset drawn in [0, n); a tile is a candidate when
    every token is `free_T` (unmasked, non-special) and its ids are not all equal; each
    candidate is chosen with probability `prob` and reordered by a uniformly drawn
    permutation that changes its ids.
    """
    t = len(ids_T)
    offset = int(rng.integers(n))
    starts = np.arange(offset, t - n + 1, n)
    windows = starts[:, None] + np.arange(n)
    grams = ids_T[windows]
    candidate = free_T[windows].all(axis=1) & (grams != grams[:, :1]).any(axis=1)
    chosen = starts[candidate & (rng.random(len(starts)) < prob)]
    out = ids_T.copy()
    for start in chosen.tolist():
        gram = ids_T[start : start + n]
        perm = rng.permutation(n)
        while (gram[perm] == gram).all():  # ends: the ids are not all equal
            perm = rng.permutation(n)
        out[start : start + n] = gram[perm]
    return out, chosen, int(candidate.sum())


class StructuralLM(MaskedLM):
    """data.objective = mlm_struct (module docstring); picklable for workers."""

    def __init__(self, name: str, *, cfg: DataConfig, tokenizer, seq_len: int, seed: int):
        if name != "mlm_struct":
            raise ValueError(f"data.objective={name!r} is not StructBERT's")
        cfg.check_objective(name, seq_len=seq_len)
        super().__init__("mlm_sop", cfg=cfg, tokenizer=tokenizer, seq_len=seq_len, seed=seed)
        self.name = name

    def sso_class(self, sample_id: int) -> int:
        """The SSO class of one sample (NEXT, PREVIOUS or RANDOM, a third each)."""
        return int(sample_rng(self.seed, sample_id, salt=_SSO_SALT).integers(3))

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.transform(batch)[0]

    def transform(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], np.ndarray, int]:
        """(objective output, bool [B, T] shuffled positions, number of candidate n-grams)."""
        tokens_BS, bound_BS, sent_BS, ids = self._read(batch)
        rows = [
            self._assemble(tokens_BS[i], bound_BS[i], sent_BS[i], ids[i]) for i in range(len(ids))
        ]
        input_ids_BT = np.stack([r[0] for r in rows])
        out = self._mask(input_ids_BT, ids)
        shuffled_BT, candidates = self._shuffle(out, input_ids_BT, ids)
        out["token_type_ids"] = torch.from_numpy(np.stack([r[1] for r in rows]))
        out["attention_mask"] = torch.from_numpy(input_ids_BT != self.pad_id)
        out["nsp_labels"] = torch.tensor([r[2] for r in rows], dtype=torch.int64)
        return out, shuffled_BT, candidates

    def _assemble(
        self, tokens_S: np.ndarray, bound_S: np.ndarray, sent_S: np.ndarray, sample_id: int
    ) -> tuple[np.ndarray, np.ndarray, int]:
        label = self.sso_class(sample_id)

        def layout(rng, pieces, sent, *, budget, swap_prob):  # _pair's layout signature
            return sso_layout(rng, pieces, sent, budget=budget, label=label)

        ids_T, types_T, nsp, _ = self._pair(tokens_S, bound_S, sent_S, sample_id, layout, 0.0)
        return ids_T, types_T, nsp

    def _shuffle(
        self, out: dict[str, torch.Tensor], input_ids_BT: np.ndarray, sample_ids: list[int]
    ) -> tuple[np.ndarray, int]:
        """Shuffle n-grams of the masked batch in place (inputs and labels); returns the
        shuffled positions and the number of candidate n-grams."""
        masked_BT, labels_BT = out["input_ids"].numpy(), out["labels"].numpy()
        free_BT = (labels_BT == IGNORE_INDEX) & ~self.is_special[input_ids_BT]
        shuffled_BT = np.zeros_like(free_BT)
        n, candidates = self.mlm.shuffle_len, 0
        for i, sample_id in enumerate(sample_ids):
            rng = sample_rng(self.seed, sample_id, salt=_SHUFFLE_SALT)
            row, starts, count = shuffle_ngrams(
                input_ids_BT[i], free_BT[i], rng, prob=self.mlm.shuffle_prob, n=n
            )
            candidates += count
            pos = (starts[:, None] + np.arange(n)).ravel()
            shuffled_BT[i, pos] = True
            masked_BT[i, pos] = row[pos]
            labels_BT[i, pos] = input_ids_BT[i, pos]
        return shuffled_BT, candidates
