"""GLM: one Transformer over [Part A ; Part B] for autoregressive blank infilling.

Du et al. 2022, "GLM: General Language Model Pretraining with Autoregressive Blank Infilling"
(ACL). Part A is the corrupted text (each blanked span replaced by one mask token) and is
encoded bidirectionally; Part B holds the spans, each "<sop> s_1 .. s_L", generated left to
right while seeing all of Part A and the earlier Part B tokens. Positions are two-dimensional:
row 0 is the position in the corrupted text (a span's tokens share the position of their mask
token), row 1 the position inside the span (0 throughout Part A, 1..L+1 in a span), each with
its own learned table, summed with the token embedding.

Interface chosen for the attention pattern: `sep` (int64 [B]), the length of Part A of each
row. The mask is built from it inside the model: key j is visible from query i when j < sep
(Part A) or j <= i (causal). Padding after Part B needs no mask of its own: it comes last, so
no real token ever attends to it, and its own (ignored) outputs still see a non-empty set.

Shape legend (suffixes of tensor names):
    B  batch size
    T  sequence length, |Part A| + |Part B| + padding (tokens)
    S  key sequence length (equals T)
    D  model width, d_model
    V  embedding rows (the padded vocabulary)
"""

from __future__ import annotations

import torch
from torch import nn

from models.blocks import (
    TiedOutputMixin,
    block_from_config,
    check_seq_len,
    head_outputs,
    init_normal_,
    scale_residual_init_,
    sequence_length,
)
from models.config import ModelConfig

__all__ = ["GLM", "blank_infilling_mask"]


def blank_infilling_mask(
    sep_B: torch.Tensor, t: int, *, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask, True where query i may attend key j: j < sep or j <= i."""
    if sep_B.dim() != 1:
        raise ValueError(f"sep must have shape [batch], got {tuple(sep_B.shape)}")
    device = sep_B.device if device is None else device
    idx_T = torch.arange(t, device=device)
    in_a_BS = idx_T[None, :] < sep_B.to(device)[:, None]
    causal_TS = idx_T[None, :] <= idx_T[:, None]
    return (in_a_BS[:, None, :] | causal_TS[None, :, :])[:, None]


class GLM(TiedOutputMixin, nn.Module):
    """Token + 2D position embeddings, `n_layer` blocks, final LayerNorm, tied output head.

    `forward` returns logits for every position; the objective puts labels only on Part B.
    """

    # Pipeline split: the first stage holds the embeddings, the last the final norm and the
    # head; every stage rebuilds the attention mask from `sep`.
    pipeline_first = ("wte", "wpe", "wbpe", "drop")
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
        self.wpe = nn.Embedding(cfg.max_seq_len, d)
        # Block positions run 1..L+1 inside a span of L tokens, and L < max_seq_len.
        self.wbpe = nn.Embedding(cfg.max_seq_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        # Keyed by layer index so the names survive a pipeline stage deleting other blocks.
        self.blocks = nn.ModuleDict(
            {str(i): block_from_config(cfg, index=i) for i in range(cfg.n_layer)}
        )
        # Post-LN blocks already end in a LayerNorm; pre-LN ones need one before the head.
        self.ln_f = nn.LayerNorm(d, eps=cfg.layer_norm_eps) if cfg.pre_ln else nn.Identity()
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Normal(0, init_std) weights, zero biases; a no-op on meta, so re-run after to_empty.

        GLM inherits Megatron's scaled init of the two projections writing into the residual.
        """
        init_normal_(self, self.cfg.init_std)
        scale_residual_init_(self.blocks.values(), std=self.cfg.init_std, n_layer=self.cfg.n_layer)

    def embed(
        self, input_ids_BT: torch.Tensor, *, position_ids_B2T: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, t = input_ids_BT.shape
        check_seq_len(t, self.max_seq_len)
        if position_ids_B2T is None:
            # No blanks: plain positions, block position 0 (everything is Part A).
            pos_BT = torch.arange(t, device=input_ids_BT.device).expand(b, t)
            block_BT = torch.zeros_like(pos_BT)
        else:
            if position_ids_B2T.shape != (b, 2, t):
                raise ValueError(
                    f"position_ids must have shape [batch, 2, seq] = {(b, 2, t)}, "
                    f"got {tuple(position_ids_B2T.shape)}"
                )
            pos_BT, block_BT = position_ids_B2T.unbind(1)
        x_BTD = self.wte(input_ids_BT) + self.wpe(pos_BT) + self.wbpe(block_BT)
        return self.drop(x_BTD)

    def head(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x_BTD))

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        sep: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits (B, T, V) for token ids (B, T).

        `position_ids` (int64 [B, 2, T]): row 0 positions in the corrupted text, row 1 block
        positions; None means 0..T-1 and all zeros. `sep` (int64 [B]): length of Part A of
        each row; None makes the whole row Part A (fully bidirectional). With `labels` (B, T)
        the logits are not returned but scored a slice at a time: {"row_losses": (B,) summed
        cross-entropy} (`chunked_row_losses`).

        A pipeline stage is this model with the modules of other stages set to None: without
        the embeddings `input_ids` is the previous stage's hidden states (B, T, D), and
        without the head the hidden states are returned.
        """
        position_ids_B2T, sep_B = position_ids, sep
        # The mask covers the whole sequence, which a pipeline stage's hidden states may hold
        # only a slice of (sequence parallelism).
        b, t = input_ids.shape[0], sequence_length(input_ids, position_ids_B2T)
        if self.wte is None:
            x_BTD = input_ids
        else:
            x_BTD = self.embed(input_ids, position_ids_B2T=position_ids_B2T)
        mask_B1TS = None
        if sep_B is not None:
            if sep_B.shape != (b,):
                raise ValueError(f"sep must have shape [batch] = ({b},), got {tuple(sep_B.shape)}")
            mask_B1TS = blank_infilling_mask(sep_B, t, device=x_BTD.device)
        for block in self.blocks.values():
            x_BTD = block(x_BTD, attn_mask=mask_B1TS)
        if self.lm_head is None:
            return x_BTD
        return head_outputs(self.head, x_BTD, labels, chunk_tokens=self.loss_chunk_tokens)
