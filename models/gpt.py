"""GPT-2 style decoder-only language model (also GPT-3 sizes and a rotary variant).

Shape legend (suffixes of tensor names):
    B  batch size
    T  sequence length (tokens)
    D  model width, d_model
    K  head size
    V  embedding rows (the padded vocabulary)
"""

from __future__ import annotations

import torch
from torch import nn

from models.blocks import (
    Rope,
    RotaryEmbedding,
    TiedOutputMixin,
    block_from_config,
    causal_mask,
    check_seq_len,
    head_outputs,
    init_normal_,
    make_norm,
    scale_residual_init_,
    sequence_length,
)
from models.config import ModelConfig

__all__ = ["GPT"]


class GPT(TiedOutputMixin, nn.Module):
    """Token embeddings (+ learned positions), `n_layer` causal pre-LN blocks, final norm, head.

    `cfg.position`: learned adds a `wpe` table; rotary rotates queries and keys in every
    layer (`wpe` is absent); none uses no position signal beyond the causal mask. The forward
    pass returns logits; the loss belongs to the trainer.
    """

    # Pipeline split: the first stage holds the embeddings, the last the final norm and the
    # head; parameter-free modules (the rotary tables) run on every stage.
    pipeline_first = ("wte", "wpe", "drop")
    pipeline_last = ("ln_f", "lm_head")
    # Tokens per slice of the chunked loss (forward with `labels`); 0: the whole sequence.
    loss_chunk_tokens = 0

    def __init__(self, cfg: ModelConfig, *, vocab_size: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.max_seq_len = cfg.max_seq_len
        d = cfg.d_model
        self.wte = nn.Embedding(vocab_size, d)
        self.wpe = nn.Embedding(cfg.max_seq_len, d) if cfg.position == "learned" else None
        self.rotary = (
            RotaryEmbedding(cfg.head_dim, base=cfg.rotary_base)
            if cfg.position == "rotary"
            else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        # A dict keyed by layer index keeps the names of the remaining blocks stable when a
        # pipeline stage deletes the ones it does not own.
        self.blocks = nn.ModuleDict(
            {str(i): block_from_config(cfg, index=i) for i in range(cfg.n_layer)}
        )
        self.ln_f = make_norm(cfg.norm, d, eps=cfg.layer_norm_eps, bias=cfg.bias)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 initialisation; a no-op on the meta device, so call it again after `to_empty`."""
        init_normal_(self, self.cfg.init_std)
        scale_residual_init_(self.blocks.values(), std=self.cfg.init_std, n_layer=self.cfg.n_layer)

    def embed(
        self, input_ids_BT: torch.Tensor, *, position_ids_BT: torch.Tensor | None = None
    ) -> torch.Tensor:
        t = input_ids_BT.shape[-1]
        check_seq_len(t, self.max_seq_len)
        x_BTD = self.wte(input_ids_BT)
        if self.wpe is not None:
            if position_ids_BT is None:
                position_ids_BT = torch.arange(t, device=input_ids_BT.device)
            x_BTD = x_BTD + self.wpe(position_ids_BT)
        return self.drop(x_BTD)

    def rope(
        self, t: int, *, device: torch.device, position_ids_BT: torch.Tensor | None = None
    ) -> Rope | None:
        """Rotary (cos, sin) tables shared by all layers, or None unless position=rotary."""
        if self.rotary is None:
            return None
        if position_ids_BT is None:
            position_ids_BT = torch.arange(t, device=device)
        return self.rotary(position_ids_BT)

    def head(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x_BTD))

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits (B, T, V) for token ids (B, T).

        `position_ids` (B, T) overrides 0..T-1 (e.g. restarting at document boundaries in
        packed sequences) for learned and rotary positions; `attn_mask` (boolean, True = may
        attend, broadcast to (B, H, T, T)) further restricts attention and is combined with
        the causal mask. With `labels` (B, T) the logits are not returned but scored a slice
        at a time: {"row_losses": (B,) summed cross-entropy} (`chunked_row_losses`).

        A pipeline stage is this model with the modules of other stages set to None: without
        the embeddings `input_ids` is the previous stage's hidden states (B, T, D), and
        without the head the hidden states are returned.
        """
        position_ids_BT = position_ids
        # The rotary tables and the mask cover the whole sequence, which a pipeline stage's
        # hidden states may hold only a slice of (sequence parallelism).
        t = sequence_length(input_ids, attn_mask, position_ids_BT)
        if self.wte is None:
            x_BTD = input_ids
        else:
            x_BTD = self.embed(input_ids, position_ids_BT=position_ids_BT)
        rope = self.rope(t, device=x_BTD.device, position_ids_BT=position_ids_BT)
        is_causal = attn_mask is None
        if attn_mask is not None:
            # Fold the causal constraint in once here rather than in every layer.
            attn_mask = attn_mask & causal_mask(t, device=attn_mask.device)
        for block in self.blocks.values():
            x_BTD = block(x_BTD, attn_mask=attn_mask, is_causal=is_causal, rope=rope)
        if self.lm_head is None:
            return x_BTD
        return head_outputs(self.head, x_BTD, labels, chunk_tokens=self.loss_chunk_tokens)
