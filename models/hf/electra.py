"""Loom `Electra` <-> Hugging Face `transformers.ElectraForPreTraining` (the discriminator)
and `transformers.ElectraForMaskedLM` (the generator).

HF keeps ELECTRA as two models, each with its own copy of the embeddings; Loom's one model
holds the generator and the discriminator with one copy (models/electra.py), as ELECTRA
trains them. So `to_hf` gives the discriminator's state dict, `generator_to_hf` the
generator's (both with the shared tables), and `from_hf` needs both, refusing a pair whose
tables differ. Each network's encoder converts as BERT's (models/hf/bert.py: the fused qkv
split per head; `blocks_to_hf` / `blocks_from_hf`), each under the prefix "electra.", with
its own `embeddings_project` where the embedding width E differs from its hidden width.

Only ELECTRA's published architecture has an HF twin: post-LN, learned positions, LayerNorm
with biases, biased linears, token types, no ALBERT sharing, and the exact GELU
(`ElectraGeneratorPredictions` applies it whatever `hidden_act` says, and Loom's MLM head
applies the blocks' activation). Anything else raises ConfigError naming the field. The HF
configs keep pad_token_id None, as BERT's do (HF would never train that embedding row).

Vocabulary rows as for every family (models/hf/__init__.py): `cfg.vocab_size` rows when set,
else every row of the checkpoint; the generator's decoder and bias follow the word table.

Tokens (`TOKENS`): BERT's, [CLS] A [SEP] (B [SEP]) with token type 1 on B; Loom's electra
objective feeds single segments [CLS] row [SEP].
"""

from __future__ import annotations

import torch

from common.errors import ConfigError
from models.config import ModelConfig
from models.hf.bert import (
    TOKENS,
    blocks_from_hf,
    blocks_to_hf,
    encoder_hf_fields,
    encoder_problems,
    hf_block_keys,
    loom_block_keys,
)
from models.hf.common import check_fields, check_hf_rows, check_keys, hf_rows, pad_rows

__all__ = [
    "EXPORT_NOTES",
    "TOKENS",
    "from_hf",
    "generator_hf_config",
    "generator_to_hf",
    "hf_config",
    "to_hf",
]

EXPORT_NOTES = (
    "ELECTRA's generator is not in this folder: ElectraForPreTraining is the discriminator, "
    "the network ELECTRA fine-tunes. models.hf.electra.generator_to_hf converts the generator "
    "to an ElectraForMaskedLM.",
)

# Loom key under "discriminator." -> HF key under "electra.embeddings.": the shared tables.
_EMBEDDINGS = {
    "wpe.weight": "position_embeddings.weight",
    "tte.weight": "token_type_embeddings.weight",
    "emb_ln.weight": "LayerNorm.weight",
    "emb_ln.bias": "LayerNorm.bias",
}
_WORDS = "electra.embeddings.word_embeddings.weight"
_LAYERS = "electra.encoder.layer."
_PROJECTION = "electra.embeddings_project."
_DISCRIMINATOR_HEAD = {
    "rtd_dense.weight": "discriminator_predictions.dense.weight",
    "rtd_dense.bias": "discriminator_predictions.dense.bias",
    "rtd_head.weight": "discriminator_predictions.dense_prediction.weight",
    "rtd_head.bias": "discriminator_predictions.dense_prediction.bias",
}
_GENERATOR_HEAD = {
    "generator.mlm_dense.weight": "generator_predictions.dense.weight",
    "generator.mlm_dense.bias": "generator_predictions.dense.bias",
    "generator.mlm_ln.weight": "generator_predictions.LayerNorm.weight",
    "generator.mlm_ln.bias": "generator_predictions.LayerNorm.bias",
}
_DECODER, _OUT_BIAS = "generator_lm_head.weight", "generator_lm_head.bias"
# Non-persistent buffers some releases save; they carry nothing Loom needs.
_IGNORED = ("electra.embeddings.position_ids", "electra.embeddings.token_type_ids")


