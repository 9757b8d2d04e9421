"""Conversion between Loom checkpoints and Hugging Face `transformers` models, by family.

Each conversion module (`models.hf.gpt2`, `models.hf.bert`, `models.hf.roberta`,
`models.hf.distilbert`, `models.hf.t5`, `models.hf.switch`, `models.hf.electra`,
`models.hf.bart`, `models.hf.xlnet`) defines
`hf_config(cfg, *, vocab_size, token_ids=None)`, `to_hf(state_dict, cfg)`,
`from_hf(state_dict, cfg)` and `TOKENS` (its tokenizer conventions, a
`models.hf.common.TokenConventions`), and may define `build_hf_model(cfg, *, vocab_size,
token_ids=None)` (when the plain class of `hf_config` needs adjusting, e.g. an untied T5 head)
and `loom_config(hf_config, *, name)` (the reverse of `hf_config`), and `EXPORT_NOTES` (what
an export leaves out, for the folder's README: ELECTRA exports its discriminator, an
ElectraForPreTraining, without the generator). What the families share
lives in `models.hf.common`; `models.hf.tokenizer` writes a run's tokenizer in the form
`transformers` loads. Modules and `transformers` (a dev dependency) are imported on first use.

A family converts to one HF model, save where the Loom config says otherwise: a T5 with
mixture-of-experts layers is a Switch Transformer, and a BERT without the sentence-pair head
(`model.pair_head=false`) is a RoBERTa (`RobertaForMaskedLM`; BertForPreTraining needs the NSP
head), or a DistilBERT (`DistilBertForMaskedLM`) when it has no token types either
(`model.type_vocab_size=0`). The functions below take the family and, where it decides the
model, the Loom config (or, from the HF side, the HF config, whose `model_type` names the
model).

Training-only modules: a Loom checkpoint may hold modules that only training uses and no HF
model has (`TRAINING_ONLY`: the `distill_proj.*` projections of TinyBERT-style distillation in
family bert); `to_hf` drops them (`drop_training_only`) before the family converts the rest.

Vocabulary rows, for every family: the HF model has `cfg.vocab_size` rows when that is set,
else all the rows of the Loom checkpoint (padding included). `to_hf` drops Loom's padded rows
beyond that; `from_hf` pads back to `cfg.padded_vocab_size(rows)`.

`token_ids` maps Loom's reserved tokens (<eos>, <pad>, ...) to the ids of the run's tokenizer;
with it the HF config carries the family's token ids (eos, pad, decoder start), without it
the family's defaults. An unknown family, or a config or state dict the family cannot convert,
raises `ConfigError` naming the field.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from common.errors import ConfigError
from models.config import ModelConfig

__all__ = [
    "TRAINING_ONLY",
    "build_hf_model",
    "drop_training_only",
    "export_notes",
    "family_of",
    "from_hf",
    "hf_config",
    "hf_model_class",
    "loom_config",
    "read_hf_folder",
    "to_hf",
    "token_conventions",
]

# HF model -> (conversion module, transformers class); a family's default model has its name.
_MODELS: dict[str, tuple[str, str]] = {
    "gpt": ("models.hf.gpt2", "GPT2LMHeadModel"),
    "bert": ("models.hf.bert", "BertForPreTraining"),
    "roberta": ("models.hf.roberta", "RobertaForMaskedLM"),
    "distilbert": ("models.hf.distilbert", "DistilBertForMaskedLM"),
    "t5": ("models.hf.t5", "T5ForConditionalGeneration"),
    "switch": ("models.hf.switch", "SwitchTransformersForConditionalGeneration"),
    "electra": ("models.hf.electra", "ElectraForPreTraining"),
    "bart": ("models.hf.bart", "BartForConditionalGeneration"),
    "xlnet": ("models.hf.xlnet", "XLNetLMHeadModel"),
}
_FAMILIES = ("bert", "gpt", "t5", "electra", "bart", "xlnet")
_NO_COUNTERPART = {
    "glm": "GLM (Du et al. 2022) has no Hugging Face transformers implementation to convert to",
}
# HF `model_type` of a config.json -> (Loom family, HF model).
_MODEL_TYPES = {
    "gpt2": ("gpt", "gpt"),
    "bert": ("bert", "bert"),
    "roberta": ("bert", "roberta"),
    "distilbert": ("bert", "distilbert"),
    "t5": ("t5", "t5"),
    "switch_transformers": ("t5", "switch"),
    "electra": ("electra", "electra"),
    "bart": ("bart", "bart"),
    "xlnet": ("xlnet", "xlnet"),
}
# Family -> key prefixes of modules that only training uses (no HF model has them).
TRAINING_ONLY: dict[str, tuple[str, ...]] = {
    "bert": ("distill_proj.",),  # TinyBERT-style distillation's learned projections
}


def _model(family: str, cfg: ModelConfig | None = None, hf_cfg: Any = None) -> str:
    """The HF model (a key of _MODELS) that `family` converts to, given the Loom config or,
    from the HF side, the HF config: a T5 with experts is Switch, a BERT without the pair
    head RoBERTa, and without token types either DistilBERT."""
    if family in _NO_COUNTERPART:
        raise ConfigError(f"model.family={family!r}: {_NO_COUNTERPART[family]}")
    if family not in _FAMILIES:
        raise ConfigError(
            f"model.family={family!r} has no Hugging Face conversion; "
            f"choose one of {sorted(_FAMILIES)}"
        )
    if cfg is not None:
        if family == "t5" and cfg.moe.enabled:
            return "switch"
        if family == "bert" and not cfg.has_pair_head:
            return "distilbert" if cfg.type_vocab_size == 0 else "roberta"
    elif hf_cfg is not None:
        found = _MODEL_TYPES.get(getattr(hf_cfg, "model_type", None))
        if found is not None and found[0] == family:
            return found[1]
    return family


def _module(family: str, cfg: ModelConfig | None = None, hf_cfg: Any = None) -> ModuleType:
    name = _MODELS[_model(family, cfg, hf_cfg)][0]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
        raise ConfigError(f"model.family={family!r}: conversion module {name} is missing") from err


def hf_model_class(family: str, cfg: ModelConfig | None = None, *, hf_cfg: Any = None) -> type:
    """The `transformers` model class a family converts to (GPT2LMHeadModel, ...; given its
    Loom or HF config, a T5 with experts converts to SwitchTransformers and a BERT without
    the pair head to RobertaForMaskedLM, or without token types either to
    DistilBertForMaskedLM)."""
    import transformers

    return getattr(transformers, _MODELS[_model(family, cfg, hf_cfg)][1])


def hf_config(
    family: str, cfg: ModelConfig, *, vocab_size: int, token_ids: dict[str, int] | None = None
) -> Any:
    """The `transformers` config of `cfg` with `vocab_size` vocabulary rows."""
    module = _module(family, cfg)
    return module.hf_config(cfg, vocab_size=vocab_size, token_ids=token_ids)


def build_hf_model(
    family: str, cfg: ModelConfig, *, vocab_size: int, token_ids: dict[str, int] | None = None
) -> torch.nn.Module:
    """A freshly initialised HF model of `cfg` (on the current default device, meta works)."""
    module = _module(family, cfg)
    if hasattr(module, "build_hf_model"):
        return module.build_hf_model(cfg, vocab_size=vocab_size, token_ids=token_ids)
    config = module.hf_config(cfg, vocab_size=vocab_size, token_ids=token_ids)
    return hf_model_class(family, cfg)(config)


def token_conventions(family: str, cfg: ModelConfig | None = None) -> Any:
    """The `TokenConventions` of the family (of the model `cfg` converts to, when given):
    tokenizer roles, added tokens, config token ids."""
    return _module(family, cfg).TOKENS


def export_notes(family: str, cfg: ModelConfig) -> list[str]:
    """What an export of `cfg` leaves out, for the folder's README (ELECTRA: its generator)."""
    return list(getattr(_module(family, cfg), "EXPORT_NOTES", ()))


