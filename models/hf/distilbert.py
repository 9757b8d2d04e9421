"""Loom `Bert` without token types or pair head <-> Hugging Face `DistilBertForMaskedLM`.

DistilBERT (Sanh et al. 2019) is BERT's encoder and MLM head with neither token-type
embeddings nor the sentence-pair head, trained (at half BERT-base's depth) by distillation
from a BERT teacher. The Loom side is a `Bert` with `model.type_vocab_size=0` and
`model.pair_head=false` (conf/model/distilbert_*.yaml); the conversion is BERT's
(models/hf/bert.py) under DistilBERT's key names:

- attention: Loom fuses q, k and v into one `qkv` projection whose output rows are laid out
  per head as (H, 3, K) (see models/blocks.py); HF keeps three (H * K)-row projections
  `q_lin`, `k_lin`, `v_lin`, so heads must be d_model // n_head wide;
- positions: both tables hold positions 0 .. max_seq_len - 1 (max_position_embeddings =
  model.max_seq_len, no rows before position 0 as in RoBERTa); HF's fixed sinusoidal table
  (`sinusoidal_pos_embds=True`) has no Loom equivalent;
- MLM head: Loom's `mlm_dense`, activation, `mlm_ln` and `lm_head` are HF's
  `vocab_transform`, activation, `vocab_layer_norm` and `vocab_projector` (tied to the word
  embeddings unless model.tie_embeddings=false, with its own bias);
- LayerNorms: HF hard-codes eps 1e-12 in every one, so only model.layer_norm_eps=1e-12
  converts; HF applies `config.activation` in the MLP and the head, as Loom applies
  model.activation in both, so gelu and relu convert.

Vocabulary rows (as for every family, see models/hf/__init__.py): the HF model gets
`cfg.vocab_size` rows when that is set, else every row of the checkpoint (padding included);
`to_hf` drops the padded rows beyond it and `from_hf` pads back to `cfg.padded_vocab_size`.

Dropout (training only; logits in eval agree): HF's blocks drop the MLP branch but not the
attention branch, where Loom drops both; HF's `attention_dropout` is written as Loom's one
rate, and `loom_config` takes `dropout` (the released configs use one rate for both).

Tokens (`TOKENS`): Loom's mlm objective feeds [CLS] row [SEP], where a row runs across
documents with <eos> between them, so an exported tokenizer adds [CLS] .. [SEP] around a text
and joins a pair with <eos>, as two documents in one row, and names [MASK] as its mask token
(what the fill-mask pipeline looks for). No token types are returned: the model has none. The
HF config keeps pad_token_id None, as BERT's (see models/hf/bert.py `hf_config`).

Shape legend: H heads, K head size, D model width, T positions, V vocabulary rows.
"""

from __future__ import annotations

import torch

from common.errors import ConfigError
from models.config import ModelConfig
from models.hf.bert import encoder_problems
from models.hf.common import (
    TokenConventions,
    check_fields,
    check_hf_rows,
    check_keys,
    check_vocab_size,
    hf_rows,
    known_value,
    pad_rows,
    qkv_blocks_to_per_head,
    qkv_per_head_to_blocks,
    reject_unsupported,
)

__all__ = ["LAYER_NORM_EPS", "TOKENS", "from_hf", "hf_config", "loom_config", "to_hf"]

# The eps every LayerNorm of HF's DistilBERT uses (not a config field there).
LAYER_NORM_EPS = 1e-12
# Loom activation <-> DistilBertConfig.activation; the MLP and the MLM head apply the same one.
_ACT_TO_HF = {"gelu": "gelu", "relu": "relu"}
_ACT_FROM_HF = {theirs: ours for ours, theirs in _ACT_TO_HF.items()}

TOKENS = TokenConventions(
    roles={
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
        "pad_token": "<pad>",
        "unk_token": "[UNK]",
    },
    single=("[CLS]", "$A", "[SEP]"),
    pair=("[CLS]", "$A", "<eos>", "$B", "[SEP]"),
)

