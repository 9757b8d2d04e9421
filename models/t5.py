"""T5 encoder-decoder (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a
Unified Text-to-Text Transformer"), versions 1.0 and 1.1.

Both versions: pre-norm blocks with an RMS norm (scale only, no mean subtraction, no bias),
no biases in any linear layer, a learned relative position bias per head (bidirectional
buckets in the encoder, causal buckets in the decoder) that is computed once per stack and
added to the scores of every self-attention layer of that stack, and no 1/sqrt(d_kv)
scaling of the scores (T5 folds it into the initialisation of the query projection).
Head size d_kv is independent of d_model: T5-3B and T5-11B have n_head * d_kv > d_model.

    v1.0  activation=relu, tie_embeddings=true, scale_logits=true (the decoder output is
          multiplied by d_model**-0.5 before the projection tied to the embedding).
    v1.1  activation=gated_gelu (tanh GELU), tie_embeddings=false, scale_logits=false.

Module paths follow Loom's naming (`encoder.blocks.3.attn.q`); `models/hf/t5.py` maps them
to and from Hugging Face's T5 names.

Shape legend (suffixes of tensor names):
    B  batch size
    S  encoder (input) sequence length
    T  decoder (target) sequence length; inside `T5Attention`, the query length
    L  key/value length inside `T5Attention` (equals T in self-attention, S in cross-attention)
    D  model width, d_model
    H  attention heads
    K  head size, d_kv
    F  MLP inner size, ffn_size
    V  embedding rows (the padded vocabulary)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.blocks import head_outputs
from models.config import ModelConfig
from models.moe import MoE

__all__ = [
    "EncoderDecoder",
    "RMSNorm",
    "RelativePositionBias",
    "T5",
    "T5Attention",
    "T5Block",
    "T5MLP",
    "T5Stack",
    "compute_dtype",
    "masked_bias",
    "relative_position_bucket",
]

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    # T5 v1.1 gates with the tanh approximation (Mesh TensorFlow's gelu, HF's "gelu_new").
    "gated_gelu": lambda: nn.GELU(approximate="tanh"),
}


class RMSNorm(nn.Module):
    """T5's layer norm: x / rms(x) * weight, without mean subtraction or bias.

    The mean of squares is taken in fp32 so half-precision activations do not lose it.
    """

    def __init__(self, d_model: int, *, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d_model))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        var_BT1 = x_BTD.float().pow(2).mean(dim=-1, keepdim=True)
        y_BTD = (x_BTD.float() * torch.rsqrt(var_BT1 + self.eps)).to(x_BTD.dtype)
        return self.weight * y_BTD


def relative_position_bucket(
    relative_position: torch.Tensor,
    *,
    bidirectional: bool,
    num_buckets: int = 32,
    max_distance: int = 128,
) -> torch.Tensor:
    """Bucket index in [0, num_buckets) of each offset `key_position - query_position`.

    Bidirectional (encoder): half of the buckets hold keys after the query, half keys before.
    Causal (decoder): only offsets <= 0 are distinguished; every later key shares bucket 0
    (the causal mask hides them anyway). Within one side, distances below half the side's
    buckets get a bucket each; longer ones share logarithmically wider buckets up to
    `max_distance`, beyond which everything falls into the last bucket.
    """
    n = num_buckets
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        n //= 2
        bucket = bucket + (relative_position > 0).long() * n
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    exact = n // 2
    # Clamping to 1 only avoids log(0) for entries that take the exact branch below.
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = exact + (log_ratio * (n - exact)).long()
    far = far.clamp(max=n - 1)
    return bucket + torch.where(distance < exact, distance, far)


class RelativePositionBias(nn.Module):
    """A learned scalar per (bucket, head), added to the attention scores."""

    def __init__(
        self, n_head: int, *, bidirectional: bool, num_buckets: int = 32, max_distance: int = 128
    ):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.table = nn.Embedding(num_buckets, n_head)

    def forward(self, t: int, l: int, *, device: torch.device | None = None) -> torch.Tensor:
        """Bias (1, H, T, L) for T queries at positions 0..T-1 and L keys at 0..L-1."""
        q_T1 = torch.arange(t, device=device)[:, None]
        k_1L = torch.arange(l, device=device)[None, :]
        bucket_TL = relative_position_bucket(
            k_1L - q_T1,
            bidirectional=self.bidirectional,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.table(bucket_TL).permute(2, 0, 1).unsqueeze(0)


class T5Attention(nn.Module):
    """Multi-head attention with separate q, k, v, o projections and unscaled scores.

    Self-attention when `kv_BLD` is None, cross-attention over `kv_BLD` otherwise. The whole
    additive bias (relative positions and masks) arrives precomputed in `bias_BHTL`, so every
    layer of a stack reuses one tensor. BART (models/bart.py) uses it with biases in the
    projections and scores scaled by 1/sqrt(d_kv) (`bias`, `scaled`).
    """

    def __init__(
        self,
        d_model: int,
        n_head: int,
        d_kv: int,
        *,
        dropout: float = 0.0,
        bias: bool = False,
        scaled: bool = False,
    ):
        super().__init__()
        self.n_head, self.d_kv, self.dropout = n_head, d_kv, dropout
        self.scale = None if scaled else 1.0  # None: SDPA's 1/sqrt(d_kv)
        inner = n_head * d_kv
        self.q = nn.Linear(d_model, inner, bias=bias)
        self.k = nn.Linear(d_model, inner, bias=bias)
        self.v = nn.Linear(d_model, inner, bias=bias)
        self.o = nn.Linear(inner, d_model, bias=bias)

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        kv_BLD: torch.Tensor | None = None,
        bias_BHTL: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kv_BLD = x_BTD if kv_BLD is None else kv_BLD
        b, t, _ = x_BTD.shape
        l = kv_BLD.shape[1]
        # -1 heads: a column-sharded (tensor-parallel) projection holds only its local heads.
        q_BHTK = self.q(x_BTD).view(b, t, -1, self.d_kv).transpose(1, 2)
        k_BHLK = self.k(kv_BLD).view(b, l, -1, self.d_kv).transpose(1, 2)
        v_BHLK = self.v(kv_BLD).view(b, l, -1, self.d_kv).transpose(1, 2)
        if bias_BHTL is not None:
            bias_BHTL = bias_BHTL.to(q_BHTK.dtype)
        y_BHTK = F.scaled_dot_product_attention(
            q_BHTK,
            k_BHLK,
            v_BHLK,
            attn_mask=bias_BHTL,
            dropout_p=self.dropout if self.training else 0.0,
            scale=self.scale,
        )
        return self.o(y_BHTK.transpose(1, 2).reshape(b, t, -1))


class T5MLP(nn.Module):
    """wo(drop(act(wi(x)))), or with a gate (v1.1): wo(drop(act(wi_0(x)) * wi_1(x)))."""

    def __init__(
        self, d_model: int, ffn_size: int, *, activation: str = "relu", dropout: float = 0.0
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"model.activation={activation!r} is not supported by T5; "
                f"choose one of {sorted(_ACTIVATIONS)}"
            )
        self.gated = activation.startswith("gated_")
        if self.gated:
            self.wi_0 = nn.Linear(d_model, ffn_size, bias=False)
            self.wi_1 = nn.Linear(d_model, ffn_size, bias=False)
        else:
            self.wi = nn.Linear(d_model, ffn_size, bias=False)
        self.act = _ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout)
        self.wo = nn.Linear(ffn_size, d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.gated:
            h_BTF = self.act(self.wi_0(x_BTD)) * self.wi_1(x_BTD)
        else:
            h_BTF = self.act(self.wi(x_BTD))
        return self.wo(self.drop(h_BTF))


class T5Block(nn.Module):
    """Pre-norm residual branches: self-attention, cross-attention (decoder only), MLP."""

    def __init__(self, cfg: ModelConfig, *, cross_attention: bool, moe_layers: int = 0):
        """`moe_layers` > 0: the MLP is an MoE layer, one of that many in the model."""
        super().__init__()
        d, eps = cfg.d_model, cfg.layer_norm_eps
        self.ln_attn = RMSNorm(d, eps=eps)
        self.attn = T5Attention(d, cfg.n_head, cfg.head_dim, dropout=cfg.dropout)
        self.cross_attention = cross_attention
        if cross_attention:
            self.ln_cross = RMSNorm(d, eps=eps)
            self.cross_attn = T5Attention(d, cfg.n_head, cfg.head_dim, dropout=cfg.dropout)
        self.ln_mlp = RMSNorm(d, eps=eps)
        if moe_layers:  # the block drops the branch itself, so the MoE adds no dropout
            self.mlp = MoE(
                cfg.moe,
                d_model=d,
                ffn_size=cfg.ffn_size,
                activation=cfg.activation,
                bias=False,
                aux_loss_layers=moe_layers,
            )
        else:
            self.mlp = T5MLP(d, cfg.ffn_size, activation=cfg.activation, dropout=cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        self_bias_BHTT: torch.Tensor,
        memory_BSD: torch.Tensor | None = None,
        cross_bias_BHTS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x_BTD = x_BTD + self.drop(self.attn(self.ln_attn(x_BTD), bias_BHTL=self_bias_BHTT))
        if self.cross_attention:
            c_BTD = self.cross_attn(
                self.ln_cross(x_BTD), kv_BLD=memory_BSD, bias_BHTL=cross_bias_BHTS
            )
            x_BTD = x_BTD + self.drop(c_BTD)
        return x_BTD + self.drop(self.mlp(self.ln_mlp(x_BTD)))


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention scores will have: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def masked_bias(
    bias: torch.Tensor, allowed: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """`bias` in `dtype` with the most negative finite value where `allowed` is False.

    A finite fill (not -inf) keeps a row with no allowed key from turning into NaN, and
    `masked_fill` (rather than adding) cannot overflow to -inf in fp16.
    """
    bias = bias.to(dtype)
    if allowed is None:
        return bias
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)


class T5Stack(nn.Module):
    """The encoder (bidirectional) or the decoder (causal, with cross-attention) of T5.

    The relative position bias lives here rather than in the first layer (as in the T5
    release); it is computed once per forward and shared by every layer, exactly as there.
    """

    def __init__(self, cfg: ModelConfig, *, n_layer: int, is_decoder: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.relative_bias = RelativePositionBias(
            cfg.n_head,
            bidirectional=not is_decoder,
            num_buckets=cfg.relative_buckets,
            max_distance=cfg.relative_max_distance,
        )
        # Keyed by layer index so names stay stable when a pipeline stage drops blocks.
        moe_ids = cfg.moe.layer_ids(n_layer)
        # Encoder and decoder each put experts in the same blocks: all of them count.
        n_moe = len(cfg.moe.layer_ids(cfg.n_layer)) + len(
            cfg.moe.layer_ids(cfg.n_decoder_layer or cfg.n_layer)
        )
        self.blocks = nn.ModuleDict(
            {
                str(i): T5Block(
                    cfg, cross_attention=is_decoder, moe_layers=n_moe if i in moe_ids else 0
                )
                for i in range(n_layer)
            }
        )
        self.ln_f = RMSNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x_BTD: torch.Tensor,
        *,
        key_mask_BT: torch.Tensor | None = None,
        memory_BSD: torch.Tensor | None = None,
        memory_mask_BS: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the (already embedded and dropped-out) `x_BTD` through every block.

        `key_mask_BT` / `memory_mask_BS`: bool, True = real token; padded keys get no weight.
        """
        t, device, dtype = x_BTD.shape[1], x_BTD.device, compute_dtype(x_BTD)
        allowed_B1TT = None if key_mask_BT is None else key_mask_BT[:, None, None, :]
        if self.is_decoder:
            causal_TT = torch.ones(t, t, dtype=torch.bool, device=device).tril()
            allowed_B1TT = causal_TT if allowed_B1TT is None else allowed_B1TT & causal_TT
        self_bias = masked_bias(self.relative_bias(t, t, device=device), allowed_B1TT, dtype)
        cross_bias = None
        if self.is_decoder and memory_mask_BS is not None:
            zeros_B11S = torch.zeros(memory_mask_BS.shape, device=device)[:, None, None, :]
            cross_bias = masked_bias(zeros_B11S, memory_mask_BS[:, None, None, :], dtype)
        for block in self.blocks.values():
            x_BTD = block(
                x_BTD, self_bias_BHTT=self_bias, memory_BSD=memory_BSD, cross_bias_BHTS=cross_bias
            )
        return self.drop(self.ln_f(x_BTD))


