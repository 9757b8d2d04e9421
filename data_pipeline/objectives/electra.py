"""ELECTRA's replaced token detection (Clark et al. 2020): data.objective = electra.

Legend: B = batch, T = seq_len.

Rows and masks are those of data.objective=mlm (single segments [CLS] row[:T-2] [SEP], no
pair task; the same (seed, sample id) chooses the same positions): a rounded
data.mlm.mask_prob of the non-special tokens (15%; the paper's Large masks 25%,
data.mlm.mask_prob=0.25). The chosen tokens all become [MASK]: the paper's generator input is
x^masked = REPLACE(x, m, [MASK]) (sec. 2), with no random or kept tokens. data.mlm.
replace_with_mask / replace_with_random at their schema defaults (BERT's 0.8 / 0.1) are
taken as unset for that reason, as mlm_sbo takes unit=token; any other pair is used as
given (0.85 / 0 is the released code's split: 85% [MASK], 15% kept).

The generator's samples, and so the discriminator's input and targets, are drawn inside the
model (models/electra.py); the objective supplies the randomness they need, so that it too
is a pure function of (seed, sample id), whatever the layout or the worker count, and a row
read again in another epoch (another sample id) gets new masks and new samples. Outputs
beside mlm's input_ids / labels / attention_mask / token_type_ids:
    sample_uniforms  float32 [B, T]  one U[0, 1) draw per position (its own stream); a masked
                                     position's sample is the first id whose cumulative
                                     generator probability exceeds it
    rtd_labels       int64   [B, T]  0 on every non-padding token (the discriminator scores
                                     them all, [CLS] and [SEP] included), -100 on padding. The
                                     objective cannot know which masked tokens the generator
                                     will replace: the model returns those targets
                                     ("rtd_targets"), and these labels say which positions
                                     count (and how many: the RTD loss is their mean).
    masked_positions int64   [B, K]  the masked positions of each row in increasing order, then
                                     padding (position 0, the never-masked [CLS]); K =
                                     max(1, round(mask_prob * (T - 2))), the most a row masks
                                     (as mlm_sbo's slots). The generator's head runs on these
                                     B x K gathered positions: a count known on the host, so
                                     the step never waits for the device to count the masks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from data_pipeline.config import DataConfig, MlmConfig
from data_pipeline.objectives import IGNORE_INDEX, sample_rng
from data_pipeline.objectives.mlm import MaskedLM
from data_pipeline.objectives.sbo import sbo_slots

__all__ = ["ReplacedTokenDetection", "electra_masking", "masked_slots", "sample_uniforms"]

# The per-position uniforms' stream (1, 2 and 6 are mlm's, 3 UniLM's, 4 and 5 StructBERT's).
_SAMPLE_SALT = 7


def electra_masking(mlm: MlmConfig) -> MlmConfig:
    """data.mlm as electra masks: the schema's BERT split (0.8 / 0.1) means every chosen
    token becomes [MASK] (the paper's generator input); any other split is kept."""
    bert = (MlmConfig.replace_with_mask, MlmConfig.replace_with_random)
    if (mlm.replace_with_mask, mlm.replace_with_random) != bert:
        return mlm
    return dataclasses.replace(mlm, replace_with_mask=1.0, replace_with_random=0.0)


def sample_uniforms(seed: int, sample_ids: list[int], seq_len: int) -> np.ndarray:
    """float32 [B, T]: each row's U[0, 1) draws, a pure function of (seed, sample id)."""
    rows = [
        sample_rng(seed, i, salt=_SAMPLE_SALT).random(seq_len, dtype=np.float32) for i in sample_ids
    ]
    return np.stack(rows) if rows else np.zeros((0, seq_len), dtype=np.float32)


def masked_slots(labels_BT: np.ndarray, slots: int) -> np.ndarray:
    """int64 [B, slots]: each row's masked positions (labels != -100) in increasing order,
    then 0. A row with more masked positions than slots is a ValueError naming it."""
    chosen_BT = labels_BT != IGNORE_INDEX
    counts_B = chosen_BT.sum(axis=1)
    if len(counts_B) and counts_B.max() > slots:
        row = int(counts_B.argmax())
        raise ValueError(f"row {row} masks {counts_B[row]} positions, more than its {slots} slots")
    order_BK = np.argsort(~chosen_BT, axis=1, kind="stable")[:, :slots]
    return np.where(np.take_along_axis(chosen_BT, order_BK, axis=1), order_BK, 0).astype(np.int64)


class ReplacedTokenDetection:
    """data.objective = electra (module docstring); picklable for workers."""

    def __init__(self, name: str, *, cfg: DataConfig, tokenizer, seq_len: int, seed: int):
        if name != "electra":
            raise ValueError(f"data.objective={name!r} is not ELECTRA's objective electra")
        cfg.mlm.validate()
        cfg.check_objective(name, seq_len=seq_len)
        mlm_cfg = dataclasses.replace(cfg, objective="mlm", mlm=electra_masking(cfg.mlm))
        self.mlm = MaskedLM("mlm", cfg=mlm_cfg, tokenizer=tokenizer, seq_len=seq_len, seed=seed)
        self.seq_len = seq_len
        self.seed = seed
        self.slots = sbo_slots(mlm_cfg.mlm.mask_prob, seq_len)

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.mlm(batch)
        ids = batch["sample_ids"].tolist()
        out["sample_uniforms"] = torch.from_numpy(sample_uniforms(self.seed, ids, self.seq_len))
        scored = torch.zeros_like(out["input_ids"])
        out["rtd_labels"] = scored.masked_fill(~out["attention_mask"], IGNORE_INDEX)
        out["masked_positions"] = torch.from_numpy(masked_slots(out["labels"].numpy(), self.slots))
        return out
