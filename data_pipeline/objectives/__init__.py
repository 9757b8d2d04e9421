"""Pretraining objectives: batch transforms from packed rows to model inputs and labels.

Contract
--------
Input, one micro-batch from the loader:
    tokens      int64 [B, S]   packed rows, S = seq_len + 1
    sample_ids  int64 [B]      global sample index of each row (unique over the run)
    doc_start   bool  [B, S]   True where a document begins inside the row

Output, a dict of tensors. Keys ending in "labels" are targets (IGNORE_INDEX = -100 is not
scored); every other key is a keyword argument of the model's forward. The model returns
logits (a tensor, scored against "labels") or a dict in which "<x>logits" is scored
against "<x>labels" (e.g. "nsp_logits" against "nsp_labels"). The trainer sums the
cross-entropy of each pair over the global batch and divides by that pair's global count
of scored targets, so every task is a mean over its own targets whatever the layout. A
model that decides a task's targets itself returns them as "<x>targets" (ELECTRA's
replaced tokens, drawn from its generator): "<x>labels" then only mark the scored
positions (see trainer/loss.py).

Randomness (masks, spans, pairs) is a pure function of (seed, sample id) via
`sample_rng`, so a resumed run or another worker count sees the very same batches.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np
import torch

from common.errors import ConfigError
from data_pipeline.config import DataConfig

IGNORE_INDEX = -100
Objective = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]

# name -> "module:Class"; each class is built as Class(name, cfg=, tokenizer=, seq_len=, seed=).
_REGISTRY = {
    "clm": "data_pipeline.objectives.clm:CausalLM",
    "mlm": "data_pipeline.objectives.mlm:MaskedLM",
    "mlm_nsp": "data_pipeline.objectives.mlm:MaskedLM",
    "mlm_sop": "data_pipeline.objectives.mlm:MaskedLM",
    "mlm_struct": "data_pipeline.objectives.structbert:StructuralLM",
    "mlm_sbo": "data_pipeline.objectives.sbo:SpanBoundaryLM",
    "span_corruption": "data_pipeline.objectives.span_corruption:SpanCorruption",
    "glm_blank": "data_pipeline.objectives.glm:BlankInfilling",
    "unilm": "data_pipeline.objectives.unilm:UnifiedLM",
    "electra": "data_pipeline.objectives.electra:ReplacedTokenDetection",
    "denoising": "data_pipeline.objectives.denoising:Denoising",
    "mass": "data_pipeline.objectives.mass:MaskedSeq2Seq",
    "plm": "data_pipeline.objectives.plm:PermutationLM",
}


def sample_rng(seed: int, sample_id: int, *, salt: int = 0) -> np.random.Generator:
    """The random stream of one sample: depends on nothing but its arguments."""
    return np.random.Generator(np.random.PCG64([seed, int(sample_id), salt]))


def special_id(tokenizer, token: str) -> int:
    """The id of special token `token`; ValueError naming it when the tokenizer lacks it."""
    try:
        return int(tokenizer.special_tokens[token])
    except KeyError:
        raise ValueError(f"the tokenizer lacks the special token {token}") from None


def random_token_ids(tokenizer) -> np.ndarray:
    """int64: the ids a random replacement draws from, uniformly: every id of the vocabulary
    that is not a special token (as mlm's random replacements)."""
    v = tokenizer.vocab_size
    is_special = np.zeros(v, dtype=bool)
    is_special[[i for i in tokenizer.special_tokens.values() if i < v]] = True
    return np.flatnonzero(~is_special).astype(np.int64)


def _factory(name: str):
    if name not in _REGISTRY:
        raise ConfigError(f"data.objective={name!r} is unknown; choose one of {sorted(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        raise ConfigError(f"data.objective={name!r} is not available in this version") from None


def row_length(name: str, *, cfg: DataConfig, seq_len: int) -> int:
    """Tokens per packed row the objective consumes to produce seq_len model tokens.

    Most objectives read seq_len + 1 (inputs plus one shifted label); T5's span corruption
    reads a longer raw window, since its spans collapse into sentinels.
    """
    factory = _factory(name)
    if hasattr(factory, "row_length"):
        return int(factory.row_length(cfg, seq_len))
    return seq_len + 1


def target_length(name: str, *, cfg: DataConfig, seq_len: int) -> int | None:
    """Targets per sample where the objective fixes their number apart from seq_len: an
    encoder-decoder's decoder tokens, XLNet's predicted positions (None for the others)."""
    factory = _factory(name)
    if hasattr(factory, "target_length"):
        return int(factory.target_length(cfg, seq_len))
    return None


def build_objective(name: str, *, cfg: DataConfig, tokenizer, seq_len: int, seed: int) -> Objective:
    """The batch transform named by data.objective (or model.objective)."""
    return _factory(name)(name, cfg=cfg, tokenizer=tokenizer, seq_len=seq_len, seed=seed)


def split_batch(batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(model inputs, labels) of an objective's output."""
    inputs = {k: v for k, v in batch.items() if not k.endswith("labels")}
    labels = {k: v for k, v in batch.items() if k.endswith("labels")}
    return inputs, labels


__all__ = [
    "IGNORE_INDEX",
    "Objective",
    "build_objective",
    "random_token_ids",
    "row_length",
    "sample_rng",
    "special_id",
    "split_batch",
    "target_length",
]