def _check_mask(name: str, mask: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.shape != ids.shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected {tuple(ids.shape)}")
    return mask.bool()


class EncoderDecoder(nn.Module):
    """What T5 and BART (models/bart.py) share: a token table `shared` that both stacks
    read, tied to the output projection `lm_head` when cfg.tie_embeddings, and the forward
    pass. A subclass defines `encode`, `decode` and `head`; they are separate so callers
    (generation, scoring) can run one part. The forward pass returns logits; the loss
    belongs to the trainer.
    """

    cfg: ModelConfig
    pipeline_refusal = (
        "every decoder stage needs the encoder output and the decoder's cross-attention masks"
    )
    # Tokens per slice of the chunked loss (forward with `labels`); 0: the whole sequence.
    loss_chunk_tokens = 0

    def tie_weights(self) -> None:
        """Share `shared.weight` with `lm_head.weight` when configured; idempotent.

        Anything that replaces parameters (`to_empty`, a tensor-parallel plan) breaks the
        sharing, so it must call this again afterwards.
        """
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.shared.weight

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True):
        super().to_empty(device=device, recurse=recurse)
        self.tie_weights()
        return self

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
        return head_outputs(self.head, y_BTD, labels, chunk_tokens=self.loss_chunk_tokens)


class T5(EncoderDecoder):
    """Shared token embedding, encoder stack, decoder stack, output projection."""

    def __init__(self, cfg: ModelConfig, *, vocab_size: int):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.shared = nn.Embedding(vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = T5Stack(cfg, n_layer=cfg.n_layer, is_decoder=False)
        n_dec = cfg.n_decoder_layer if cfg.n_decoder_layer is not None else cfg.n_layer
        self.decoder = T5Stack(cfg, n_layer=n_dec, is_decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.tie_weights()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """T5's (Mesh TensorFlow's) initialisation, with init_std as its initializer factor.

        Token embedding N(0, init_std) (T5: 1.0); every matrix N(0, init_std / sqrt(fan_in)),
        except the query projection, which also takes the 1/sqrt(d_kv) that T5 leaves out of
        the scores. An untied lm_head is scaled by fan-in as well (Hugging Face draws it with
        std init_std, which makes the first logits sqrt(d_model) times too large). A no-op on
        the meta device, so call it again after `to_empty`.
        """
        std, d, inner = self.cfg.init_std, self.cfg.d_model, self.cfg.n_head * self.cfg.head_dim
        nn.init.normal_(self.shared.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, std=std * d**-0.5)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, RelativePositionBias):
                nn.init.normal_(module.table.weight, std=std * d**-0.5)
            elif isinstance(module, T5Attention):
                nn.init.normal_(module.q.weight, std=std * (d * module.d_kv) ** -0.5)
                nn.init.normal_(module.k.weight, std=std * d**-0.5)
                nn.init.normal_(module.v.weight, std=std * d**-0.5)
                nn.init.normal_(module.o.weight, std=std * inner**-0.5)
            elif isinstance(module, MoE):
                module.reset_parameters()
            elif isinstance(module, T5MLP):
                for name in ("wi_0", "wi_1") if module.gated else ("wi",):
                    nn.init.normal_(getattr(module, name).weight, std=std * d**-0.5)
                nn.init.normal_(module.wo.weight, std=std * self.cfg.ffn_size**-0.5)

    def encode(
        self, input_ids_BS: torch.Tensor, *, attention_mask_BS: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Encoder output (B, S, D)."""
        x_BSD = self.drop(self.shared(input_ids_BS))
        return self.encoder(x_BSD, key_mask_BT=attention_mask_BS)

    def decode(
        self,
        decoder_input_ids_BT: torch.Tensor,
        *,
        memory_BSD: torch.Tensor,
        attention_mask_BS: torch.Tensor | None = None,
        decoder_attention_mask_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decoder output (B, T, D), before the final projection."""
        y_BTD = self.drop(self.shared(decoder_input_ids_BT))
        return self.decoder(
            y_BTD,
            key_mask_BT=decoder_attention_mask_BT,
            memory_BSD=memory_BSD,
            memory_mask_BS=attention_mask_BS,
        )

    def head(self, y_BTD: torch.Tensor) -> torch.Tensor:
        if self.cfg.scale_logits:
            # The tied embedding is drawn with std ~1, far larger than an output projection
            # wants; T5 v1.0 rescales the decoder output instead (Mesh TensorFlow).
            y_BTD = y_BTD * self.cfg.d_model**-0.5
        return self.lm_head(y_BTD)
