"""Loom `Bert` <-> Hugging Face `transformers.BertForPreTraining` weights and configs.

Only the plain BERT architecture has an HF twin: post-LN, learned positions, LayerNorm with
biases, biased linears, an ungated activation, token types, heads of width d_model // n_head,
no ALBERT factorisation or sharing. Anything else raises ConfigError naming the field.

The one non-trivial mapping is attention: Loom fuses q, k and v into one `qkv` projection
whose output rows are laid out per head as (H, 3, K) (see models/blocks.py), while HF keeps
three (H * K)-row projections `query`, `key`, `value`.

Vocabulary rows (as for every family, see models/hf/__init__.py): the HF model gets
`cfg.vocab_size` rows when that is set, else every row of the checkpoint (padding included).
`to_hf` drops the padded rows beyond it (of the embeddings, an untied decoder and the output
bias); `from_hf` pads back to `cfg.padded_vocab_size(rows)` with zero rows.

Tokens (`TOKENS`): Loom's MLM objectives feed [CLS] A [SEP] (B [SEP]) with token type 1 on
B and its [SEP], so an exported tokenizer adds the same around a text or a pair, and names
[MASK] as its mask token (what the fill-mask pipeline looks for). The HF config keeps
pad_token_id None (see `hf_config`).

Shape legend: H heads, K head size, D model width, V vocabulary rows.
"""

from __future__ import annotations

import torch

from common.errors import ConfigError
from models.config import ModelConfig
from models.hf.common import (
    ACT_FROM_HF,
    TokenConventions,
    check_fields,
    check_hf_rows,
    check_keys,
    check_vocab_size,
    hf_rows,
    pad_rows,
    qkv_blocks_to_per_head,
    qkv_per_head_to_blocks,
    reject_unsupported,
)

__all__ = ["TOKENS", "from_hf", "hf_config", "loom_config", "to_hf"]

_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}

TOKENS = TokenConventions(
    roles={
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
        "pad_token": "<pad>",
        "unk_token": "[UNK]",
    },
    single=("[CLS]", "$A", "[SEP]"),
    pair=("[CLS]", "$A", "[SEP]", "$B:1", "[SEP]:1"),
    input_names=("input_ids", "token_type_ids", "attention_mask"),
)

# Loom key suffix of one block -> HF key suffix of one encoder layer (qkv is handled apart).
_BLOCK_KEYS = {
    "attn.out.weight": "attention.output.dense.weight",
    "attn.out.bias": "attention.output.dense.bias",
    "ln1.weight": "attention.output.LayerNorm.weight",
    "ln1.bias": "attention.output.LayerNorm.bias",
    "mlp.fc_in.weight": "intermediate.dense.weight",
    "mlp.fc_in.bias": "intermediate.dense.bias",
    "mlp.fc_out.weight": "output.dense.weight",
    "mlp.fc_out.bias": "output.dense.bias",
    "ln2.weight": "output.LayerNorm.weight",
    "ln2.bias": "output.LayerNorm.bias",
}
# Loom key -> HF key outside the blocks, vocabulary-sized tensors excepted.
_TOP_KEYS = {
    "wpe.weight": "bert.embeddings.position_embeddings.weight",
    "tte.weight": "bert.embeddings.token_type_embeddings.weight",
    "emb_ln.weight": "bert.embeddings.LayerNorm.weight",
    "emb_ln.bias": "bert.embeddings.LayerNorm.bias",
    "pooler.weight": "bert.pooler.dense.weight",
    "pooler.bias": "bert.pooler.dense.bias",
    "mlm_dense.weight": "cls.predictions.transform.dense.weight",
    "mlm_dense.bias": "cls.predictions.transform.dense.bias",
    "mlm_ln.weight": "cls.predictions.transform.LayerNorm.weight",
    "mlm_ln.bias": "cls.predictions.transform.LayerNorm.bias",
    "nsp_head.weight": "cls.seq_relationship.weight",
    "nsp_head.bias": "cls.seq_relationship.bias",
}
_WTE = "bert.embeddings.word_embeddings.weight"
_DECODER = "cls.predictions.decoder.weight"
_OUT_BIAS = "cls.predictions.bias"
_QKV_NAMES = ("query", "key", "value")
# Keys an HF state dict may hold that carry nothing Loom needs: non-persistent buffers that
# some transformers versions save, and the decoder bias, which HF ties to cls.predictions.bias.
_IGNORED_HF = ("bert.embeddings.position_ids", "bert.embeddings.token_type_ids")


