"""Transformer building blocks shared by every family (GPT now; BERT, T5 and GLM reuse them).

Plain single-device PyTorch: tensor parallelism, checkpointing and compilation are applied
from `parallel/` by module path (`attn.qkv`, `attn.out`, `mlp.fc_in`, `mlp.fc_gate`,
`mlp.fc_out`).

Shape legend (suffixes of tensor names):
    B  batch size
    T  query sequence length (tokens)
    S  key/value sequence length (equals T in self-attention)
    D  model width, d_model
    H  attention heads (the local heads when the projections are tensor-parallel)
    K  head size (d_model // n_head unless given explicitly)
    R  half a head size, K // 2 (one rotary frequency per pair of channels)
    F  MLP inner size, ffn_size
    P  rows of the relative position table: 2k + 1 clipped distances -k..k (fewer when
       the sequence is shorter than k + 1)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.config import ModelConfig
from models.moe import MoE

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "NORMS",
    "MultiHeadAttention",
    "RelativePositions",
    "RelativeSinusoidal",
    "RotaryEmbedding",
    "TransformerBlock",
    "apply_rotary",
    "causal_mask",
    "chunked_row_losses",
    "head_outputs",
    "make_norm",
    "relative_attention",
    "relative_index",
    "relative_sinusoid_table",
]

# MLP activations. The gated one multiplies an activated branch by a linear one (GLU
# variants, Shazeer 2020), as T5 v1.1 does; its GELU is the tanh approximation, like T5's.
ACTIVATIONS = ("gelu_tanh", "gelu", "relu", "gated_gelu")
NORMS = ("layernorm", "rmsnorm")

# cos and sin tables of rotary position embeddings, each (T, K) or (B, T, K).
Rope = tuple[torch.Tensor, torch.Tensor]


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


def make_norm(kind: str, d_model: int, *, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """LayerNorm (with or without bias) or RMSNorm (Zhang & Sennrich 2019, which has no bias)."""
    if kind == "layernorm":
        return nn.LayerNorm(d_model, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(d_model, eps=eps)
    raise ValueError(f"norm={kind!r} is unknown; choose one of {NORMS}")


class RotaryEmbedding(nn.Module):
    """cos/sin tables of rotary position embeddings (RoPE, Su et al. 2021, "RoFormer").

    Channel pair (i, i + K/2) of every query and key head is rotated by the angle
    `position * base**(-2i/K)`, so the score of a query and a key depends on their positions
    only through their difference. Pairing the two halves of the head (rather than adjacent
    channels) is the GPT-NeoX / LLaMA layout: the rotation needs no strided gather.

    The module holds no tensors: the tables are recomputed from the position ids on each
    call (a (T, K) outer product, small next to any matmul), so the module is safe to build
    on the meta device and adds nothing to the state dict. Compute them once per forward
    pass and hand the same pair to every layer.
    """

    def __init__(self, head_dim: int, *, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head size, got {head_dim}")
        if base <= 0:
            raise ValueError(f"rotary base={base} must be > 0")
        self.head_dim = head_dim
        self.base = float(base)

    def forward(self, position_ids: torch.Tensor) -> Rope:
        """(cos, sin), each of shape position_ids.shape + (K,), in float32.

        `position_ids` is (T,) or (B, T); packed documents restart their positions at 0.
        """
        r = self.head_dim // 2
        exponent_R = torch.arange(r, device=position_ids.device, dtype=torch.float32) / r
        inv_freq_R = self.base**-exponent_R
        # float32 angles: positions stay exact up to 2**24, far beyond any context length.
        angles_TR = position_ids.to(torch.float32)[..., None] * inv_freq_R
        angles_TK = torch.cat([angles_TR, angles_TR], dim=-1)
        return angles_TK.cos(), angles_TK.sin()


def apply_rotary(x_BHTK: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate channel pairs (i, i + K/2) of `x_BHTK` by the angles of `rope` (see RotaryEmbedding).

    The tables are (T, K), shared by the batch, or (B, T, K), per row; they broadcast over
    heads, so a tensor-parallel shard with fewer local heads uses the same tables. The
    rotation runs in float32 and returns the input dtype.
    """
    cos, sin = rope
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    x = x_BHTK.float()
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(x_BHTK.dtype)


