"""SpanBERT's span boundary objective (Joshi et al. 2020): data.objective = mlm_sbo.

Legend: B = batch, T = seq_len, K = SBO target slots per row.

The inputs and MLM labels are exactly those of data.objective=mlm with data.mlm.unit=span
(single segments [CLS] row[:T-2] [SEP], no pair task, spans of words with geometric lengths):
the same (seed, sample id) gives the same masks. mlm_sbo always masks spans; it refuses
data.mlm.unit=word, ngram, phrase or knowledge by name, and takes the schema default `token`
as unset.

A span is a maximal run of masked positions (as SpanBERT's `merge_intervals`: two sampled
spans that touch are one span). Each masked token x_i of a span (s, e) gets, beside its MLM
label, a span boundary target: the positions of the boundary tokens s - 1 and e + 1, which
lie outside the span ([CLS] and [SEP] are boundaries too: they are never masked) and its
relative position i - s. Tokens at relative position >= data.mlm.sbo_max_targets are left to
MLM alone (SpanBERT truncates a span's pair targets the same way).

The targets come in a fixed number K of slots per row, the masked positions in increasing
order, then padding (positions 0, label -100), so the model computes its SBO head on K
gathered positions instead of all T. K = max(1, round(mask_prob * (T - 2))) is the MLM
budget of a row with no special token besides [CLS] and [SEP], so no masked token is ever
dropped for want of a slot. Outputs beside MLM's input_ids / labels / attention_mask /
token_type_ids:
    sbo_left    int64 [B, K]  position of the token before the span
    sbo_right   int64 [B, K]  position of the token after the span
    sbo_pos     int64 [B, K]  relative position of the target in its span, 0-based
    sbo_labels  int64 [B, K]  the original token (its MLM label), -100 in padding slots
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from common.errors import ConfigError
from data_pipeline.config import DataConfig
from data_pipeline.objectives import IGNORE_INDEX
from data_pipeline.objectives.mlm import MaskedLM

__all__ = ["SpanBoundaryLM", "sbo_slots", "span_boundary_targets"]


def sbo_slots(mask_prob: float, seq_len: int) -> int:
    """K: the most tokens MaskedLM masks in a single-segment row of seq_len tokens."""
    return max(1, round(mask_prob * (seq_len - 2)))


def span_boundary_targets(
    labels_BT: np.ndarray, *, slots: int, max_targets: int
) -> dict[str, np.ndarray]:
    """sbo_left, sbo_right, sbo_pos, sbo_labels ([B, slots] each) from MLM labels [B, T]."""
    b, t = labels_BT.shape
    out = {k: np.zeros((b, slots), dtype=np.int64) for k in ("sbo_left", "sbo_right", "sbo_pos")}
    out["sbo_labels"] = np.full((b, slots), IGNORE_INDEX, dtype=np.int64)
    for i in range(b):
        pos = np.flatnonzero(labels_BT[i] != IGNORE_INDEX)
        if not len(pos):
            continue
        first = np.ones(len(pos), dtype=bool)
        first[1:] = np.diff(pos) != 1
        last = np.ones(len(pos), dtype=bool)
        last[:-1] = first[1:]
        run = np.cumsum(first) - 1
        start, end = pos[first][run], pos[last][run]
        rel = pos - start
        keep = rel < max_targets
        n = int(keep.sum())
        if n > slots:
            raise ValueError(f"mlm_sbo: row {i} has {n} targets for {slots} slots")
        out["sbo_left"][i, :n] = np.maximum(start[keep] - 1, 0)
        out["sbo_right"][i, :n] = np.minimum(end[keep] + 1, t - 1)
        out["sbo_pos"][i, :n] = rel[keep]
        out["sbo_labels"][i, :n] = labels_BT[i, pos[keep]]
    return out


class SpanBoundaryLM:
    """data.objective = mlm_sbo (module docstring); picklable for workers."""

    def __init__(self, name: str, *, cfg: DataConfig, tokenizer, seq_len: int, seed: int):
        if name != "mlm_sbo":
            raise ValueError(f"data.objective={name!r} is not the span boundary task mlm_sbo")
        cfg.mlm.validate()
        cfg.check_objective(name, seq_len=seq_len)
        if cfg.mlm.unit in ("word", "ngram", "phrase", "knowledge"):
            raise ConfigError(
                f"data.objective=mlm_sbo masks SpanBERT spans; data.mlm.unit={cfg.mlm.unit} "
                "contradicts it (set data.mlm.unit=span)"
            )
        spans = dataclasses.replace(cfg.mlm, unit="span")
        mlm_cfg = dataclasses.replace(cfg, objective="mlm", mlm=spans)
        self.mlm = MaskedLM("mlm", cfg=mlm_cfg, tokenizer=tokenizer, seq_len=seq_len, seed=seed)
        self.slots = sbo_slots(cfg.mlm.mask_prob, seq_len)
        self.max_targets = cfg.mlm.sbo_max_targets

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.mlm(batch)
        targets = span_boundary_targets(
            out["labels"].numpy(), slots=self.slots, max_targets=self.max_targets
        )
        out.update({k: torch.from_numpy(v) for k, v in targets.items()})
        return out
