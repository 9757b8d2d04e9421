"""Loom `Bert` <-> Hugging Face `transformers.BertForPreTraining` weights and configs.

Only the plain BERT architecture has an HF twin: post-LN, learned positions, LayerNorm with
biases, biased linears, an ungated activation, token types, heads of width d_model // n_head,
no ALBERT factorisation or sharing, and the sentence-pair head (a BERT without it is RoBERTa's
shape and converts to RobertaForMaskedLM, models/hf/roberta.py). Anything else raises
ConfigError naming the field.

The one non-trivial mapping is attention: Loom fuses q, k and v into one `qkv` projection
whose output rows are laid out per head as (H, 3, K) (see models/blocks.py), while HF keeps
three (H * K)-row projections `query`, `key`, `value`.

Vocabulary rows (as for every family, see models/hf/__init__.py): the HF model gets
`cfg.vocab_size` rows when that is set, else every row of the checkpoint (padding included).
`to_hf` drops the padded rows beyond it (of the embeddings, an untied decoder and the output
bias); `from_hf` pads back to `cfg.padded_vocab_size(rows)` with zero rows.

The encoder, the MLM head and the vocabulary rows convert the same way for RoBERTa, under
other key names: `EncoderLayout` names the keys and `encoder_to_hf` / `encoder_from_hf` (with
`encoder_problems`, `encoder_hf_fields` and `encoder_loom_fields`) do the work for both
models/hf/bert.py and models/hf/roberta.py. ELECTRA's two networks (models/hf/electra.py)
use the blocks' part alone (`blocks_to_hf`, `blocks_from_hf` and their key sets).

Tokens (`TOKENS`): Loom's MLM objectives feed [CLS] A [SEP] (B [SEP]) with token type 1 on
B and its [SEP], so an exported tokenizer adds the same around a text or a pair, and names
[MASK] as its mask token (what the fill-mask pipeline looks for). The HF config keeps
pad_token_id None (see `hf_config`).

Shape legend: H heads, K head size, D model width, V vocabulary rows.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    known_value,
    pad_rows,
    qkv_blocks_to_per_head,
    qkv_per_head_to_blocks,
    reject_unsupported,
)

__all__ = [
    "TOKENS",
    "EncoderLayout",
    "blocks_from_hf",
    "blocks_to_hf",
    "encoder_from_hf",
    "encoder_hf_fields",
    "encoder_loom_fields",
    "encoder_problems",
    "encoder_to_hf",
    "from_hf",
    "hf_block_keys",
    "hf_config",
    "loom_block_keys",
    "loom_config",
    "to_hf",
]

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
_QKV_NAMES = ("query", "key", "value")


@dataclass(frozen=True)
class EncoderLayout:
    """Where an HF BERT-style masked LM keeps Loom's tensors."""

    name: str
    """The model in messages ("BERT", "RoBERTa")."""
    top: dict[str, str]
    """Loom key -> HF key outside the layers, vocabulary-sized tensors excepted."""
    layers: str
    """Prefix of the HF encoder layers; layer i's keys start with f"{layers}{i}."."""
    wte: str
    """The word embeddings."""
    decoder: str
    """The MLM decoder weight (tied to `wte` unless model.tie_embeddings=false)."""
    out_bias: str
    """The MLM output bias; HF ties the decoder's bias (`decoder_bias`) to it."""
    ignored: tuple[str, ...] = ()
    """HF keys that carry nothing Loom needs: non-persistent buffers some releases save."""

    @property
    def decoder_bias(self) -> str:
        return self.decoder.removesuffix("weight") + "bias"


_LAYOUT = EncoderLayout(
    name="BERT",
    top={
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
    },
    layers="bert.encoder.layer.",
    wte="bert.embeddings.word_embeddings.weight",
    decoder="cls.predictions.decoder.weight",
    out_bias="cls.predictions.bias",
    ignored=("bert.embeddings.position_ids", "bert.embeddings.token_type_ids"),
)


def encoder_problems(cfg: ModelConfig, *, name: str) -> dict[str, tuple[bool, str]]:
    """The checks every HF BERT-style encoder shares ({field: (ok, why)}, for check_fields);
    `name` ("BERT", "RoBERTa") is the model the reasons speak of."""
    return {
        "pre_ln": (not cfg.pre_ln, f"{name} is post-LN"),
        "position": (cfg.position == "learned", f"{name} has learned positions"),
        "norm": (cfg.norm == "layernorm", f"{name} uses LayerNorm"),
        "bias": (cfg.bias, f"{name} has biases everywhere"),
        "activation": (cfg.activation in _ACT_TO_HF, f"{name} supports {sorted(_ACT_TO_HF)}"),
        "type_vocab_size": (cfg.type_vocab_size > 0, f"{name} always has token types"),
        "embedding_size": (
            cfg.embedding_size in (None, cfg.d_model),
            "factorised embeddings are ALBERT's",
        ),
        "share_layers": (not cfg.share_layers, "cross-layer sharing is ALBERT's"),
        "d_kv": (
            cfg.d_kv is None or cfg.d_kv * cfg.n_head == cfg.d_model,
            f"{name} heads are d_model // n_head wide",
        ),
    }