def drop_training_only(family: str, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` without the family's training-only modules (`TRAINING_ONLY`)."""
    prefixes = TRAINING_ONLY.get(family)
    if not prefixes:
        return state_dict
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


def to_hf(
    family: str, state_dict: dict[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """Loom state dict -> state dict of `hf_model_class(family)`; training-only modules
    (`TRAINING_ONLY`) are dropped first."""
    return _module(family, cfg).to_hf(drop_training_only(family, state_dict), cfg)


def from_hf(
    family: str, state_dict: dict[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """State dict of `hf_model_class(family)` -> Loom state dict for `cfg`."""
    return _module(family, cfg).from_hf(state_dict, cfg)


def loom_config(family: str, hf_cfg: Any, *, name: str | None = None) -> ModelConfig:
    """Loom ModelConfig equivalent to an HF config, where the family module can derive it."""
    module = _module(family, hf_cfg=hf_cfg)
    if not hasattr(module, "loom_config"):
        raise ConfigError(
            f"{module.__name__} cannot derive a Loom config from a Hugging Face one; "
            "pass the Loom model config explicitly"
        )
    return module.loom_config(hf_cfg, name=name or f"{hf_cfg.model_type}_from_hf")


def read_hf_folder(
    path: Path, *, cfg: ModelConfig | None = None, name: str | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(Loom config, Loom state dict) of a Hugging Face model folder (config.json and its
    weights), read offline; `cfg` overrides the config derived from config.json."""
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ConfigError(
            f"{path / 'config.json'} does not exist (not a Hugging Face model folder)"
        )
    hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    family = family_of(hf_cfg)
    cfg = cfg if cfg is not None else loom_config(family, hf_cfg, name=name)
    model = hf_model_class(family, hf_cfg=hf_cfg).from_pretrained(path, local_files_only=True)
    return cfg, from_hf(family, model.state_dict(), cfg)


def family_of(hf_cfg: Any) -> str:
    """Loom family of an HF config, from its `model_type`."""
    model_type = getattr(hf_cfg, "model_type", None)
    if model_type not in _MODEL_TYPES:
        raise ConfigError(
            f"Hugging Face model_type={model_type!r} has no Loom family; "
            f"supported: {sorted(_MODEL_TYPES)}"
        )
    return _MODEL_TYPES[model_type][0]