def _check_convertible(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first field the HF ELECTRA models cannot express."""
    problems = {
        "family": (cfg.family == "electra", "only family=electra maps to HF's ELECTRA models"),
        **encoder_problems(cfg, name="ELECTRA"),
        # ELECTRA's embeddings may be narrower than either network (embeddings_project).
        "embedding_size": (True, ""),
        "activation": (cfg.activation == "gelu", "ELECTRA's generator head applies the exact GELU"),
    }
    check_fields(cfg, problems, target="ElectraForPreTraining / ElectraForMaskedLM")


def _projects(cfg: ModelConfig) -> bool:
    """Whether a network of `cfg` has its own E -> D projection (HF's embeddings_project)."""
    return cfg.embedding_size not in (None, cfg.d_model)


def _electra_config(cfg: ModelConfig, *, embedding_size: int, vocab_size: int, **overrides):
    from transformers import ElectraConfig

    fields = {
        **encoder_hf_fields(cfg, vocab_size=vocab_size),
        "embedding_size": embedding_size,
        "max_position_embeddings": cfg.max_seq_len,
        "pad_token_id": None,
    }
    return ElectraConfig(**{**fields, **overrides})


def hf_config(
    cfg: ModelConfig, *, vocab_size: int, token_ids: dict[str, int] | None = None, **overrides
):
    """The `transformers.ElectraConfig` of the discriminator of `cfg` with `vocab_size` rows
    (for ElectraForPreTraining). `overrides` are further ElectraConfig arguments (e.g.
    attn_implementation="eager"); `token_ids` sets nothing, as for BERT."""
    _check_convertible(cfg)
    e = cfg.embedding_size or cfg.d_model
    return _electra_config(cfg, embedding_size=e, vocab_size=vocab_size, **overrides)


def generator_hf_config(cfg: ModelConfig, *, vocab_size: int, **overrides):
    """The `transformers.ElectraConfig` of the generator of `cfg` (for ElectraForMaskedLM)."""
    _check_convertible(cfg)
    gen = cfg.generator_config()
    return _electra_config(
        gen, embedding_size=gen.embedding_size, vocab_size=vocab_size, **overrides
    )


def _loom_keys(cfg: ModelConfig) -> set[str]:
    gen = cfg.generator_config()
    keys = {"discriminator.wte.weight"} | {f"discriminator.{k}" for k in _EMBEDDINGS}
    keys |= set(_DISCRIMINATOR_HEAD) | set(_GENERATOR_HEAD)
    keys |= {"generator.lm_head.weight", "generator.lm_head.bias"}
    for prefix, net in (("discriminator.", cfg), ("generator.", gen)):
        keys |= loom_block_keys(net, prefix=prefix)
        if _projects(net):
            keys |= {f"{prefix}emb_proj.weight", f"{prefix}emb_proj.bias"}
    return keys


def _hf_keys(net: ModelConfig, head: set[str]) -> set[str]:
    """The keys of one HF network of `net`'s shape with the head keys `head`."""
    keys = {_WORDS} | {f"electra.embeddings.{k}" for k in _EMBEDDINGS.values()} | head
    if _projects(net):
        keys |= {f"{_PROJECTION}weight", f"{_PROJECTION}bias"}
    return keys | hf_block_keys(net, layers=_LAYERS)


def _checked_rows(state_dict: dict, cfg: ModelConfig) -> int:
    """The HF vocabulary of a Loom state dict, after checking its keys."""
    got = set(state_dict)
    if cfg.tie_embeddings:
        got.add("generator.lm_head.weight")  # a tied head may be stored once, as the table
    check_keys(got, _loom_keys(cfg), what="Loom ELECTRA state dict")
    return hf_rows(cfg, state_dict["discriminator.wte.weight"].shape[0])


def _network_to_hf(state_dict: dict, net: ModelConfig, *, prefix: str, vocab: int) -> dict:
    """One network's ElectraModel keys: the shared tables, its projection and its blocks."""
    out = {
        f"electra.embeddings.{hf}": state_dict[f"discriminator.{loom}"]
        for loom, hf in _EMBEDDINGS.items()
    }
    out[_WORDS] = state_dict["discriminator.wte.weight"][:vocab]
    if _projects(net):
        for p in ("weight", "bias"):
            out[f"{_PROJECTION}{p}"] = state_dict[f"{prefix}emb_proj.{p}"]
    return out | blocks_to_hf(state_dict, net, prefix=prefix, layers=_LAYERS)


def to_hf(state_dict: dict, cfg: ModelConfig) -> dict:
    """Loom `Electra` state dict -> `ElectraForPreTraining` state dict (the discriminator)."""
    _check_convertible(cfg)
    vocab = _checked_rows(state_dict, cfg)
    out = _network_to_hf(state_dict, cfg, prefix="discriminator.", vocab=vocab)
    return out | {hf: state_dict[loom] for loom, hf in _DISCRIMINATOR_HEAD.items()}


def generator_to_hf(state_dict: dict, cfg: ModelConfig) -> dict:
    """Loom `Electra` state dict -> `ElectraForMaskedLM` state dict (the generator, tied
    decoder included)."""
    _check_convertible(cfg)
    vocab = _checked_rows(state_dict, cfg)
    gen = cfg.generator_config()
    out = _network_to_hf(state_dict, gen, prefix="generator.", vocab=vocab)
    out |= {hf: state_dict[loom] for loom, hf in _GENERATOR_HEAD.items()}
    decoder = None if cfg.tie_embeddings else state_dict["generator.lm_head.weight"][:vocab]
    out[_DECODER] = out[_WORDS] if decoder is None else decoder
    out[_OUT_BIAS] = state_dict["generator.lm_head.bias"][:vocab]
    return out


def _network_from_hf(sd: dict, net: ModelConfig, *, prefix: str) -> dict:
    out = blocks_from_hf(sd, net, prefix=prefix, layers=_LAYERS)
    if _projects(net):
        for p in ("weight", "bias"):
            out[f"{prefix}emb_proj.{p}"] = sd[f"{_PROJECTION}{p}"]
    return out


def from_hf(state_dict: dict, cfg: ModelConfig, *, generator: dict | None = None) -> dict:
    """`ElectraForPreTraining` state dict (the discriminator) and `generator`, the
    `ElectraForMaskedLM` one -> Loom `Electra` state dict (tied keys included).

    Loom's model holds both networks, so a discriminator alone is refused; the two HF
    models must hold the same embeddings (ELECTRA trains one copy). The result loads with
    `strict=True` into `build_model(cfg, vocab_size=cfg.padded_vocab_size(V))`.
    """
    _check_convertible(cfg)
    if generator is None:
        raise ConfigError(
            "an ElectraForPreTraining state dict holds ELECTRA's discriminator only; Loom's "
            "model holds the generator too: convert both (from_hf(..., generator=the "
            "ElectraForMaskedLM state dict))"
        )
    gen_cfg = cfg.generator_config()
    disc = {k: v for k, v in state_dict.items() if k not in _IGNORED}
    gen = {k: v for k, v in generator.items() if k not in _IGNORED}
    decoder = gen.pop(_DECODER, None)
    check_keys(
        set(disc),
        _hf_keys(cfg, set(_DISCRIMINATOR_HEAD.values())),
        what="Hugging Face ELECTRA discriminator state dict",
    )
    gen_head = set(_GENERATOR_HEAD.values()) | {_OUT_BIAS}
    check_keys(
        set(gen), _hf_keys(gen_cfg, gen_head), what="Hugging Face ELECTRA generator state dict"
    )
    shared = [_WORDS, *(f"electra.embeddings.{k}" for k in _EMBEDDINGS.values())]
    for key in shared:
        if not torch.equal(disc[key], gen[key]):
            raise ConfigError(
                f"the discriminator's and the generator's {key} differ; Loom's ELECTRA shares "
                "one copy of the embeddings (convert a pair trained together)"
            )
    if decoder is None and not cfg.tie_embeddings:
        raise ConfigError(f"model.tie_embeddings=false but the HF generator has no {_DECODER}")
    rows = disc[_WORDS].shape[0]
    check_hf_rows(cfg, rows)
    padded = cfg.padded_vocab_size(rows)
    out = {
        f"discriminator.{loom}": disc[f"electra.embeddings.{hf}"]
        for loom, hf in _EMBEDDINGS.items()
    }
    out["discriminator.wte.weight"] = pad_rows(disc[_WORDS], padded)
    out |= {loom: disc[hf] for loom, hf in _DISCRIMINATOR_HEAD.items()}
    out |= _network_from_hf(disc, cfg, prefix="discriminator.")
    out |= _network_from_hf(gen, gen_cfg, prefix="generator.")
    out |= {loom: gen[hf] for loom, hf in _GENERATOR_HEAD.items()}
    words = out["discriminator.wte.weight"]
    out["generator.lm_head.weight"] = words if cfg.tie_embeddings else pad_rows(decoder, padded)
    out["generator.lm_head.bias"] = pad_rows(gen[_OUT_BIAS], padded)
    return out
