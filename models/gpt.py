"""GPT-2 style decoder-only language model.

Shape legend (suffixes of tensor names):
    B  batch size
    T  sequence length (tokens)
    D  model width, d_model
    V  embedding rows (the padded vocabulary)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from models.blocks import TransformerBlock, causal_mask
from models.config import ModelConfig

__all__ = ["GPT"]


class GPT(nn.Module):
    """Token + learned position embeddings, `n_layer` causal pre-LN blocks, final LayerNorm, head.

    The forward pass returns logits; the loss belongs to the trainer. The three stages
    (`embed`, the blocks, `head`) are separate methods so a pipeline stage can run a slice.
    """

    def __init__(self, cfg: ModelConfig, *, vocab_size: int):
        super().__init__()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.max_seq_len = cfg.max_seq_len
        d = cfg.d_model
        self.wte = nn.Embedding(vocab_size, d)
        self.wpe = nn.Embedding(cfg.max_seq_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        # A dict keyed by layer index keeps the names of the remaining blocks stable when a
        # pipeline stage deletes the ones it does not own.
        self.blocks = nn.ModuleDict(
            {
                str(i): TransformerBlock(
                    d,
                    cfg.n_head,
                    cfg.ffn_size,
                    dropout=cfg.dropout,
                    layer_norm_eps=cfg.layer_norm_eps,
                )
                for i in range(cfg.n_layer)
            }
        )
        self.ln_f = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Share `wte.weight` with `lm_head.weight` when configured; idempotent.

        Anything that replaces parameters (`to_empty`, a tensor-parallel plan) breaks the
        sharing, so it must call this again afterwards.
        """
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> GPT:
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 initialisation; a no-op on the meta device, so call it again after `to_empty`."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        # Each block adds two projections to the residual stream; shrinking them keeps the
        # variance of the stream roughly constant with depth (GPT-2 paper, section 2.3).
        residual_std = std / math.sqrt(2 * self.cfg.n_layer)
        for block in self.blocks.values():
            nn.init.normal_(block.attn.out.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.fc_out.weight, mean=0.0, std=residual_std)

    def embed(
        self, input_ids_BT: torch.Tensor, *, position_ids_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        t = input_ids_BT.shape[-1]
        if t > self.max_seq_len:
            raise ValueError(
                f"sequence length {t} exceeds model.max_seq_len={self.max_seq_len}; "
                "raise model.max_seq_len or shorten the sequences"
            )
        if position_ids_BT is None:
            pos_emb_TD = self.wpe(torch.arange(t, device=input_ids_BT.device))
            return self.drop(self.wte(input_ids_BT) + pos_emb_TD)
        return self.drop(self.wte(input_ids_BT) + self.wpe(position_ids_BT))

    def head(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x_BTD))

    def forward(
        self,
        input_ids_BT: torch.Tensor,
        *,
        position_ids_BT: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) for token ids (B, T).

        `position_ids_BT` overrides 0..T-1 (e.g. restarting at document boundaries in packed
        sequences); `attn_mask` (boolean, True = may attend, broadcast to (B, H, T, T)) further
        restricts attention and is combined with the causal mask.
        """
        x_BTD = self.embed(input_ids_BT, position_ids_BT=position_ids_BT)
        is_causal = attn_mask is None
        if attn_mask is not None:
            # Fold the causal constraint in once here rather than in every layer.
            t = input_ids_BT.shape[-1]
            attn_mask = attn_mask & causal_mask(t, device=attn_mask.device)
        for block in self.blocks.values():
            x_BTD = block(x_BTD, attn_mask=attn_mask, is_causal=is_causal)
        return self.head(x_BTD)