# Loom key -> HF key outside the layers, vocabulary-sized tensors excepted.
_TOP = {
    "wpe.weight": "distilbert.embeddings.position_embeddings.weight",
    "emb_ln.weight": "distilbert.embeddings.LayerNorm.weight",
    "emb_ln.bias": "distilbert.embeddings.LayerNorm.bias",
    "mlm_dense.weight": "vocab_transform.weight",
    "mlm_dense.bias": "vocab_transform.bias",
    "mlm_ln.weight": "vocab_layer_norm.weight",
    "mlm_ln.bias": "vocab_layer_norm.bias",
}
# Loom key suffix of one block -> HF key suffix of one layer (qkv is handled apart).
_BLOCK = {
    "attn.out.weight": "attention.out_lin.weight",
    "attn.out.bias": "attention.out_lin.bias",
    "ln1.weight": "sa_layer_norm.weight",
    "ln1.bias": "sa_layer_norm.bias",
    "mlp.fc_in.weight": "ffn.lin1.weight",
    "mlp.fc_in.bias": "ffn.lin1.bias",
    "mlp.fc_out.weight": "ffn.lin2.weight",
    "mlp.fc_out.bias": "ffn.lin2.bias",
    "ln2.weight": "output_layer_norm.weight",
    "ln2.bias": "output_layer_norm.bias",
}
_QKV = ("q_lin", "k_lin", "v_lin")
_PARAMS = ("weight", "bias")
_LAYERS = "distilbert.transformer.layer."
_WTE = "distilbert.embeddings.word_embeddings.weight"
_POSITIONS = _TOP["wpe.weight"]
_DECODER = "vocab_projector.weight"
_OUT_BIAS = "vocab_projector.bias"
# Non-persistent buffers that some releases save; they carry nothing Loom needs.
_IGNORED = ("distilbert.embeddings.position_ids",)


