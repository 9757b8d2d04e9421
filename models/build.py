"""Construct a model from its config, and count its parameters."""

from __future__ import annotations

import importlib

from torch import nn

from models.config import ModelConfig

__all__ = ["build_model", "param_counts"]

# family -> "module:Class", each built as Class(cfg, vocab_size=...); imported on use.
_BUILDERS: dict[str, str] = {
    "gpt": "models.gpt:GPT",
    "bert": "models.bert:Bert",
    "t5": "models.t5:T5",
    "glm": "models.glm:GLM",
}


def build_model(cfg: ModelConfig, *, vocab_size: int) -> nn.Module:
    """The model of `cfg.family` with `vocab_size` embedding rows (already padded by the caller).

    Runs on whatever default device is active, so `with torch.device("meta"):` builds a
    full-size model without allocating weights.
    """
    builder = _BUILDERS.get(cfg.family)
    if builder is None:
        raise ValueError(
            f"model.family={cfg.family!r} has no builder; choose one of {sorted(_BUILDERS)}"
        )
    cfg.validate()
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be > 0")
    module, cls = builder.split(":")
    return getattr(importlib.import_module(module), cls)(cfg, vocab_size=vocab_size)


def param_counts(model: nn.Module) -> dict[str, int]:
    """Parameter counts: `total`, `embedding` (token and position tables) and `non_embedding`.

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
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding}
