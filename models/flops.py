"""Analytic training FLOPs per token, and dense peak FLOP/s of known accelerators, for MFU.

Training FLOPs per token
------------------------
    flops_per_token = 6 * N_matmul + 12 * n_layer * d_model * seq_len

* `6 * N_matmul`: each weight of a matmul costs 2 FLOPs (multiply + add) per token in the
  forward pass and 4 in the backward pass (gradients with respect to the input and to the
  weight), the "C = 6N" rule of Kaplan et al. 2020, "Scaling Laws for Neural Language
  Models", section 2.1. N_matmul counts only weights that enter a matmul:
  per layer 4 * d_model**2 (qkv and output projections) + 2 * d_model * ffn_size (MLP),
  plus vocab_size * d_model for the output projection, which is a real matmul even when
  its weight is tied to the token embedding. Embedding lookups, biases, LayerNorms,
  activations and softmax are left out: they are memory-bound and a small fraction.
* `12 * n_layer * d_model * seq_len`: the two attention matmuls (Q K^T and the
  probabilities times V) cost 2 * 2 * seq_len * d_model FLOPs per token and layer in the
  forward pass, times 3 for forward + backward. This is the term of PaLM (Chowdhery et al.
  2022, appendix B) and of Megatron-LM's MFU accounting (Narayanan et al. 2021, "Efficient
  Large-Scale Language Model Training on GPU Clusters", section 5.1). As in both, the half
  of the score matrix hidden by the causal mask is *not* subtracted, so MFU figures compare
  directly with theirs.

These terms are the GPT ones. Variants change only the weight count: a gated MLP
(activation=gated_gelu) has three d_model x ffn_size matrices instead of two, and an explicit
head size (d_kv) makes the attention width, in the projections and in the score term,
n_head * head_dim rather than d_model. Rotary position embeddings add no matmul (their
elementwise rotation is left out like the activations). NEZHA's relative sinusoids
(position=relative_sinusoidal) add two matmuls per layer against a constant table of
P = 2 min(k, seq_len - 1) + 1 rows: the queries times the table (T x K by K x P) and the
probabilities summed by distance times the table (T x P by P x K). The table needs no
gradient, so each costs 2 * P * n_head * head_dim FLOPs per token forward and as much
backward (the input gradient only): 8 * n_layer * n_head * head_dim * P per token, a sixth
of the score term at seq_len 512 and k = 64 (8 x 129 against 12 x 512), 1.4% of
NEZHA-base's total. Their gather and scatter-add move memory and are left out like the
softmax. GLM counts as a GPT of its shape (both position tables are lookups); BERT, ELECTRA
(two networks, `electra_flops`) and T5 have their own counts below, each in the same
convention; BART counts as a T5 of its shape (the same matmuls); XLNet has its own count
(`xlnet_flops`: two streams, the relative position projection and the segment memory).
Every family's arithmetic lives in this module.

Mixture-of-experts layers count their active parameters: a token meets top_k experts and
the router (d_model x E), so FLOPs, and MFU from them, grow with top_k, not with E.

Activation recomputation is not counted: MFU measures useful model FLOPs, not hardware
FLOPs (PaLM, appendix B).

Peak FLOP/s
-----------
`known_peak_flops` returns dense (no structured sparsity) figures from the vendors' data
sheets: tensor-core rates with fp32 accumulation for bf16/fp16, and the plain (non-tensor)
fp32 rate for fp32. PyTorch leaves TF32 matmuls off by default
(`torch.backends.cuda.matmul.allow_tf32 = False`), so fp32 training runs at the plain fp32
rate; ask for "tf32" explicitly when TF32 is enabled.
"""

from __future__ import annotations

import re

from models.config import ModelConfig

__all__ = [
    "FAMILY_FLOPS",
    "bert_flops",
    "electra_flops",
    "flops_per_token",
    "gpt_flops",
    "known_peak_flops",
    "matmul_params",
    "t5_flops",
    "t5_matmul_params",
    "xlnet_flops",
]

