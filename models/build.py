"""Construct a model from its config, and count its parameters."""

from __future__ import annotations

import importlib

from torch import nn

from common.errors import ConfigError
from models.config import ModelConfig
from models.moe import moe_layers

__all__ = ["build_model", "check_pipeline_split", "model_class", "param_counts"]

# family -> "module:Class", each built as Class(cfg, vocab_size=...); imported on use.
_BUILDERS: dict[str, str] = {
    "gpt": "models.gpt:GPT",
    "bert": "models.bert:Bert",
    "t5": "models.t5:T5",
    "glm": "models.glm:GLM",
    "electra": "models.electra:Electra",
    "bart": "models.bart:Bart",
    "xlnet": "models.xlnet:XLNet",
}


def model_class(family: str) -> type[nn.Module]:
    """The class of `family`'s model, imported on first use."""
    builder = _BUILDERS.get(family)
    if builder is None:
        raise ConfigError(
            f"model.family={family!r} has no builder; choose one of {sorted(_BUILDERS)}"
        )
    module, cls = builder.split(":")
    return getattr(importlib.import_module(module), cls)


def build_model(cfg: ModelConfig, *, vocab_size: int) -> nn.Module:
    """The model of `cfg.family` with `vocab_size` embedding rows (already padded by the caller).

    Runs on whatever default device is active, so `with torch.device("meta"):` builds a
    full-size model without allocating weights.
    """
    cls = model_class(cfg.family)
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be > 0")
    return cls(cfg, vocab_size=vocab_size)


def check_pipeline_split(cfg: ModelConfig, *, pp: int, virtual_stages: int) -> None:
    """ConfigError naming the fields unless the model splits into pp x virtual_stages stages.

    A model class that can be pipelined names its first-stage and last-stage modules
    (`pipeline_first`, `pipeline_last`); one that cannot says why (`pipeline_refusal`).
    """
    cls = model_class(cfg.family)
    if getattr(cls, "pipeline_first", None) is None:
        raise ConfigError(
            f"model.family={cfg.family!r} cannot be pipelined ({cls.pipeline_refusal}); "
            "set parallel.pp=1"
        )
    if cfg.share_layers:
        raise ConfigError(
            "model.share_layers=True (ALBERT) applies one block n_layer times, so its layers "
            "cannot be split into pipeline stages; set parallel.pp=1 or model.share_layers=false"
        )
    stages = pp * virtual_stages
    if cfg.n_layer % stages:
        raise ConfigError(
            f"model.n_layer={cfg.n_layer} is not divisible by parallel.pp={pp} x "
            f"parallel.virtual_stages={virtual_stages} = {stages} pipeline stages"
        )


def param_counts(model: nn.Module) -> dict[str, int]:
    """Parameter counts: `total`, `embedding` (token and position tables), `non_embedding`,
    `expert` (the stacked weights of mixture-of-experts layers) and `active` (what one token
    meets: every expert parameter counts top_k / E of itself).

    Shared (tied) parameters are counted once, so a tied output head adds nothing. An untied
    output head is a matmul weight and counts as non-embedding, as in Kaplan et al. (2020).
    """
    params = {id(p): p for p in model.parameters()}
    embedding_ids = {
        id(p)
        for module in model.modules()
        if isinstance(module, nn.Embedding)
        for p in module.parameters(recurse=False)
    }
    total = sum(p.numel() for p in params.values())
    embedding = sum(params[i].numel() for i in embedding_ids if i in params)
    expert, active_expert = 0, 0.0
    for _, layer in moe_layers(model):
        n = sum(p.numel() for p in layer.experts.parameters())
        expert += n
        active_expert += n * layer.cfg.top_k / layer.num_experts
    return {
        "total": total,
        "embedding": embedding,
        "non_embedding": total - embedding,
        "expert": expert,
        "active": total - expert + round(active_expert),
    }