def _check_convertible(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first field BertForPreTraining cannot express."""
    problems = {
        "family": (cfg.family == "bert", "only family=bert maps to BertForPreTraining"),
        "pre_ln": (not cfg.pre_ln, "BERT is post-LN"),
        "position": (cfg.position == "learned", "BERT has learned positions"),
        "norm": (cfg.norm == "layernorm", "BERT uses LayerNorm"),
        "bias": (cfg.bias, "BERT has biases everywhere"),
        "activation": (cfg.activation in _ACT_TO_HF, f"BERT supports {sorted(_ACT_TO_HF)}"),
        "type_vocab_size": (cfg.type_vocab_size > 0, "BERT always has token types"),
        "embedding_size": (
            cfg.embedding_size in (None, cfg.d_model),
            "factorised embeddings are ALBERT's",
        ),
        "share_layers": (not cfg.share_layers, "cross-layer sharing is ALBERT's"),
        "d_kv": (
            cfg.d_kv is None or cfg.d_kv * cfg.n_head == cfg.d_model,
            "BERT heads are d_model // n_head wide",
        ),
    }
    check_fields(cfg, problems, target="BertForPreTraining")


def hf_config(
    cfg: ModelConfig, *, vocab_size: int, token_ids: dict[str, int] | None = None, **overrides
):
    """The `transformers.BertConfig` of `cfg` with `vocab_size` rows.

    `overrides` are further BertConfig arguments (e.g. attn_implementation="eager").
    `pad_token_id` defaults to None: HF never trains the embedding row of its padding id,
    while every Loom row is trained (id 0 is a real token of the byte tokenizer). For the
    same reason `token_ids` (the run's tokenizer, Loom token -> id) sets nothing here.
    """
    from transformers import BertConfig

    _check_convertible(cfg)
    check_vocab_size(vocab_size)
    fields = {
        "vocab_size": vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.ffn_size,
        "hidden_act": _ACT_TO_HF[cfg.activation],
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "max_position_embeddings": cfg.max_seq_len,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": None,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    return BertConfig(**{**fields, **overrides})


def loom_config(hf_cfg, *, name: str = "bert_from_hf") -> ModelConfig:
    """The Loom ModelConfig of an HF `BertConfig`; raises ConfigError on what Loom lacks."""
    unsupported = {
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "add_cross_attention": False,
    }
    reject_unsupported(hf_cfg, unsupported, cls="BertConfig")
    act = hf_cfg.hidden_act
    if act not in ACT_FROM_HF:
        raise ConfigError(
            f"BertConfig.hidden_act={act!r} has no Loom equivalent; "
            f"supported: {sorted(ACT_FROM_HF)}"
        )
    cfg = ModelConfig(
        name=name,
        family="bert",
        objective="mlm_nsp",
        vocab_size=hf_cfg.vocab_size,
        n_layer=hf_cfg.num_hidden_layers,
        d_model=hf_cfg.hidden_size,
        n_head=hf_cfg.num_attention_heads,
        d_ff=hf_cfg.intermediate_size,
        max_seq_len=hf_cfg.max_position_embeddings,
        # Loom has one dropout rate; BERT's released configs use the same for both.
        dropout=float(hf_cfg.hidden_dropout_prob),
        layer_norm_eps=float(hf_cfg.layer_norm_eps),
        tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", True)),
        init_std=float(hf_cfg.initializer_range),
        pre_ln=False,
        activation=ACT_FROM_HF[act],
        type_vocab_size=hf_cfg.type_vocab_size,
    )
    cfg.validate()
    return cfg


def _loom_keys(cfg: ModelConfig) -> set[str]:
    keys = set(_TOP_KEYS) | {"wte.weight", "lm_head.weight", "lm_head.bias"}
    keys |= {f"blocks.{i}.{k}" for i in range(cfg.n_layer) for k in _BLOCK_KEYS}
    keys |= {f"blocks.{i}.attn.qkv.{p}" for i in range(cfg.n_layer) for p in ("weight", "bias")}
    return keys


def _hf_keys(cfg: ModelConfig) -> set[str]:
    keys = set(_TOP_KEYS.values()) | {_WTE, _OUT_BIAS}
    for i in range(cfg.n_layer):
        hf = f"bert.encoder.layer.{i}."
        keys |= {hf + k for k in _BLOCK_KEYS.values()}
        keys |= {f"{hf}attention.self.{n}.{p}" for n in _QKV_NAMES for p in ("weight", "bias")}
    return keys


def to_hf(state_dict: dict, cfg: ModelConfig) -> dict:
    """Loom `Bert` state dict -> `BertForPreTraining` state dict (tied keys included)."""
    _check_convertible(cfg)
    got = set(state_dict)
    if cfg.tie_embeddings:
        got.add("lm_head.weight")  # a tied head may be stored once, as wte
    check_keys(got, _loom_keys(cfg), what="Loom Bert state dict")
    wte_VD = state_dict["wte.weight"]
    vocab = hf_rows(cfg, wte_VD.shape[0])
    head_VD = wte_VD if cfg.tie_embeddings else state_dict["lm_head.weight"]
    out = {hf: state_dict[loom] for loom, hf in _TOP_KEYS.items()}
    out[_WTE] = wte_VD[:vocab]
    out[_DECODER] = out[_WTE] if cfg.tie_embeddings else head_VD[:vocab]
    out[_OUT_BIAS] = state_dict["lm_head.bias"][:vocab]
    out["cls.predictions.decoder.bias"] = out[_OUT_BIAS]
    for i in range(cfg.n_layer):
        loom, hf = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        for ours, theirs in _BLOCK_KEYS.items():
            out[hf + theirs] = state_dict[loom + ours]
        for p in ("weight", "bias"):
            qkv = qkv_per_head_to_blocks(state_dict[f"{loom}attn.qkv.{p}"], cfg.n_head)
            for name, x in zip(_QKV_NAMES, qkv.chunk(3), strict=True):
                out[f"{hf}attention.self.{name}.{p}"] = x
    return out


def from_hf(state_dict: dict, cfg: ModelConfig) -> dict:
    """`BertForPreTraining` state dict -> Loom `Bert` state dict (tied keys included).

    The result loads with `strict=True` into `build_model(cfg, vocab_size=cfg.padded_vocab_size(V))`
    where V is the HF vocabulary.
    """
    _check_convertible(cfg)
    sd = {k: v for k, v in state_dict.items() if k not in _IGNORED_HF}
    sd.pop("cls.predictions.decoder.bias", None)
    decoder = sd.pop(_DECODER, None)
    check_keys(set(sd), _hf_keys(cfg), what="Hugging Face BERT state dict")
    if decoder is None and not cfg.tie_embeddings:
        raise ConfigError(f"model.tie_embeddings=false but the HF state dict has no {_DECODER}")
    rows = sd[_WTE].shape[0]
    check_hf_rows(cfg, rows)
    padded = cfg.padded_vocab_size(rows)
    out = {loom: sd[hf] for loom, hf in _TOP_KEYS.items()}
    out["wte.weight"] = pad_rows(sd[_WTE], padded)
    out["lm_head.weight"] = out["wte.weight"] if cfg.tie_embeddings else pad_rows(decoder, padded)
    out["lm_head.bias"] = pad_rows(sd[_OUT_BIAS], padded)
    for i in range(cfg.n_layer):
        loom, hf = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        for ours, theirs in _BLOCK_KEYS.items():
            out[loom + ours] = sd[hf + theirs]
        prefix = f"{hf}attention.self."
        for p in ("weight", "bias"):
            blocks = torch.cat([sd[f"{prefix}{n}.{p}"] for n in _QKV_NAMES])
            out[f"{loom}attn.qkv.{p}"] = qkv_blocks_to_per_head(blocks, cfg.n_head)
    return out