# Dense peaks in TFLOP/s: (name pattern, bf16, fp16, tf32, fp32); None where the data sheet
# gives no such rate. Patterns match whole words of the lower-cased device name with "-" and
# "_" read as spaces (torch.cuda.get_device_name spellings such as "NVIDIA H100 80GB HBM3",
# "NVIDIA A100-SXM4-80GB", "Tesla V100-PCIE-32GB"); the first match wins, so the more
# specific variants come first.
_PEAK_TFLOPS: tuple[tuple[str, float | None, float | None, float | None, float | None], ...] = (
    # pattern     bf16    fp16    tf32   fp32
    ("h100 nvl", 835.5, 835.5, 417.5, 60.0),
    ("h100 pcie", 756.0, 756.0, 378.0, 51.0),
    # "NVIDIA H100 80GB HBM3" is the SXM part, which is also what a bare "H100" usually is.
    ("h100", 989.5, 989.5, 494.7, 67.0),
    ("h200 nvl", 835.5, 835.5, 417.5, 60.0),
    ("h200", 989.5, 989.5, 494.7, 67.0),
    ("gh200", 989.5, 989.5, 494.7, 67.0),
    ("b200", 2250.0, 2250.0, 1100.0, None),
    # A100 PCIe and SXM, 40 and 80 GB, share the same peaks.
    ("a100", 312.0, 312.0, 156.0, 19.5),
    # NVIDIA publishes no A10G data sheet; the A10 figures are the usual stand-in.
    ("a10g", 125.0, 125.0, 62.5, 31.2),
    ("a10", 125.0, 125.0, 62.5, 31.2),
    ("a40", 149.7, 149.7, 74.8, 37.4),
    ("rtx a6000", 154.8, 154.8, 77.4, 38.7),
    ("l40s", 362.0, 362.0, 183.0, 91.6),
    ("l40", 181.0, 181.0, 90.5, 90.5),
    ("l4", 121.0, 121.0, 60.0, 30.3),
    # Volta has fp16 tensor cores but no bf16 support.
    ("v100s", None, 130.0, None, 16.4),
    ("v100 pcie", None, 112.0, None, 14.0),
    ("v100", None, 125.0, None, 15.7),
    ("t4", None, 65.0, None, 8.1),
    # GeForce cards run fp16/bf16 tensor cores at half rate when accumulating in fp32.
    ("rtx 4090", 165.2, 165.2, 82.6, 82.6),
    ("rtx 3090", 71.0, 71.0, 35.6, 35.6),
    ("mi300x", 1307.4, 1307.4, 653.7, 163.4),
)
_PEAK_COLUMNS = ("bf16", "fp16", "tf32", "fp32")

_DTYPE_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "tf32": "tf32",
}


def matmul_params(cfg: ModelConfig, *, vocab_size: int) -> int:
    """Weights that enter a matmul per token in a GPT: the blocks' projections and the head."""
    attn_width = cfg.n_head * cfg.head_dim
    attention = cfg.n_layer * 4 * cfg.d_model * attn_width
    return attention + _mlp_params(cfg, cfg.n_layer) + vocab_size * cfg.d_model


def _mlp_matrices(cfg: ModelConfig) -> int:
    return 3 if cfg.activation.startswith("gated_") else 2


def _mlp_params(cfg: ModelConfig, n_layer: int) -> int:
    """MLP weights a token meets in a stack of n_layer blocks: a dense MLP's, or in an MoE
    layer its top_k experts' (the active parameters) and the router's."""
    mlp = _mlp_matrices(cfg) * cfg.d_model * cfg.ffn_size
    moe = len(cfg.moe.layer_ids(n_layer))
    routed = cfg.moe.top_k * mlp + cfg.d_model * cfg.moe.num_experts
    return (n_layer - moe) * mlp + moe * routed


def _attention(cfg: ModelConfig, *, n_layer: int, keys: float) -> float:
    """FLOPs per token of the two attention matmuls over `keys` keys in `n_layer` layers."""
    return 12 * n_layer * cfg.n_head * cfg.head_dim * keys


