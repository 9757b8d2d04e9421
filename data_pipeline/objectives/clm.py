"""Causal language modelling: predict every next token of a packed row.

Legend: B = batch, S = sample_len (seq_len + 1), T = seq_len.

With data.document_attention the rows' documents are kept apart: position ids restart
at every document start and a block-diagonal mask stops attention across documents
(the model folds its causal mask into it).
"""

from __future__ import annotations

import torch

from data_pipeline.config import DataConfig


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


def document_ids(doc_start_BT: torch.Tensor) -> torch.Tensor:
    """Index of the document each position belongs to, counted within its row."""
    return doc_start_BT.long().cumsum(dim=1)


def document_positions(doc_start_BT: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its own document (0 at every document start)."""
    t = doc_start_BT.size(1)
    idx_BT = torch.arange(t, device=doc_start_BT.device).expand_as(doc_start_BT)
    starts_BT = torch.where(doc_start_BT, idx_BT, torch.zeros_like(idx_BT))
    return idx_BT - starts_BT.cummax(dim=1).values


def document_mask(doc_start_BT: torch.Tensor) -> torch.Tensor:
    """[B, 1, T, T] boolean mask: True where query and key lie in the same document."""
    ids_BT = document_ids(doc_start_BT)
    return (ids_BT[:, :, None] == ids_BT[:, None, :])[:, None]


class CausalLM:
    """data.objective=clm."""

    def __init__(self, name: str, *, cfg: DataConfig, tokenizer, seq_len: int, seed: int):
        cfg.check_objective(name, seq_len=seq_len)
        self.document_attention = cfg.document_attention

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = clm_batch(batch["tokens"])
        if self.document_attention:
            doc_start_BT = batch["doc_start"][:, :-1]
            out["position_ids"] = document_positions(doc_start_BT)
            out["attn_mask"] = document_mask(doc_start_BT)
        return out
