"""Transformer building blocks shared by every family (GPT now; BERT, T5 and GLM reuse them).

Plain single-device PyTorch: tensor parallelism, checkpointing and compilation are applied
from `parallel/` by module path (`attn.qkv`, `attn.out`, `mlp.fc_in`, `mlp.fc_out`).

Shape legend (suffixes of tensor names):
    B  batch size
    T  query sequence length (tokens)
    S  key/value sequence length (equals T in self-attention)
    D  model width, d_model
    H  attention heads (the local heads when the projections are tensor-parallel)
    K  head size, d_model // n_head
    F  MLP inner size, ffn_size
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "MultiHeadAttention", "TransformerBlock", "causal_mask"]


def causal_mask(
    t: int, s: int | None = None, *, device: torch.device | None = None
) -> torch.Tensor:
    """Boolean (T, S) mask, True where query i may attend key j (j <= i, aligned at the end)."""
    s = t if s is None else s
    ones_TS = torch.ones(t, s, dtype=torch.bool, device=device)
    return torch.tril(ones_TS, diagonal=s - t)


def _merge_causal(attn_mask: torch.Tensor, t: int, s: int) -> torch.Tensor:
    """Fold the causal constraint into an explicit mask, since SDPA accepts only one of the two."""
    allowed_TS = causal_mask(t, s, device=attn_mask.device)
    if attn_mask.dtype == torch.bool:
        return attn_mask & allowed_TS
    return torch.where(allowed_TS, attn_mask, float("-inf"))


class MultiHeadAttention(nn.Module):
    """Self-attention with one fused qkv projection and `F.scaled_dot_product_attention`.

    The fused qkv output is laid out per head as (H, 3, K) rather than (3, H, K): a contiguous
    column shard of `qkv` then holds whole heads with their q, k and v, so column-wise tensor
    parallelism needs no re-ordering, and `forward` infers the (local) head count from the
    width it receives.
    """

    def __init__(self, d_model: int, n_head: int, *, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"n_head={n_head} does not divide d_model={d_model}")
        self.n_head = n_head
        self.head_dim = d_model // n_head
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out = nn.Linear(d_model, d_model, bias=bias)

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Attend over `x_BTD`.

        `attn_mask` broadcasts to (B, H, T, S): boolean (True = may attend) or additive float
        (e.g. a padding mask or a relative-position bias). With `is_causal` as well, the causal
        constraint is merged into it.
        """
        b, t, _ = x_BTD.shape
        qkv_BTH3K = self.qkv(x_BTD).view(b, t, -1, 3, self.head_dim)
        q_BHTK, k_BHTK, v_BHTK = qkv_BTH3K.permute(3, 0, 2, 1, 4).unbind(0)
        if attn_mask is not None and is_causal:
            attn_mask = _merge_causal(attn_mask, t, t)
            is_causal = False
        y_BHTK = F.scaled_dot_product_attention(
            q_BHTK,
            k_BHTK,
            v_BHTK,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal,
        )
        y_BTD = y_BHTK.transpose(1, 2).reshape(b, t, -1)
        return self.out(y_BTD)


class MLP(nn.Module):
    """Feed-forward: Linear, GELU (tanh approximation, as GPT-2), Linear, dropout."""

    def __init__(self, d_model: int, ffn_size: int, *, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.fc_in = nn.Linear(d_model, ffn_size, bias=bias)
        self.act = nn.GELU(approximate="tanh")
        self.fc_out = nn.Linear(ffn_size, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h_BTF = self.act(self.fc_in(x_BTD))
        return self.drop(self.fc_out(h_BTF))


class TransformerBlock(nn.Module):
    """Attention then MLP, each a residual branch with LayerNorm.

    pre_ln=True (GPT-2):   x + drop(attn(ln1(x)));  x + drop(mlp(ln2(x)))
    pre_ln=False (BERT):   ln1(x + drop(attn(x)));  ln2(x + drop(mlp(x)))

    Each branch is dropped out once: the attention branch by `drop`, the MLP branch by the
    MLP's own output dropout.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        ffn_size: int,
        *,
        dropout: float = 0.0,
        layer_norm_eps: float = 1e-5,
        bias: bool = True,
        pre_ln: bool = True,
    ):
        super().__init__()
        self.pre_ln = pre_ln
        self.ln1 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.attn = MultiHeadAttention(d_model, n_head, dropout=dropout, bias=bias)
        self.drop = nn.Dropout(dropout)
        self.ln2 = nn.LayerNorm(d_model, eps=layer_norm_eps)
        self.mlp = MLP(d_model, ffn_size, dropout=dropout, bias=bias)

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        if self.pre_ln:
            a_BTD = self.attn(self.ln1(x_BTD), attn_mask=attn_mask, is_causal=is_causal)
            x_BTD = x_BTD + self.drop(a_BTD)
            return x_BTD + self.mlp(self.ln2(x_BTD))
        a_BTD = self.attn(x_BTD, attn_mask=attn_mask, is_causal=is_causal)
        x_BTD = self.ln1(x_BTD + self.drop(a_BTD))
        return self.ln2(x_BTD + self.mlp(x_BTD))
