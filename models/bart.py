"""BART's encoder-decoder (Lewis et al. 2020, "BART: Denoising Sequence-to-Sequence
Pre-training for Natural Language Generation, Translation, and Comprehension").

A standard Transformer sequence-to-sequence model, as BART configures it: a bidirectional
encoder and an autoregressive decoder of post-LN blocks (LayerNorm after each residual add,
GeLU in the MLP, biases everywhere), learned absolute positions per stack, a LayerNorm on
each stack's embeddings, one token table shared by both stacks and the output projection,
and scores scaled by 1/sqrt(head size). MASS (Song et al. 2019) trains the same stack with
its own objective (data.objective=mass; recipe mass_base).

Module paths follow Loom's encoder-decoder naming (`encoder.blocks.3.attn.q`, as T5's),
and `models/hf/bart.py` maps them to and from Hugging Face's BART names. Hugging Face's
position tables hold two unused leading rows (fairseq's padding offset) and its
`final_logits_bias` is a buffer that pretraining never changes (zeros); Loom has neither.

Shape legend (suffixes of tensor names):
    B  batch size
    S  encoder (input) sequence length
    T  decoder (target) sequence length; inside `BartAttention`, the query length
    L  key/value length inside `BartAttention` (T in self-attention, S in cross-attention)
    D  model width, d_model
    H  attention heads (the local heads when the projections are tensor-parallel)
    K  head size
    V  embedding rows (the padded vocabulary)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import MLP, check_seq_len, head_outputs, init_normal_
from models.config import ModelConfig
from models.t5 import compute_dtype, masked_bias

__all__ = ["Bart", "BartAttention", "BartBlock", "BartStack"]


class BartAttention(nn.Module):
    """Multi-head attention with separate q, k, v, o projections.

    Self-attention when `kv_BLD` is None, cross-attention over `kv_BLD` otherwise.
    `attn_mask` is additive (a large negative number where a query may not attend a key),
    broadcast to (B, H, T, L).
    """

    def __init__(
        self, d_model: int, n_head: int, head_dim: int, *, bias: bool, dropout: float = 0.0
    ):
        super().__init__()
        self.head_dim, self.dropout = head_dim, dropout
        inner = n_head * head_dim
        self.q = nn.Linear(d_model, inner, bias=bias)
        self.k = nn.Linear(d_model, inner, bias=bias)
        self.v = nn.Linear(d_model, inner, bias=bias)
        self.o = nn.Linear(inner, d_model, bias=bias)

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        kv_BLD: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kv_BLD = x_BTD if kv_BLD is None else kv_BLD
        b, t, _ = x_BTD.shape
        l = kv_BLD.shape[1]
        # -1 heads: a column-sharded (tensor-parallel) projection holds only its local heads.
        q_BHTK = self.q(x_BTD).view(b, t, -1, self.head_dim).transpose(1, 2)
        k_BHLK = self.k(kv_BLD).view(b, l, -1, self.head_dim).transpose(1, 2)
        v_BHLK = self.v(kv_BLD).view(b, l, -1, self.head_dim).transpose(1, 2)
        y_BHTK = F.scaled_dot_product_attention(
            q_BHTK,
            k_BHLK,
            v_BHLK,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.o(y_BHTK.transpose(1, 2).reshape(b, t, -1))


class BartBlock(nn.Module):
    """Post-LN residual branches: self-attention, cross-attention (decoder only), MLP.

    x = ln_attn(x + drop(attn(x)))
    x = ln_cross(x + drop(cross_attn(x, memory)))      decoder only
    x = ln_mlp(x + mlp(x))                              the MLP drops its own output
    """

    def __init__(self, cfg: ModelConfig, *, cross_attention: bool):
        super().__init__()
        d, h, k, eps = cfg.d_model, cfg.n_head, cfg.head_dim, cfg.layer_norm_eps

        def attention() -> BartAttention:
            return BartAttention(d, h, k, bias=cfg.bias, dropout=cfg.dropout)

        self.attn = attention()
        self.ln_attn = nn.LayerNorm(d, eps=eps)
        self.cross_attention = cross_attention
        if cross_attention:
            self.cross_attn = attention()
            self.ln_cross = nn.LayerNorm(d, eps=eps)
        self.mlp = MLP(
            d, cfg.ffn_size, dropout=cfg.dropout, bias=cfg.bias, activation=cfg.activation
        )
        self.ln_mlp = nn.LayerNorm(d, eps=eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        self_mask: torch.Tensor | None = None,
        memory_BSD: torch.Tensor | None = None,
        memory_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x_BTD = self.ln_attn(x_BTD + self.drop(self.attn(x_BTD, attn_mask=self_mask)))
        if self.cross_attention:
            c_BTD = self.cross_attn(x_BTD, kv_BLD=memory_BSD, attn_mask=memory_mask)
            x_BTD = self.ln_cross(x_BTD + self.drop(c_BTD))
        return self.ln_mlp(x_BTD + self.mlp(x_BTD))


class BartStack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention): a learned
    position table and a LayerNorm on the embedded tokens, then the blocks."""

    def __init__(self, cfg: ModelConfig, *, n_layer: int, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.max_seq_len = cfg.max_seq_len
        self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.emb_ln = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        # Keyed by layer index, as every family's blocks.
        self.blocks = nn.ModuleDict(
            {str(i): BartBlock(cfg, cross_attention=is_decoder) for i in range(n_layer)}
        )

    def forward(
        self,
        tokens_BTD: torch.Tensor,
        *,
        key_mask_BT: torch.Tensor | None = None,
        memory_BSD: torch.Tensor | None = None,
        memory_mask_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the embedded tokens `tokens_BTD` (not yet positioned) through the stack.

        `key_mask_BT` / `memory_mask_BS`: bool, True = real token; padded keys get no weight.
        """
        t, device = tokens_BTD.shape[1], tokens_BTD.device
        check_seq_len(t, self.max_seq_len)
        x_BTD = self.drop(self.emb_ln(tokens_BTD + self.wpe(torch.arange(t, device=device))))
        # Additive masks with a finite fill (T5's), so a row with no key to attend to (a
        # padded query) stays finite rather than NaN.
        dtype, zero = compute_dtype(x_BTD), torch.zeros((), device=device)
        allowed = None if key_mask_BT is None else key_mask_BT[:, None, None, :]
        if self.is_decoder:
            causal_TT = torch.ones(t, t, dtype=torch.bool, device=device).tril()
            allowed = causal_TT if allowed is None else allowed & causal_TT
        self_mask = None if allowed is None else masked_bias(zero, allowed, dtype)
        memory_mask = None
        if memory_mask_BS is not None:
            memory_mask = masked_bias(zero, memory_mask_BS[:, None, None, :], dtype)
        for block in self.blocks.values():
            x_BTD = block(
                x_BTD, self_mask=self_mask, memory_BSD=memory_BSD, memory_mask=memory_mask
            )
        return x_BTD


def _check_mask(name: str, mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.shape != ids.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected {tuple(ids.shape)}")
    return mask.bool()


class Bart(nn.Module):
    """Shared token embedding, encoder stack, decoder stack, output projection (tied to the
    embedding when `cfg.tie_embeddings`, as BART's).

    The forward pass returns logits; the loss belongs to the trainer. `encode`, `decode` and
    `lm_head` are separate so callers (generation, scoring) can run one part.
    """

    pipeline_refusal = (
        "every decoder stage needs the encoder output and the decoder's cross-attention masks"
    )
    # Tokens per slice of the chunked loss (forward with `labels`); 0: the whole sequence.
    loss_chunk_tokens = 0

    def __init__(self, cfg: ModelConfig, *, vocab_size: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.shared = nn.Embedding(vocab_size, cfg.d_model)
        self.encoder = BartStack(cfg, n_layer=cfg.n_layer, is_decoder=False)
        n_dec = cfg.n_decoder_layer if cfg.n_decoder_layer is not None else cfg.n_layer
        self.decoder = BartStack(cfg, n_layer=n_dec, is_decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    def tie_weights(self) -> None:
        """Share `shared.weight` with `lm_head.weight` when configured; idempotent.

        Anything that replaces parameters (`to_empty`, a tensor-parallel plan) breaks the
        sharing, so it must call this again afterwards.
        """
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.shared.weight

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> Bart:
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """BART's initialisation: linear and embedding weights ~ N(0, init_std), biases 0,
        LayerNorms 1 and 0. A no-op on the meta device, so call it again after `to_empty`."""
        init_normal_(self, self.cfg.init_std)

    def encode(
        self, input_ids_BS: torch.Tensor, *, attention_mask_BS: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encoder output (B, S, D)."""
        return self.encoder(self.shared(input_ids_BS), key_mask_BT=attention_mask_BS)

    def decode(
        self,
        decoder_input_ids_BT: torch.Tensor,
        *,
        memory_BSD: torch.Tensor,
        attention_mask_BS: torch.Tensor | None = None,
        decoder_attention_mask_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder output (B, T, D), before the output projection."""
        return self.decoder(
            self.shared(decoder_input_ids_BT),
            key_mask_BT=decoder_attention_mask_BT,
            memory_BSD=memory_BSD,
            memory_mask_BS=attention_mask_BS,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        decoder_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Logits (B, T, V) of the decoder for encoder ids (B, S) and decoder ids (B, T).

        Masks are (B, S) / (B, T), True (or 1) for real tokens; padded keys get no
        attention. The decoder is causal whatever `decoder_attention_mask` says. With `labels`
        (B, T) the logits are not returned but scored a slice at a time: {"row_losses": (B,)
        summed cross-entropy} (`chunked_row_losses`).
        """
        for name, ids in (("input_ids", input_ids), ("decoder_input_ids", decoder_input_ids)):
            if ids.dim() != 2:
                raise ValueError(f"{name} must be (batch, seq_len), got {tuple(ids.shape)}")
        attention_mask_BS = _check_mask("attention_mask", attention_mask, input_ids)
        decoder_mask_BT = _check_mask(
            "decoder_attention_mask", decoder_attention_mask, decoder_input_ids
        )
        memory_BSD = self.encode(input_ids, attention_mask_BS=attention_mask_BS)
        y_BTD = self.decode(
            decoder_input_ids,
            memory_BSD=memory_BSD,
            attention_mask_BS=attention_mask_BS,
            decoder_attention_mask_BT=decoder_mask_BT,
        )
        return head_outputs(self.lm_head, y_BTD, labels, chunk_tokens=self.loss_chunk_tokens)