def gpt_flops(cfg: ModelConfig, *, vocab_size: int, seq_len: int) -> float:
    """GPT, and GLM (whose `seq_len` is the whole row |A| + |B|: every row token is computed
    though only Part B is scored, and the bidirectional Part A makes none of the score
    matrix skippable)."""
    return float(
        6 * matmul_params(cfg, vocab_size=vocab_size)
        + _attention(cfg, n_layer=cfg.n_layer, keys=seq_len)
    )


def bert_flops(cfg: ModelConfig, *, vocab_size: int, seq_len: int) -> float:
    """BERT and ALBERT. N_matmul per token: every applied layer's projections (a shared
    ALBERT block counts n_layer times: it runs n_layer times), the E -> D embedding
    projection when E != D, the MLM head's transform (D x E) and decoder (V x E) over all
    positions, and the pooler and NSP classifier (when built: not for RoBERTa), which run on
    one position per sequence, so their weights count 1 / seq_len per token. SpanBERT's span
    boundary head runs on its K target slots per row, so its weights (two dense layers and
    the decoder again) count K / seq_len per token. NEZHA's relative
    sinusoids add their two table matmuls (module docstring)."""
    d, e = cfg.d_model, cfg.embedding_size if cfg.embedding_size is not None else cfg.d_model
    n_matmul = _encoder_params(cfg) + d * e + vocab_size * e
    if cfg.has_pair_head:
        n_matmul += (d * d + cfg.pair_classes * d) / seq_len
    if cfg.sbo_max_targets:
        n_matmul += _sbo_share(seq_len) * _sbo_params(cfg, d=d, e=e, vocab_size=vocab_size)
    scores = _attention(cfg, n_layer=cfg.n_layer, keys=seq_len)
    return float(6 * n_matmul + scores + _relative_sinusoids(cfg, seq_len=seq_len))


def _encoder_params(cfg: ModelConfig) -> int:
    """Matmul weights of a BERT-style encoder per token: the blocks' projections and the
    E -> D embedding projection when E != D."""
    d, e = cfg.d_model, cfg.embedding_size if cfg.embedding_size is not None else cfg.d_model
    attention = cfg.n_layer * 4 * d * cfg.n_head * cfg.head_dim
    return attention + _mlp_params(cfg, cfg.n_layer) + (e * d if e != d else 0)


def electra_flops(
    cfg: ModelConfig, *, vocab_size: int, seq_len: int, mask_prob: float = 0.15
) -> float:
    """ELECTRA: both networks, each forward and backward (the generator learns from its MLM
    loss, the discriminator from RTD, and both reach the shared embeddings). N_matmul per
    token: the discriminator's encoder (with its E -> D projection when E != D) and RTD head
    (D x D, then D x 1) on every position; the generator's encoder (width G, with its E -> G
    projection when E != G) and its MLM head (G x E transform, V x E decoder) on the masked
    positions only, K = max(1, round(mask_prob (T - 2))) of a single-segment row of T
    tokens (the electra objective's budget), so it counts K / T per token. Scores: both
    stacks' attention over seq_len keys. Sampling (softmax, cumulative sums) is left out
    like every softmax."""
    gen = cfg.generator_config()
    e = gen.embedding_size
    masked = max(1, round(mask_prob * (seq_len - 2))) / seq_len
    discriminator = _encoder_params(cfg) + cfg.d_model * cfg.d_model + cfg.d_model
    generator = _encoder_params(gen) + masked * (gen.d_model * e + vocab_size * e)
    scores = sum(_attention(c, n_layer=c.n_layer, keys=seq_len) for c in (cfg, gen))
    return float(6 * (discriminator + generator) + scores)


def _sbo_share(seq_len: int) -> float:
    """Share of a row's tokens that SpanBERT's span boundary head runs on: its K target
    slots per row at the default mask_prob 0.15 (data_pipeline.objectives.sbo.sbo_slots)."""
    return max(1, round(0.15 * (seq_len - 2))) / seq_len


