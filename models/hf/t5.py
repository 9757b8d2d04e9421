"""Hugging Face interop for `models.t5.T5`: configs and state-dict name mapping.

`to_hf` / `from_hf` rename parameters between Loom's layout (`encoder.blocks.3.attn.q`) and
`transformers.T5ForConditionalGeneration`'s (`encoder.block.3.layer.0.SelfAttention.q`);
tensors are shared, not copied (vocabulary rows aside, see below). Both sides use separate
q, k, v, o projections without biases, so no tensor is reshaped.

Loom keeps one relative position table per stack (`encoder.relative_bias.table`); Hugging
Face keeps it in the first block's self-attention. Hugging Face also stores the shared
embedding three times (`shared`, `encoder.embed_tokens`, `decoder.embed_tokens`).

Vocabulary rows: the HF model gets `cfg.vocab_size` rows when that is set, else every row of
the checkpoint (padding included). `to_hf` drops the padded rows beyond it; `from_hf` pads
back to `cfg.padded_vocab_size(rows)` with zero rows.

Tied and untied output heads: transformers 5 always ties `lm_head` to the embedding and reads
`tie_word_embeddings=False` only as "do not rescale the decoder output" (T5 v1.1). A v1.1
model therefore needs its head untied after construction; `build_hf_model` does that. (With
transformers 5.23, `save_pretrained` then `from_pretrained` keeps the separate head, since the
checkpoint stores both tensors.)

Tokens (`TOKENS`): span corruption ends the encoder input and the targets with <eos> and starts
the decoder with <pad>, so an exported tokenizer appends <eos> to a text, and the HF config's
pad_token_id, eos_token_id and decoder_start_token_id are the tokenizer's <pad>, <eos> and
<pad> when `hf_config` is given the token ids. The sentinels are Loom's <extra_id_N>.

Configs Hugging Face T5 cannot express raise ConfigError naming the field.

Mixture of experts: a config with `model.moe.num_experts` > 0 converts to
`transformers.SwitchTransformersForConditionalGeneration` through `models.hf.switch` (the
registry in `models.hf` picks it), which builds on the layout helpers below
(`attention_pairs`, `stack_pairs`, `embeddings_to_hf`, `embeddings_from_hf`).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from common.errors import ConfigError
from models.config import ModelConfig
from models.hf.common import (
    TokenConventions,
    check_hf_rows,
    check_vocab_size,
    hf_rows,
    known_value,
    pad_rows,
    reject_leftovers,
    take,
)

__all__ = ["TOKENS", "build_hf_model", "from_hf", "hf_config", "loom_config", "to_hf"]

# Loom activation -> T5Config.feed_forward_proj ("gated-gelu" is the tanh GELU in HF).
_FEED_FORWARD = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_tanh": "gelu_new",
    "gated_gelu": "gated-gelu",
}
_FEED_FORWARD_FROM_HF = {
    "relu": "relu",
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gated-gelu": "gated_gelu",
    "gated-gelu_new": "gated_gelu",
}
EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
TOKENS = TokenConventions(
    roles={"eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "[UNK]"},
    single=("$A", "<eos>"),
    pair=("$A", "<eos>", "$B:1", "<eos>:1"),
    config_ids={
        "pad_token_id": "<pad>",
        "eos_token_id": "<eos>",
        "decoder_start_token_id": "<pad>",
    },
)
# Present in some Hugging Face checkpoints, never used by the model.
IGNORED_HF = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def _check(cfg: ModelConfig) -> None:
    if cfg.family != "t5":
        raise ConfigError(f"model.family={cfg.family!r}: Hugging Face T5 interop needs family t5")
    if cfg.activation not in _FEED_FORWARD:
        raise ConfigError(f"model.activation={cfg.activation!r} has no Hugging Face T5 equivalent")
    if cfg.scale_logits != cfg.tie_embeddings:
        # Hugging Face derives the rescaling from tie_word_embeddings alone.
        raise ConfigError(
            f"model.scale_logits={cfg.scale_logits} with model.tie_embeddings="
            f"{cfg.tie_embeddings} has no Hugging Face T5 equivalent; set them equal"
        )


def hf_config(cfg: ModelConfig, *, vocab_size: int, token_ids: dict[str, int] | None = None):
    """`transformers.T5Config` of the same architecture with `vocab_size` rows.

    `token_ids` (Loom reserved token -> id of the run's tokenizer) sets the pad, eos and
    decoder-start ids (see `TOKENS`); without it they keep T5Config's defaults (pad 0, eos 1,
    decoder start = pad), which are those of T5's SentencePiece vocabulary.
    """
    from transformers import T5Config

    _check(cfg)
    check_vocab_size(vocab_size)
    return T5Config(
        **stack_sizes(cfg, vocab_size),
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        dropout_rate=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_eps,
        initializer_factor=cfg.init_std,
        feed_forward_proj=_FEED_FORWARD[cfg.activation],
        tie_word_embeddings=cfg.tie_embeddings,
        **TOKENS.config_token_ids(token_ids),
    )


def stack_sizes(cfg: ModelConfig, vocab_size: int) -> dict:
    """The size fields T5Config and SwitchTransformersConfig share, from a Loom T5 config."""
    return dict(
        vocab_size=vocab_size,
        d_model=cfg.d_model,
        d_kv=cfg.head_dim,
        d_ff=cfg.ffn_size,
        num_layers=cfg.n_layer,
        num_decoder_layers=n_decoder_layers(cfg),
        num_heads=cfg.n_head,
    )


def loom_config(hf_cfg, *, name: str = "t5_from_hf") -> ModelConfig:
    """The Loom ModelConfig of an HF `T5Config`; raises ConfigError on what Loom lacks.

    The v1.0 / v1.1 distinction is read from `scale_decoder_outputs` (transformers 5) or
    `tie_word_embeddings` (earlier versions). HF configs carry no input length: 512 is set.
    """
    proj = known_value(hf_cfg, "feed_forward_proj", _FEED_FORWARD_FROM_HF, cls="T5Config")
    scaled = bool(getattr(hf_cfg, "scale_decoder_outputs", hf_cfg.tie_word_embeddings))
    fields = t5_fields(hf_cfg, activation=_FEED_FORWARD_FROM_HF[proj], tied=scaled)
    cfg = ModelConfig(name=name, **fields)
    cfg.validate()
    return cfg


def t5_fields(hf_cfg, *, activation: str, tied: bool) -> dict:
    """ModelConfig fields of the T5 stacks an HF T5 or Switch config describes (512 inputs:
    HF configs carry no input length)."""
    return dict(
        family="t5",
        objective="span_corruption",
        vocab_size=hf_cfg.vocab_size,
        n_layer=hf_cfg.num_layers,
        n_decoder_layer=hf_cfg.num_decoder_layers,
        d_model=hf_cfg.d_model,
        n_head=hf_cfg.num_heads,
        d_kv=hf_cfg.d_kv,
        d_ff=hf_cfg.d_ff,
        max_seq_len=512,
        dropout=float(hf_cfg.dropout_rate),
        layer_norm_eps=float(hf_cfg.layer_norm_epsilon),
        tie_embeddings=tied,
        scale_logits=tied,
        init_std=float(hf_cfg.initializer_factor),
        norm="rmsnorm",
        activation=activation,
        bias=False,
        position="relative",
        relative_buckets=hf_cfg.relative_attention_num_buckets,
        relative_max_distance=hf_cfg.relative_attention_max_distance,
    )


def build_hf_model(
    cfg: ModelConfig, *, vocab_size: int, token_ids: dict[str, int] | None = None
) -> nn.Module:
    """`T5ForConditionalGeneration(hf_config(cfg))` with the output head untied when `cfg` is.

    Runs on the current default device (`with torch.device("meta"):` works).
    """
    from transformers import T5ForConditionalGeneration

    config = hf_config(cfg, vocab_size=vocab_size, token_ids=token_ids)
    model = T5ForConditionalGeneration(config)
    if not cfg.tie_embeddings and model.lm_head.weight is model.shared.weight:
        head_VD = torch.empty_like(model.lm_head.weight)
        # Hugging Face's own draw for an untied T5 head: N(0, initializer_factor).
        model.lm_head.weight = nn.Parameter(nn.init.normal_(head_VD, std=cfg.init_std))
    return model


def _mlp_names(cfg: ModelConfig) -> tuple[str, ...]:
    return ("wi_0", "wi_1", "wo") if cfg.activation.startswith("gated_") else ("wi", "wo")


def n_decoder_layers(cfg: ModelConfig) -> int:
    return cfg.n_decoder_layer if cfg.n_decoder_layer is not None else cfg.n_layer


def attention_pairs(stack: str, i: int) -> tuple[list[tuple[str, str]], int]:
    """(Loom name, HF name) of the attention norms and projections of block `i` of `stack`,
    and the index of the block's MLP sub-layer in HF's `layer` list.

    Hugging Face numbers the sub-layers: 0 self-attention, [1 cross-attention,] last MLP.
    """
    ours, theirs = f"{stack}.blocks.{i}", f"{stack}.block.{i}.layer"
    attentions = [("ln_attn", "attn", 0, "SelfAttention")]
    if stack == "decoder":
        attentions.append(("ln_cross", "cross_attn", 1, "EncDecAttention"))
    pairs = []
    for norm, attn, j, hf_attn in attentions:
        pairs.append((f"{ours}.{norm}.weight", f"{theirs}.{j}.layer_norm.weight"))
        pairs += [
            (f"{ours}.{attn}.{p}.weight", f"{theirs}.{j}.{hf_attn}.{p}.weight") for p in "qkvo"
        ]
    return pairs, len(attentions)


def stack_pairs(
    cfg: ModelConfig, block_pairs: Callable[[str, int], list[tuple[str, str]]]
) -> list[tuple[str, str]]:
    """(Loom name, HF name) of every parameter except the embedding and head: each stack's
    relative position table and final norm, and `block_pairs(stack, i)` of its blocks."""
    pairs = []
    for stack, n_layer in (("encoder", cfg.n_layer), ("decoder", n_decoder_layers(cfg))):
        relative = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        pairs.append((f"{stack}.relative_bias.table.weight", relative))
        pairs.append((f"{stack}.ln_f.weight", f"{stack}.final_layer_norm.weight"))
        for i in range(n_layer):
            pairs += block_pairs(stack, i)
    return pairs


def _block_pairs(cfg: ModelConfig, stack: str, i: int) -> list[tuple[str, str]]:
    pairs, j = attention_pairs(stack, i)
    ours, theirs = f"{stack}.blocks.{i}", f"{stack}.block.{i}.layer.{j}"
    pairs.append((f"{ours}.ln_mlp.weight", f"{theirs}.layer_norm.weight"))
    pairs += [
        (f"{ours}.mlp.{p}.weight", f"{theirs}.DenseReluDense.{p}.weight") for p in _mlp_names(cfg)
    ]
    return pairs


def embeddings_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Pop Loom's embedding (and head) from `state`: HF's `shared`, its two aliases and
    `lm_head`, with `cfg.vocab_size` rows (all rows when it is None)."""
    shared_VD = take(state, "shared.weight", side="Loom")
    vocab = hf_rows(cfg, shared_VD.shape[0])
    # A tied head appears in state_dict() as well; Hugging Face wants it under lm_head too.
    head_VD = state.pop("lm_head.weight", None)
    if head_VD is None and not cfg.tie_embeddings:
        raise ConfigError("Loom state dict has no 'lm_head.weight' but model.tie_embeddings=false")
    head_VD = shared_VD if cfg.tie_embeddings else head_VD
    shared_VD = shared_VD[:vocab]
    out = {"shared.weight": shared_VD, **{alias: shared_VD for alias in EMBED_ALIASES}}
    out["lm_head.weight"] = head_VD[:vocab]
    return out