def _check_convertible(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first field BertForPreTraining cannot express."""
    problems = {
        "family": (cfg.family == "bert", "only family=bert maps to BertForPreTraining"),
        "pair_head": (
            cfg.has_pair_head,
            "BertForPreTraining has the NSP head; without it the model is RoBERTa's "
            "(RobertaForMaskedLM)",
        ),
        "pair_classes": (cfg.pair_classes == 2, "BertForPreTraining's NSP classifier is 2-way"),
        **encoder_problems(cfg, name="BERT"),
    }
    check_fields(cfg, problems, target="BertForPreTraining")


def encoder_hf_fields(cfg: ModelConfig, *, vocab_size: int) -> dict:
    """The config fields BertConfig and RobertaConfig share, from `cfg` (already checked)."""
    check_vocab_size(vocab_size)
    return {
        "vocab_size": vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "intermediate_size": cfg.ffn_size,
        "hidden_act": _ACT_TO_HF[cfg.activation],
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.dropout,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.layer_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
    }


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
    fields = {
        **encoder_hf_fields(cfg, vocab_size=vocab_size),
        "max_position_embeddings": cfg.max_seq_len,
        "pad_token_id": None,
    }
    return BertConfig(**{**fields, **overrides})


def encoder_loom_fields(hf_cfg, *, cls: str) -> dict:
    """ModelConfig fields of an HF BertConfig or RobertaConfig (`cls`, for messages), those
    of the position table and the heads excepted; raises ConfigError on what Loom lacks."""
    unsupported = {
        "position_embedding_type": "absolute",
        "is_decoder": False,
        "add_cross_attention": False,
    }
    reject_unsupported(hf_cfg, unsupported, cls=cls)
    act = known_value(hf_cfg, "hidden_act", ACT_FROM_HF, cls=cls)
    return {
        "family": "bert",
        "vocab_size": hf_cfg.vocab_size,
        "n_layer": hf_cfg.num_hidden_layers,
        "d_model": hf_cfg.hidden_size,
        "n_head": hf_cfg.num_attention_heads,
        "d_ff": hf_cfg.intermediate_size,
        # Loom has one dropout rate; the released BERT and RoBERTa configs use one for both.
        "dropout": float(hf_cfg.hidden_dropout_prob),
        "layer_norm_eps": float(hf_cfg.layer_norm_eps),
        "tie_embeddings": bool(getattr(hf_cfg, "tie_word_embeddings", True)),
        "init_std": float(hf_cfg.initializer_range),
        "pre_ln": False,
        "activation": ACT_FROM_HF[act],
        "type_vocab_size": hf_cfg.type_vocab_size,
    }


def loom_config(hf_cfg, *, name: str = "bert_from_hf") -> ModelConfig:
    """The Loom ModelConfig of an HF `BertConfig`; raises ConfigError on what Loom lacks."""
    cfg = ModelConfig(
        name=name,
        objective="mlm_nsp",
        max_seq_len=hf_cfg.max_position_embeddings,
        **encoder_loom_fields(hf_cfg, cls="BertConfig"),
    )
    cfg.validate()
    return cfg


def loom_block_keys(cfg: ModelConfig, *, prefix: str = "") -> set[str]:
    """The Loom keys of `cfg`'s blocks under `prefix` (e.g. "generator.")."""
    keys = {f"{prefix}blocks.{i}.{k}" for i in range(cfg.n_layer) for k in _BLOCK_KEYS}
    for i in range(cfg.n_layer):
        keys |= {f"{prefix}blocks.{i}.attn.qkv.{p}" for p in ("weight", "bias")}
    return keys


def hf_block_keys(cfg: ModelConfig, *, layers: str) -> set[str]:
    """The HF keys of `cfg`'s encoder layers, layer i's starting with f"{layers}{i}."."""
    keys = set()
    for i in range(cfg.n_layer):
        hf = f"{layers}{i}."
        keys |= {hf + k for k in _BLOCK_KEYS.values()}
        keys |= {f"{hf}attention.self.{n}.{p}" for n in _QKV_NAMES for p in ("weight", "bias")}
    return keys


def blocks_to_hf(state_dict: dict, cfg: ModelConfig, *, prefix: str, layers: str) -> dict:
    """Loom blocks `{prefix}blocks.i.` -> HF BERT-style layers `{layers}i.` (qkv split)."""
    out = {}
    for i in range(cfg.n_layer):
        loom, hf = f"{prefix}blocks.{i}.", f"{layers}{i}."
        for ours, theirs in _BLOCK_KEYS.items():
            out[hf + theirs] = state_dict[loom + ours]
        for p in ("weight", "bias"):
            qkv = qkv_per_head_to_blocks(state_dict[f"{loom}attn.qkv.{p}"], cfg.n_head)
            for name, x in zip(_QKV_NAMES, qkv.chunk(3), strict=True):
                out[f"{hf}attention.self.{name}.{p}"] = x
    return out


def blocks_from_hf(state_dict: dict, cfg: ModelConfig, *, prefix: str, layers: str) -> dict:
    """HF BERT-style layers `{layers}i.` -> Loom blocks `{prefix}blocks.i.` (qkv fused)."""
    out = {}
    for i in range(cfg.n_layer):
        loom, hf = f"{prefix}blocks.{i}.", f"{layers}{i}."
        for ours, theirs in _BLOCK_KEYS.items():
            out[loom + ours] = state_dict[hf + theirs]
        for p in ("weight", "bias"):
            blocks = torch.cat([state_dict[f"{hf}attention.self.{n}.{p}"] for n in _QKV_NAMES])
            out[f"{loom}attn.qkv.{p}"] = qkv_blocks_to_per_head(blocks, cfg.n_head)
    return out


def _loom_keys(cfg: ModelConfig, layout: EncoderLayout) -> set[str]:
    keys = set(layout.top) | {"wte.weight", "lm_head.weight", "lm_head.bias"}
    return keys | loom_block_keys(cfg)


def _hf_keys(cfg: ModelConfig, layout: EncoderLayout) -> set[str]:
    keys = set(layout.top.values()) | {layout.wte, layout.out_bias}
    return keys | hf_block_keys(cfg, layers=layout.layers)


def encoder_to_hf(state_dict: dict, cfg: ModelConfig, layout: EncoderLayout) -> dict:
    """Loom `Bert` state dict -> HF state dict in `layout` (tied keys included); the Loom
    keys are those of `layout.top`, the vocabulary-sized ones and the blocks."""
    got = set(state_dict)
    if cfg.tie_embeddings:
        got.add("lm_head.weight")  # a tied head may be stored once, as wte
    check_keys(got, _loom_keys(cfg, layout), what=f"Loom {layout.name} state dict")
    wte_VD = state_dict["wte.weight"]
    vocab = hf_rows(cfg, wte_VD.shape[0])
    head_VD = wte_VD if cfg.tie_embeddings else state_dict["lm_head.weight"]
    out = {hf: state_dict[loom] for loom, hf in layout.top.items()}
    out[layout.wte] = wte_VD[:vocab]
    out[layout.decoder] = out[layout.wte] if cfg.tie_embeddings else head_VD[:vocab]
    out[layout.out_bias] = state_dict["lm_head.bias"][:vocab]
    out[layout.decoder_bias] = out[layout.out_bias]
    return out | blocks_to_hf(state_dict, cfg, prefix="", layers=layout.layers)


def encoder_from_hf(state_dict: dict, cfg: ModelConfig, layout: EncoderLayout) -> dict:
    """HF state dict in `layout` -> Loom `Bert` state dict (tied keys included)."""
    sd = {k: v for k, v in state_dict.items() if k not in layout.ignored}
    sd.pop(layout.decoder_bias, None)  # tied to the output bias
    decoder = sd.pop(layout.decoder, None)
    check_keys(set(sd), _hf_keys(cfg, layout), what=f"Hugging Face {layout.name} state dict")
    if decoder is None and not cfg.tie_embeddings:
        raise ConfigError(
            f"model.tie_embeddings=false but the HF state dict has no {layout.decoder}"
        )
    rows = sd[layout.wte].shape[0]
    check_hf_rows(cfg, rows)
    padded = cfg.padded_vocab_size(rows)
    out = {loom: sd[hf] for loom, hf in layout.top.items()}
    out["wte.weight"] = pad_rows(sd[layout.wte], padded)
    out["lm_head.weight"] = out["wte.weight"] if cfg.tie_embeddings else pad_rows(decoder, padded)
    out["lm_head.bias"] = pad_rows(sd[layout.out_bias], padded)
    return out | blocks_from_hf(sd, cfg, prefix="", layers=layout.layers)


def to_hf(state_dict: dict, cfg: ModelConfig) -> dict:
    """Loom `Bert` state dict -> `BertForPreTraining` state dict (tied keys included)."""
    _check_convertible(cfg)
    return encoder_to_hf(state_dict, cfg, _LAYOUT)


def from_hf(state_dict: dict, cfg: ModelConfig) -> dict:
    """`BertForPreTraining` state dict -> Loom `Bert` state dict (tied keys included).

    The result loads with `strict=True` into `build_model(cfg, vocab_size=cfg.padded_vocab_size(V))`
    where V is the HF vocabulary.
    """
    _check_convertible(cfg)
    return encoder_from_hf(state_dict, cfg, _LAYOUT)
