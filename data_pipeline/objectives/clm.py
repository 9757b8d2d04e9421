"""Causal language modelling: predict every next token of a packed row.

Legend: B = batch, S = sample_len (seq_len + 1), T = seq_len.
"""

from __future__ import annotations

import torch


def clm_batch(tokens_BS: torch.Tensor) -> dict[str, torch.Tensor]:
    """Inputs are the first seq_len tokens of each row, labels the same tokens shifted by one."""
    if tokens_BS.dim() != 2 or tokens_BS.size(1) < 2:
        raise ValueError(
            f"clm_batch expects tokens of shape [batch, seq_len + 1] with seq_len >= 1, "
            f"got {tuple(tokens_BS.shape)}"
        )
    input_ids_BT = tokens_BS[:, :-1].contiguous()
    labels_BT = tokens_BS[:, 1:].contiguous()
    return {"input_ids": input_ids_BT, "labels": labels_BT}