def _sbo_params(cfg: ModelConfig, *, d: int, e: int, vocab_size: int) -> int:
    """Matmul weights of the span boundary head: W1 ((2D + P) x D), W2 (D x E), decoder."""
    return (2 * d + cfg.sbo_position_size) * d + d * e + vocab_size * e


def _relative_sinusoids(cfg: ModelConfig, *, seq_len: int) -> int:
    """FLOPs per token of NEZHA's two matmuls against the fixed table (module docstring)."""
    if cfg.position != "relative_sinusoidal":
        return 0
    rows = 2 * min(cfg.max_relative_position, seq_len - 1) + 1
    return 8 * cfg.n_layer * cfg.n_head * cfg.head_dim * rows


def t5_matmul_params(cfg: ModelConfig, *, vocab_size: int) -> tuple[int, int, int]:
    """T5's matmul weights by the tokens they see: (per encoder token, per decoder token,
    head). The cross-attention k and v projections read the encoder output, so they count
    per encoder token although they live in the decoder."""
    d, inner = cfg.d_model, cfg.n_head * cfg.head_dim
    n_dec = _decoder_layers(cfg)
    per_encoder_token = cfg.n_layer * 4 * d * inner + _mlp_params(cfg, cfg.n_layer)
    per_encoder_token += n_dec * 2 * d * inner
    per_decoder_token = n_dec * (4 * d * inner + 2 * d * inner) + _mlp_params(cfg, n_dec)
    return per_encoder_token, per_decoder_token, vocab_size * d


def _decoder_layers(cfg: ModelConfig) -> int:
    return cfg.n_decoder_layer if cfg.n_decoder_layer is not None else cfg.n_layer


def t5_flops(cfg: ModelConfig, *, vocab_size: int, seq_len: int, target_len: int) -> float:
    """T5, per *encoder input token*: a sample counts as its `seq_len` encoder tokens (what
    the trainer's tokens/s counts), and the decoder's work on its `target_len` targets is
    spread over them with r = target_len / seq_len. With N_enc, N_dec and N_out from
    `t5_matmul_params` and HK = n_head * d_kv:

        6 * (N_enc + r * (N_dec + N_out)) + 12 * HK * (n_layer * S + r * n_dec_layer * (T + S))

    where S = seq_len and T = target_len: encoder self-attention spans S keys, decoder
    self-attention T keys and cross-attention S keys."""
    r = target_len / seq_len
    n_enc, n_dec, n_out = t5_matmul_params(cfg, vocab_size=vocab_size)
    attention = _attention(cfg, n_layer=cfg.n_layer, keys=seq_len) + r * _attention(
        cfg, n_layer=_decoder_layers(cfg), keys=target_len + seq_len
    )
    return float(6 * (n_enc + r * (n_dec + n_out)) + attention)