def embeddings_from_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Pop HF's embedding, its aliases and the head from `state` (and the unused tables of
    `IGNORED_HF`): Loom's `shared` and `lm_head`, padded to `cfg.padded_vocab_size(rows)`.
    An alias that is not equal to `shared` is refused."""
    for key in IGNORED_HF:
        state.pop(key, None)
    aliases = {alias: state.pop(alias) for alias in EMBED_ALIASES if alias in state}
    shared_VD = state.pop("shared.weight", next(iter(aliases.values()), None))
    if shared_VD is None:
        raise ConfigError("Hugging Face state dict has no 'shared.weight' (nor embed_tokens)")
    for alias, table_VD in aliases.items():
        if table_VD is not shared_VD and not torch.equal(table_VD, shared_VD):
            raise ConfigError(
                f"Hugging Face {alias} differs from shared.weight; Loom's T5 has one input "
                "embedding for both stacks"
            )
    rows = shared_VD.shape[0]
    check_hf_rows(cfg, rows)
    padded = cfg.padded_vocab_size(rows)
    head_VD = state.pop("lm_head.weight", None)
    out = {"shared.weight": pad_rows(shared_VD, padded)}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["shared.weight"]
    elif head_VD is None:
        raise ConfigError("Hugging Face state dict has no 'lm_head.weight' for an untied model")
    else:
        out["lm_head.weight"] = pad_rows(head_VD, padded)
    return out


def to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Loom `T5.state_dict()` -> `T5ForConditionalGeneration` state dict.

    The vocabulary keeps `cfg.vocab_size` rows (all rows when it is None): padded rows go.
    """
    _check(cfg)
    state = dict(state_dict)
    out = embeddings_to_hf(state, cfg)
    for ours, theirs in stack_pairs(cfg, partial(_block_pairs, cfg)):
        out[theirs] = take(state, ours, side="Loom")
    reject_leftovers(state, side="Loom")
    return out


def from_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`T5ForConditionalGeneration` state dict -> Loom `T5.state_dict()`.

    Loads with `strict=True` into `build_model(cfg, vocab_size=cfg.padded_vocab_size(V))` for
    the HF vocabulary V; the padded rows are zeros.
    """
    _check(cfg)
    state = dict(state_dict)
    out = embeddings_from_hf(state, cfg)
    for ours, theirs in stack_pairs(cfg, partial(_block_pairs, cfg)):
        out[ours] = take(state, theirs, side="Hugging Face")
    reject_leftovers(state, side="Hugging Face")
    return out
