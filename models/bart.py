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
    T  decoder (target) sequence length; inside the attention, the query length
    L  key/value length inside the attention (T in self-attention, S in cross-attention)
    D  model width, d_model
    H  attention heads (the local heads when the projections are tensor-parallel)
    K  head size
    V  embedding rows (the padded vocabulary)
"""

from __future__ import annotations

import torch
from torch import nn

from models.blocks import MLP, check_seq_len, init_normal_
from models.config import ModelConfig
from models.t5 import EncoderDecoder, T5Attention, compute_dtype, masked_bias

__all__ = ["Bart", "BartBlock", "BartStack"]


class BartBlock(nn.Module):
    """Post-LN residual branches: self-attention, cross-attention (decoder only), MLP.

    x = ln_attn(x + drop(attn(x)))
    x = ln_cross(x + drop(cross_attn(x, memory)))      decoder only
    x = ln_mlp(x + mlp(x))                              the MLP drops its own output
    """

    def __init__(self, cfg: ModelConfig, *, cross_attention: bool):
        super().__init__()
        d, h, k, eps = cfg.d_model, cfg.n_head, cfg.head_dim, cfg.layer_norm_eps

        def attention() -> T5Attention:
            return T5Attention(d, h, k, dropout=cfg.dropout, bias=cfg.bias, scaled=True)

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
        x_BTD = self.ln_attn(x_BTD + self.drop(self.attn(x_BTD, bias_BHTL=self_mask)))
        if self.cross_attention:
            c_BTD = self.cross_attn(x_BTD, kv_BLD=memory_BSD, bias_BHTL=memory_mask)
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


class Bart(EncoderDecoder):
    """Shared token embedding, encoder stack, decoder stack, output projection (tied to the
    embedding when `cfg.tie_embeddings`, as BART's); `EncoderDecoder` holds the forward
    pass."""

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

    def head(self, y_BTD: torch.Tensor) -> torch.Tensor:
        return self.lm_head(y_BTD)