def _check_convertible(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first field DistilBertForMaskedLM cannot express."""
    target = "DistilBertForMaskedLM"
    problems = {
        "family": (cfg.family == "bert", f"only family=bert maps to {target}"),
        "pair_head": (
            not cfg.has_pair_head,
            f"{target} has no pair head; a BERT with one converts to BertForPreTraining",
        ),
        **encoder_problems(cfg, name="DistilBERT"),
        "type_vocab_size": (
            cfg.type_vocab_size == 0,
            "DistilBERT has no token-type embeddings (with them, and no pair head, the model "
            "is RoBERTa's)",
        ),
        "activation": (
            cfg.activation in _ACT_TO_HF,
            f"DistilBERT's MLP and MLM head support {sorted(_ACT_TO_HF)}",
        ),
        "layer_norm_eps": (
            cfg.layer_norm_eps == LAYER_NORM_EPS,
            f"every LayerNorm of HF's DistilBERT has eps {LAYER_NORM_EPS}",
        ),
        "sbo_max_targets": (cfg.sbo_max_targets == 0, "the span boundary head is SpanBERT's"),
    }
    check_fields(cfg, problems, target=target)
    if cfg.moe.enabled:
        raise ConfigError(
            f"model.moe.num_experts={cfg.moe.num_experts} cannot be converted to {target}: "
            "its MLPs are dense"
        )


def hf_config(
    cfg: ModelConfig, *, vocab_size: int, token_ids: dict[str, int] | None = None, **overrides
):
    """The `transformers.DistilBertConfig` of `cfg` with `vocab_size` rows.

    `overrides` are further DistilBertConfig arguments (e.g. attn_implementation="eager").
    `pad_token_id` is None (HF's default 0 would make row 0 an untrained padding row, while
    every Loom row is trained), so `token_ids` sets nothing here.
    """
    from transformers import DistilBertConfig

    _check_convertible(cfg)
    check_vocab_size(vocab_size)
    fields = {
        "vocab_size": vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "sinusoidal_pos_embds": False,
        "n_layers": cfg.n_layer,
        "n_heads": cfg.n_head,
        "dim": cfg.d_model,
        "hidden_dim": cfg.ffn_size,
        "dropout": cfg.dropout,
        "attention_dropout": cfg.dropout,
        "activation": _ACT_TO_HF[cfg.activation],
        "initializer_range": cfg.init_std,
        "pad_token_id": None,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    return DistilBertConfig(**{**fields, **overrides})


def loom_config(hf_cfg, *, name: str = "distilbert_from_hf") -> ModelConfig:
    """The Loom ModelConfig of an HF `DistilBertConfig`; raises ConfigError on what Loom lacks."""
    reject_unsupported(hf_cfg, {"sinusoidal_pos_embds": False}, cls="DistilBertConfig")
    act = known_value(hf_cfg, "activation", _ACT_FROM_HF, cls="DistilBertConfig")
    cfg = ModelConfig(
        name=name,
        family="bert",
        objective="mlm",
        vocab_size=hf_cfg.vocab_size,
        n_layer=hf_cfg.n_layers,
        d_model=hf_cfg.dim,
        n_head=hf_cfg.n_heads,
        d_ff=hf_cfg.hidden_dim,
        max_seq_len=hf_cfg.max_position_embeddings,
        dropout=float(hf_cfg.dropout),
        layer_norm_eps=LAYER_NORM_EPS,
        tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", True)),
        init_std=float(hf_cfg.initializer_range),
        pre_ln=False,
        activation=_ACT_FROM_HF[act],
        type_vocab_size=0,
        pair_head=False,
    )
    cfg.validate()
    return cfg


def _renames(cfg: ModelConfig) -> dict[str, str]:
    """Loom key -> HF key of every tensor but the vocabulary-sized ones and qkv."""
    out = dict(_TOP)
    for i in range(cfg.n_layer):
        out |= {f"blocks.{i}.{ours}": f"{_LAYERS}{i}.{theirs}" for ours, theirs in _BLOCK.items()}
    return out


def _qkv_keys(cfg: ModelConfig) -> list[tuple[str, list[str]]]:
    """(Loom fused key, its three HF keys q, k, v) of every layer and parameter."""
    return [
        (f"blocks.{i}.attn.qkv.{p}", [f"{_LAYERS}{i}.attention.{n}.{p}" for n in _QKV])
        for i in range(cfg.n_layer)
        for p in _PARAMS
    ]


def _loom_keys(cfg: ModelConfig) -> set[str]:
    keys = set(_renames(cfg)) | {"wte.weight", "lm_head.weight", "lm_head.bias"}
    return keys | {fused for fused, _ in _qkv_keys(cfg)}


def _hf_keys(cfg: ModelConfig) -> set[str]:
    keys = set(_renames(cfg).values()) | {_WTE, _OUT_BIAS}
    return keys | {k for _, split in _qkv_keys(cfg) for k in split}


def to_hf(state_dict: dict, cfg: ModelConfig) -> dict:
    """Loom `Bert` state dict -> `DistilBertForMaskedLM` state dict (tied keys included)."""
    _check_convertible(cfg)
    got = set(state_dict)
    if cfg.tie_embeddings:
        got.add("lm_head.weight")  # a tied head may be stored once, as wte
    check_keys(got, _loom_keys(cfg), what="Loom DistilBERT state dict")
    wte_VD = state_dict["wte.weight"]
    vocab = hf_rows(cfg, wte_VD.shape[0])
    out = {hf: state_dict[loom] for loom, hf in _renames(cfg).items()}
    out[_WTE] = wte_VD[:vocab]
    out[_DECODER] = out[_WTE] if cfg.tie_embeddings else state_dict["lm_head.weight"][:vocab]
    out[_OUT_BIAS] = state_dict["lm_head.bias"][:vocab]
    for fused, split in _qkv_keys(cfg):
        qkv = qkv_per_head_to_blocks(state_dict[fused], cfg.n_head)
        out |= dict(zip(split, qkv.chunk(3), strict=True))
    return out


def from_hf(state_dict: dict, cfg: ModelConfig) -> dict:
    """`DistilBertForMaskedLM` state dict -> Loom `Bert` state dict (tied keys included).

    The result loads with `strict=True` into `build_model(cfg, vocab_size=cfg.padded_vocab_size(V))`
    where V is the HF vocabulary.
    """
    _check_convertible(cfg)
    sd = {k: v for k, v in state_dict.items() if k not in _IGNORED}
    decoder_VD = sd.pop(_DECODER, None)
    check_keys(set(sd), _hf_keys(cfg), what="Hugging Face DistilBERT state dict")
    if decoder_VD is None and not cfg.tie_embeddings:
        raise ConfigError(f"model.tie_embeddings=false but the HF state dict has no {_DECODER}")
    positions = sd[_POSITIONS].shape[0]
    if positions != cfg.max_seq_len:
        raise ConfigError(
            f"the HF position table has {positions} rows but model.max_seq_len="
            f"{cfg.max_seq_len} needs as many"
        )
    rows = sd[_WTE].shape[0]
    check_hf_rows(cfg, rows)
    padded = cfg.padded_vocab_size(rows)
    out = {loom: sd[hf] for loom, hf in _renames(cfg).items()}
    out["wte.weight"] = pad_rows(sd[_WTE], padded)
    tied = cfg.tie_embeddings
    out["lm_head.weight"] = out["wte.weight"] if tied else pad_rows(decoder_VD, padded)
    out["lm_head.bias"] = pad_rows(sd[_OUT_BIAS], padded)
    for fused, split in _qkv_keys(cfg):
        blocks = torch.cat([sd[k] for k in split])
        out[fused] = qkv_blocks_to_per_head(blocks, cfg.n_head)
    return out