def relative_sinusoid_table(
    max_relative_position: int, head_dim: int, *, device: torch.device | None = None
) -> torch.Tensor:
    """NEZHA's fixed (2k + 1, K) table, float32: row p, for the clipped distance p - k, holds
    sin(p / 10000**(2c / K)) in channel 2c and cos(p / 10000**(2c / K)) in channel 2c + 1.

    The row index p = clip(j - i, -k, k) + k, not the distance itself, is the sinusoid's
    argument: that is what NEZHA's released code (and the former transformers port) computes.
    The paper's formula takes the distance; the two tables differ by a rotation of each
    (sin, cos) channel pair by the fixed angle k / 10000**(2c / K), an orthogonal map that
    the query, key, value and output projections absorb exactly, so both describe the same
    models, and this one loads NEZHA's released weights. Computed in float64 and rounded
    once, like the released table.
    """
    k = max_relative_position
    p_P = torch.arange(2 * k + 1, dtype=torch.float64, device=device)
    exponent_R = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    inv_freq_R = 10000.0**-exponent_R
    angles_PR = p_P[:, None] * inv_freq_R
    return torch.stack([angles_PR.sin(), angles_PR.cos()], dim=-1).flatten(1).float()


class RelativePositions(NamedTuple):
    """What relative_sinusoidal attention needs from the model, built once per forward pass
    (`RelativeSinusoidal`) and handed to every layer, like the rotary tables."""

    table_PK: torch.Tensor
    """(2k + 1, K) float32 table of `relative_sinusoid_table`; its length gives k."""
    position_ids: torch.Tensor | None = None
    """(T,) or (B, T) positions whose differences are the distances; None = 0..T-1."""


class RelativeSinusoidal(nn.Module):
    """Functional relative position encoding (NEZHA, Wei et al. 2019), in the form of Shaw et
    al. 2018: in every attention layer the key and the value of position j, seen from query
    i, get a_ij = table[clip(j - i, -k, k) + k] added, with one FIXED sinusoidal table (see
    `relative_sinusoid_table`) shared by keys and values, by every head and every layer.

    The module holds no tensors (nothing is learned, nothing enters the state dict, and it
    builds on the meta device); `forward` returns the table and the positions for
    `MultiHeadAttention`, which computes the distances from the length it attends over.
    """

    def __init__(self, head_dim: int, *, max_relative_position: int):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"relative sinusoids need an even head size, got {head_dim}")
        if max_relative_position < 1:
            raise ValueError(f"max_relative_position={max_relative_position} must be >= 1")
        self.head_dim = head_dim
        self.max_relative_position = max_relative_position

    def forward(
        self, position_ids: torch.Tensor | None = None, *, device: torch.device | None = None
    ) -> RelativePositions:
        table_PK = relative_sinusoid_table(self.max_relative_position, self.head_dim, device=device)
        return RelativePositions(table_PK, position_ids)