def xlnet_flops(cfg: ModelConfig, *, vocab_size: int, seq_len: int, num_predict: int = 0) -> float:
    """XLNet and Transformer-XL (models/xlnet.py), per token of the segment, with
    T = seq_len, M = cfg.mem_len (memory counted full, as in a run that carries it from step
    to step), L = M + T keys, P = num_predict positions of the query stream (0: one causal
    content stream, the clm objective), HK = n_head * head_dim and F the MLP's weights:

    * the content stream's k and v on every layer: 6 x 2 D HK; its q, o and MLP,
      6 (2 D HK + F), on every layer but the last when P > 0 (whose content output feeds
      nothing, so it is not computed);
    * the query stream's q, o and MLP on P of the T positions: 6 (P / T) (2 D HK + F) per
      layer, and the head on those only: 6 (P / T) V D (6 V D on every position when P = 0);
    * the memory's k and v, M / T rows per token at 4 FLOPs per weight (forward and weight
      gradient; the memory takes no gradient): 4 (M / T) 2 D HK per layer;
    * per query (T per layer, plus P per layer for the query stream, less T in the last
      layer when P > 0): 12 HK L for the two attention matmuls and 6 HK R for the position
      scores, q times the R projected encodings (forward and both gradients), R = L + T - 1
      distances (R = L when causal).

    Left out: the projection of the R encodings, which runs once per micro-batch of B rows
    (all rows share it) and costs 4 R D HK per layer (no input gradient: the table is
    constant), 4 (R / (B T)) D HK per token: about 1% of xlnet_base's and xlnet_large's
    totals at B = 8 and seq_len 512 with 85 predictions (8% at B = 1); the segment term (2
    rows per query) and the gather of the position scores, like the softmax.
    """
    t, m, p, n = seq_len, cfg.mem_len, num_predict, cfg.n_layer
    d, hk = cfg.d_model, cfg.n_head * cfg.head_dim
    keys = m + t
    rows = keys if p == 0 else keys + t - 1
    stream = 2 * d * hk + _mlp_params(cfg, 1)
    content_layers = n - 1 if p else n
    n_matmul = n * 2 * d * hk + content_layers * stream + n * (p / t) * stream
    n_matmul += vocab_size * d * (p / t if p else 1)
    memory = 4 * n * (m / t) * 2 * d * hk
    queries = content_layers + n * p / t
    return float(6 * n_matmul + memory + queries * hk * (12 * keys + 6 * rows))


def flops_per_token(
    cfg: ModelConfig,
    *,
    vocab_size: int,
    seq_len: int,
    target_len: int | None = None,
    mask_prob: float = 0.15,
) -> float:
    """Training (forward + backward) FLOPs per token of the family's model; see the module
    docstring.

    `vocab_size` is the number of output rows actually computed (the padded vocabulary);
    `seq_len` is the attention context length of the training sequences; `target_len` is
    the decoder length of an encoder-decoder sample (T5: the objective's target length,
    which depends on its noise settings), and for XLNet the positions its query stream
    predicts per row (the plm objective's; None: none, the clm objective), unused by the
    other families; `mask_prob` is the share of tokens masked (ELECTRA's generator head runs
    on those only).
    """
    if cfg.family == "electra":
        return electra_flops(cfg, vocab_size=vocab_size, seq_len=seq_len, mask_prob=mask_prob)
    if cfg.family in ("t5", "bart"):  # the same matmuls; biases and norms are not counted
        if target_len is None:
            raise ValueError(
                f"model.family={cfg.family!r} counts FLOPs per sample: give its target_len"
            )
        return t5_flops(cfg, vocab_size=vocab_size, seq_len=seq_len, target_len=target_len)
    if cfg.family == "xlnet":
        return xlnet_flops(cfg, vocab_size=vocab_size, seq_len=seq_len, num_predict=target_len or 0)
    count = FAMILY_FLOPS.get(cfg.family)
    if count is None:
        raise ValueError(f"model.family={cfg.family!r} has no FLOP count in models/flops.py")
    return count(cfg, vocab_size=vocab_size, seq_len=seq_len)


# Families whose FLOPs depend only on (cfg, vocab_size, seq_len).
FAMILY_FLOPS = {"gpt": gpt_flops, "glm": gpt_flops, "bert": bert_flops}


def _normalise_dtype(dtype: str) -> str:
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_ALIASES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32, tf32")
    return _DTYPE_ALIASES[key]


def known_peak_flops(device_name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of one device at `dtype` (bf16, fp16, fp32 or tf32), or None.

    None means the device (a CPU, an unlisted GPU) or the dtype on that device is unknown,
    in which case MFU should not be reported. An unrecognised dtype name raises ValueError.
    """
    key = _normalise_dtype(dtype)
    name = re.sub(r"[-_]", " ", device_name.lower())
    for pattern, *tflops in _PEAK_TFLOPS:
        if re.search(rf"(?<![a-z0-9]){re.escape(pattern)}(?![a-z0-9])", name):
            peak = tflops[_PEAK_COLUMNS.index(key)]
            return None if peak is None else peak * 1e12
    return None