def relative_index(rel: RelativePositions, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(table rows used, index) for self-attention over `t` tokens: index[..., i, j] is the
    row of the table for query i and key j, clip(j - i, -k, k) shifted to start at 0.

    Without position ids the index is (T, T), shared by the batch, and only the distances a
    row of t tokens can reach are kept (2 min(k, t - 1) + 1 rows of the table); with them it
    is (T, T) or (B, 1, T, T) over the whole table.
    """
    table_PK, position_ids = rel
    k = (table_PK.shape[0] - 1) // 2
    if position_ids is None:
        reach = min(k, t - 1)
        pos_T = torch.arange(t, device=table_PK.device)
        distance_TT = pos_T[None, :] - pos_T[:, None]
        return table_PK[k - reach : k + reach + 1], distance_TT.clamp(-reach, reach) + reach
    distance = position_ids[..., None, :] - position_ids[..., :, None]
    index = distance.clamp(-k, k) + k
    return table_PK, index[:, None] if index.dim() == 3 else index


def relative_attention(
    q_BHTK: torch.Tensor,
    k_BHTK: torch.Tensor,
    v_BHTK: torch.Tensor,
    *,
    table_PK: torch.Tensor,
    index: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention with relative position terms in the keys and the values (Shaw et al. 2018):

        e_ij = q_i . (k_j + a_ij) / sqrt(K),   z_i = sum_j softmax_j(e_ij + mask_ij) (v_j + a_ij)

    with a_ij = table_PK[index[..., i, j]] (see `relative_index`). The scores are computed
    explicitly (memory O(T^2) per head, like SDPA's math backend), never with the
    (T, T, K) table of every pair: a_ij takes only P distinct values, so the key term is
    q_i . a_p for each p, a (T, P) matmul, gathered into (T, T); the value term sums each
    query's probabilities by p (a scatter-add into (T, P)), then multiplies by the table.
    Both cost O(T P K) per head, not O(T^2 K). The softmax runs in float32; dropout acts on
    the probabilities before both value terms, as in NEZHA's code. `attn_mask` broadcasts to
    (B, H, T, T): boolean (True = may attend) or additive float. On CUDA the scatter-add
    (and the gather's backward) accumulate atomically unless
    `torch.use_deterministic_algorithms(True)` selects their deterministic kernels.
    """
    b, h, t, head_dim = q_BHTK.shape
    table_PK = table_PK.to(q_BHTK.dtype)
    index_BHTT = index.expand(b, h, t, t)
    scores_BHTT = q_BHTK @ k_BHTK.transpose(-2, -1)
    key_terms_BHTP = q_BHTK @ table_PK.transpose(0, 1)
    scores_BHTT = (scores_BHTT + key_terms_BHTP.gather(-1, index_BHTT)) / math.sqrt(head_dim)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores_BHTT = scores_BHTT.masked_fill(~attn_mask, float("-inf"))
        else:
            scores_BHTT = scores_BHTT + attn_mask
    probs_BHTT = torch.softmax(scores_BHTT.float(), dim=-1).to(v_BHTK.dtype)
    if dropout_p > 0:
        probs_BHTT = F.dropout(probs_BHTT, p=dropout_p)
    per_distance_BHTP = probs_BHTT.new_zeros(b, h, t, table_PK.shape[0])
    per_distance_BHTP = per_distance_BHTP.scatter_add(-1, index_BHTT, probs_BHTT)
    return probs_BHTT @ v_BHTK + per_distance_BHTP @ table_PK


class MultiHeadAttention(nn.Module):
    """Self-attention with one fused qkv projection and `F.scaled_dot_product_attention`.

    The fused qkv output is laid out per head as (H, 3, K) rather than (3, H, K): a contiguous
    column shard of `qkv` then holds whole heads with their q, k and v, so column-wise tensor
    parallelism needs no re-ordering, and `forward` infers the (local) head count from the
    width it receives. `head_dim` defaults to d_model // n_head; setting it decouples the
    attention width n_head * head_dim from d_model (T5's d_kv, GPT-3 13B's 5140 = 40 x 128.5).

    Given `relative` positions (NEZHA) the attention core is `relative_attention`, explicit
    scores instead of SDPA; everything else runs SDPA. The relative terms act per head on
    head-sized vectors, with one table for all heads, so a rank holding some of the heads
    (tensor parallelism) computes its own heads' share unchanged.
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        head_dim: int | None = None,
    ):
        super().__init__()
        if head_dim is None:
            if d_model % n_head:
                raise ValueError(f"n_head={n_head} does not divide d_model={d_model}")
            head_dim = d_model // n_head
        if head_dim <= 0:
            raise ValueError(f"head_dim={head_dim} must be > 0")
        self.n_head = n_head
        self.head_dim = head_dim
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * n_head * head_dim, bias=bias)
        self.out = nn.Linear(n_head * head_dim, d_model, bias=bias)

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: Rope | None = None,
        relative: RelativePositions | None = None,
    ) -> torch.Tensor:
        """Attend over `x_BTD`.

        `attn_mask` broadcasts to (B, H, T, S): boolean (True = may attend) or additive float
        (e.g. a padding mask or a relative-position bias). With `is_causal` as well, the causal
        constraint is merged into it. `rope` is a (cos, sin) pair from `RotaryEmbedding`,
        applied to the queries and keys (not the values). `relative` (from
        `RelativeSinusoidal`) adds NEZHA's relative terms to keys and values.
        """
        b, t, _ = x_BTD.shape
        qkv_BTH3K = self.qkv(x_BTD).view(b, t, -1, 3, self.head_dim)
        q_BHTK, k_BHTK, v_BHTK = qkv_BTH3K.permute(3, 0, 2, 1, 4).unbind(0)
        if rope is not None:
            q_BHTK, k_BHTK = apply_rotary(q_BHTK, rope), apply_rotary(k_BHTK, rope)
        if attn_mask is not None and is_causal:
            attn_mask = _merge_causal(attn_mask, t, t)
            is_causal = False
        if relative is not None:
            y_BTD = self._relative(q_BHTK, k_BHTK, v_BHTK, relative, attn_mask, is_causal)
            return self.out(y_BTD)
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

    def scores(
        self,
        x_BTD: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        rope: Rope | None = None,
    ) -> torch.Tensor:
        """The scaled scores q k^T / sqrt(K) (B, H, T, T) that `forward` feeds its softmax,
        computed again from `x_BTD` (the qkv projection runs a second time), with 0 where a
        boolean `attn_mask` forbids a key (TinyBERT's convention: masked entries compare
        equal). For attention distillation; relative positions are not supported."""
        b, t, _ = x_BTD.shape
        qkv_BTH3K = self.qkv(x_BTD).view(b, t, -1, 3, self.head_dim)
        q_BHTK, k_BHTK, _ = qkv_BTH3K.permute(3, 0, 2, 1, 4).unbind(0)
        if rope is not None:
            q_BHTK, k_BHTK = apply_rotary(q_BHTK, rope), apply_rotary(k_BHTK, rope)
        scores_BHTT = (q_BHTK @ k_BHTK.transpose(-1, -2)) * self.head_dim**-0.5
        if attn_mask is None:
            return scores_BHTT
        if attn_mask.dtype != torch.bool:
            raise ValueError(f"scores take a boolean attn_mask, got {attn_mask.dtype}")
        return scores_BHTT.masked_fill(~attn_mask, 0.0)

    def _relative(self, q_BHTK, k_BHTK, v_BHTK, relative, attn_mask, is_causal) -> torch.Tensor:
        b, _, t, _ = q_BHTK.shape
        if is_causal:
            attn_mask = causal_mask(t, device=q_BHTK.device)
        table_PK, index = relative_index(relative, t)
        y_BHTK = relative_attention(
            q_BHTK,
            k_BHTK,
            v_BHTK,
            table_PK=table_PK,
            index=index,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return y_BHTK.transpose(1, 2).reshape(b, t, -1)


def _activation(name: str) -> nn.Module:
    if name in ("gelu_tanh", "gated_gelu"):
        return nn.GELU(approximate="tanh")
    if name == "gelu":
        return nn.GELU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"activation={name!r} is unknown; choose one of {ACTIVATIONS}")


class MLP(nn.Module):
    """Feed-forward: Linear, activation, Linear, dropout.

    `activation`: gelu_tanh (GPT-2's tanh approximation, the default), gelu (exact, BERT),
    relu (T5 v1.0), or gated_gelu (T5 v1.1): `fc_out(gelu_tanh(fc_gate(x)) * fc_in(x))`,
    with the extra `fc_gate` projection only in that case.
    """

    def __init__(
        self,
        d_model: int,
        ffn_size: int,
        *,
        dropout: float = 0.0,
        bias: bool = True,
        activation: str = "gelu_tanh",
    ):
        super().__init__()
        self.act = _activation(activation)
        self.gated = activation == "gated_gelu"
        self.fc_in = nn.Linear(d_model, ffn_size, bias=bias)
        if self.gated:
            self.fc_gate = nn.Linear(d_model, ffn_size, bias=bias)
        self.fc_out = nn.Linear(ffn_size, d_model, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.gated:
            h_BTF = self.act(self.fc_gate(x_BTD)) * self.fc_in(x_BTD)
        else:
            h_BTF = self.act(self.fc_in(x_BTD))
        return self.drop(self.fc_out(h_BTF))


class TransformerBlock(nn.Module):
    """Attention then MLP, each a residual branch with a norm.

    pre_ln=True (GPT-2):   x + drop(attn(ln1(x)));  x + drop(mlp(ln2(x)))
    pre_ln=False (BERT):   ln1(x + drop(attn(x)));  ln2(x + drop(mlp(x)))

    Each branch is dropped out once: the attention branch by `drop`, the MLP branch by the
    MLP's own output dropout. `bias` covers the linear layers; `norm_bias` the LayerNorms
    (kept separate so that existing callers passing bias=False keep their norm biases).
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
        activation: str = "gelu_tanh",
        norm: str = "layernorm",
        norm_bias: bool = True,
        head_dim: int | None = None,
        mlp: nn.Module | None = None,
    ):
        super().__init__()
        self.pre_ln = pre_ln
        self.ln1 = make_norm(norm, d_model, eps=layer_norm_eps, bias=norm_bias)
        self.attn = MultiHeadAttention(
            d_model, n_head, dropout=dropout, bias=bias, head_dim=head_dim
        )
        self.drop = nn.Dropout(dropout)
        self.ln2 = make_norm(norm, d_model, eps=layer_norm_eps, bias=norm_bias)
        # A mixture of experts in MoE layers; like the dense MLP it drops its own output.
        self.mlp = (
            mlp
            if mlp is not None
            else MLP(d_model, ffn_size, dropout=dropout, bias=bias, activation=activation)
        )

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        rope: Rope | None = None,
        relative: RelativePositions | None = None,
        return_scores: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The block's output; with `return_scores`, (output, the attention's pre-softmax
        scores (B, H, T, T), `MultiHeadAttention.scores`), for attention distillation."""
        mask = {"attn_mask": attn_mask, "is_causal": is_causal, "rope": rope}
        if relative is not None:
            mask["relative"] = relative
        h_BTD = self.ln1(x_BTD) if self.pre_ln else x_BTD
        a_BTD = self.attn(h_BTD, **mask)
        if self.pre_ln:
            x_BTD = x_BTD + self.drop(a_BTD)
            y_BTD = x_BTD + self.mlp(self.ln2(x_BTD))
        else:
            x_BTD = self.ln1(x_BTD + self.drop(a_BTD))
            y_BTD = self.ln2(x_BTD + self.mlp(x_BTD))
        if not return_scores:
            return y_BTD
        return y_BTD, self.attn.scores(h_BTD, attn_mask=attn_mask, rope=rope)


def sequence_length(x: torch.Tensor, *per_sample: torch.Tensor | None) -> int:
    """Length of the whole sequence: the last dim of the first per-sample input given
    (positions, masks), else dim 1 of `x`, the token ids or hidden states. Hidden states
    entering a pipeline stage may hold only this rank's slice of the sequence (sequence
    parallelism); positions and masks always span all of it."""
    for tensor in per_sample:
        if tensor is not None:
            return tensor.shape[-1]
    return x.shape[1]


def check_seq_len(t: int, max_seq_len: int) -> None:
    """Refuse sequences longer than the position table (or the configured maximum)."""
    if t > max_seq_len:
        raise ValueError(
            f"sequence length {t} exceeds model.max_seq_len={max_seq_len}; "
            "raise model.max_seq_len or shorten the sequences"
        )


def block_from_config(cfg: ModelConfig, *, index: int = 0) -> TransformerBlock:
    """Block `index` of a GPT, BERT or GLM model described by `cfg` (an MoE layer where
    cfg.moe puts one)."""
    mlp = None
    moe_ids = cfg.moe.layer_ids(cfg.n_layer)
    if index in moe_ids:
        mlp = MoE(
            cfg.moe,
            d_model=cfg.d_model,
            ffn_size=cfg.ffn_size,
            activation=cfg.activation,
            bias=cfg.bias,
            output_dropout=cfg.dropout,
            aux_loss_layers=len(moe_ids),
        )
    return TransformerBlock(
        cfg.d_model,
        cfg.n_head,
        cfg.ffn_size,
        dropout=cfg.dropout,
        layer_norm_eps=cfg.layer_norm_eps,
        bias=cfg.bias,
        pre_ln=cfg.pre_ln,
        activation=cfg.activation,
        norm=cfg.norm,
        norm_bias=cfg.bias,
        head_dim=cfg.head_dim,
        mlp=mlp,
    )


@torch.no_grad()
def init_normal_(model: nn.Module, std: float) -> None:
    """Linear and embedding weights ~ N(0, std), biases 0, norm weights 1 and biases 0."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm | nn.RMSNorm):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
    for module in model.modules():  # experts and routers follow the Switch recipe
        if isinstance(module, MoE):
            module.reset_parameters()


@torch.no_grad()
def scale_residual_init_(blocks: Iterable[TransformerBlock], *, std: float, n_layer: int) -> None:
    """Each block adds two projections to the residual stream; drawing them with std /
    sqrt(2 n_layer) keeps the stream's variance roughly flat with depth (GPT-2, sec. 2.3)."""
    residual_std = std / math.sqrt(2 * n_layer)
    for block in blocks:
        nn.init.normal_(block.attn.out.weight, mean=0.0, std=residual_std)
        if isinstance(block.mlp, MoE):  # the experts' output projections, by the same factor
            block.mlp.experts.w_out.mul_(1 / math.sqrt(2 * n_layer))
        else:
            nn.init.normal_(block.mlp.fc_out.weight, mean=0.0, std=residual_std)


def chunked_row_losses(
    head: Callable[[torch.Tensor], torch.Tensor],
    x_BTD: torch.Tensor,
    labels_BT: torch.Tensor,
    *,
    chunk_tokens: int,
) -> torch.Tensor:
    """Summed fp32 cross-entropy of each row (B,) of `head(x_BTD)` against `labels_BT`,
    computed a slice of the sequence at a time so the (B, T, V) logits never exist whole.

    Each slice's head and loss run under activation checkpointing: forward keeps only the
    slice's summed loss, and backward recomputes one slice's logits at a time. The cost is
    one more forward pass of the head; the logits held at once are about `chunk_tokens`
    rows of V (0: the whole sequence in one slice). Labels of -100 are not scored, as in
    `F.cross_entropy`. `head` may be tensor-parallel (vocabulary-sharded logits, under
    `loss_parallel`). Hidden states holding a 1/k slice of the sequence (sequence
    parallelism: the head's input hook gathers the same slice from every rank, rank by
    rank) are matched with the labels of those positions.
    """
    b, t_local = x_BTD.shape[:2]
    t = labels_BT.shape[1]
    if t % t_local:
        raise ValueError(f"labels of length {t} do not match hidden states of length {t_local}")
    labels_BKT = labels_BT.reshape(b, t // t_local, t_local)
    step = max(1, chunk_tokens // (b * (t // t_local))) if chunk_tokens > 0 else t_local
    total_B = None
    for start in range(0, t_local, step):
        x_BCD = x_BTD[:, start : start + step]
        labels_BC = labels_BKT[:, :, start : start + step].reshape(b, -1)
        sums_B = checkpoint(_row_losses, head, x_BCD, labels_BC, use_reentrant=False)
        total_B = sums_B if total_B is None else total_B + sums_B
    return total_B


def head_outputs(
    head: Callable[[torch.Tensor], torch.Tensor],
    x_BTD: torch.Tensor,
    labels_BT: torch.Tensor | None,
    *,
    chunk_tokens: int,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """`head`'s logits of `x_BTD`, or, given the labels, {"row_losses": (B,)} scored a slice
    at a time (`chunked_row_losses`)."""
    if labels_BT is None:
        return head(x_BTD)
    return {"row_losses": chunked_row_losses(head, x_BTD, labels_BT, chunk_tokens=chunk_tokens)}


def _row_losses(head, x_BCD: torch.Tensor, labels_BC: torch.Tensor) -> torch.Tensor:
    logits_BCV = head(x_BCD)
    per_token = F.cross_entropy(
        logits_BCV.flatten(0, 1).float(), labels_BC.flatten(), reduction="none"
    )
    return per_token.view(labels_BC.shape).sum(1)


class TiedOutputMixin:
    """Shares `wte.weight` with `lm_head.weight` when `cfg.tie_embeddings`.

    Anything that replaces parameters (`to_empty`, a tensor-parallel plan) breaks the
    sharing, so it must call `tie_weights` again; `to_empty` does.
    """

    def tie_weights(self) -> None:
        # A model built without its table or its head (ELECTRA's halves) ties nothing itself.
        if self.cfg.tie_embeddings and self.wte is not None and self.lm_head is not None:
            self.lm_head.weight = self.wte.weight

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True):
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self
