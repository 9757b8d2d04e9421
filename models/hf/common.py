"""What the family converters of `models.hf` share: field checks, key checks, vocabulary rows,
the fused-qkv layout and the tokenizer conventions a family writes into an exported folder.

Every failure here is a `ConfigError` (a `ValueError`) naming the field, key or value: the
Loom config and the weights or the Hugging Face config do not fit together.

Shape legend: H = heads, K = head size, V = vocabulary rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from common.errors import ConfigError
from models.config import ModelConfig

__all__ = [
    "ACT_FROM_HF",
    "TokenConventions",
    "check_fields",
    "check_hf_rows",
    "check_keys",
    "check_vocab_size",
    "hf_rows",
    "pad_rows",
    "qkv_blocks_to_per_head",
    "qkv_per_head_to_blocks",
    "reject_leftovers",
    "reject_unsupported",
    "take",
]

# HF activation names -> Loom activation. gelu_new, gelu_pytorch_tanh and gelu_fast are three
# spellings of the tanh approximation.
ACT_FROM_HF = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}


def check_fields(
    cfg: ModelConfig, problems: Mapping[str, tuple[bool, str]], *, target: str
) -> None:
    """Raise naming the first `model.<key>` whose check failed: {key: (ok, why)}."""
    for key, (ok, why) in problems.items():
        if not ok:
            raise ConfigError(
                f"model.{key}={getattr(cfg, key)!r} cannot be converted to {target}: {why}"
            )


def reject_unsupported(hf_cfg: Any, accepted: Mapping[str, object], *, cls: str) -> None:
    """Raise naming the first HF config field whose value Loom has no equivalent for."""
    for key, value in accepted.items():
        if getattr(hf_cfg, key, value) != value:
            raise ConfigError(f"{cls}.{key}={getattr(hf_cfg, key)!r} has no Loom equivalent")


def known_value(hf_cfg: Any, key: str, table: Mapping[str, object], *, cls: str) -> Any:
    """HF config field `key`, checked to be one of `table`'s keys (e.g. the activations Loom
    has): ConfigError naming the field and the supported values otherwise."""
    value = getattr(hf_cfg, key)
    if value not in table:
        raise ConfigError(
            f"{cls}.{key}={value!r} has no Loom equivalent; supported: {sorted(table)}"
        )
    return value


def check_keys(got: set[str], expected: set[str], *, what: str) -> None:
    """Raise listing (the first 8) missing and unexpected keys of a state dict."""
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    if missing or unexpected:
        raise ConfigError(
            f"{what} does not match the config: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}"
        )


def take(state: dict[str, torch.Tensor], key: str, *, side: str) -> torch.Tensor:
    """Pop `key` from a state dict of `side` ("Loom" or "Hugging Face"), naming it if absent."""
    if key not in state:
        raise ConfigError(f"{side} state dict has no {key!r}; does it match this model config?")
    return state.pop(key)


def reject_leftovers(state: dict[str, torch.Tensor], *, side: str) -> None:
    """Raise naming the keys of `side`'s state dict that no conversion rule consumed."""
    if state:
        names = sorted(state)
        raise ConfigError(f"{side} state dict has {len(names)} unexpected keys, e.g. {names[:5]}")


def check_vocab_size(vocab_size: int) -> None:
    if vocab_size <= 0:
        raise ConfigError(f"vocab_size={vocab_size} must be > 0")


def hf_rows(cfg: ModelConfig, rows: int) -> int:
    """Vocabulary rows of the HF model made from a Loom checkpoint with `rows` rows:
    `cfg.vocab_size` when set (the padded rows are dropped), else all of them."""
    vocab = cfg.vocab_size if cfg.vocab_size is not None else rows
    if vocab > rows:
        raise ConfigError(
            f"model.vocab_size={vocab} exceeds the checkpoint's {rows} embedding rows"
        )
    return vocab


def check_hf_rows(cfg: ModelConfig, rows: int) -> None:
    """An HF model of `rows` vocabulary rows must have exactly `cfg.vocab_size` when set."""
    if cfg.vocab_size is not None and cfg.vocab_size != rows:
        raise ConfigError(f"model.vocab_size={cfg.vocab_size} but the HF model has {rows} rows")


def pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` with zero rows appended up to `rows` (Loom's padded vocabulary; logits 0 there)."""
    pad = rows - x.shape[0]
    return torch.cat([x, x.new_zeros(pad, *x.shape[1:])]) if pad else x


def qkv_per_head_to_blocks(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows (H, 3, K) -> (3, H, K): Loom's fused qkv (per head, so that a tensor-parallel
    shard holds whole heads; see models/blocks.py) to [q; k; v]. Works for weights and biases."""
    return w.reshape(n_head, 3, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


def qkv_blocks_to_per_head(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows (3, H, K) -> (H, 3, K): the inverse of `qkv_per_head_to_blocks`."""
    return w.reshape(3, n_head, -1, *w.shape[1:]).transpose(0, 1).reshape(w.shape)


@dataclass(frozen=True)
class TokenConventions:
    """How a family's Loom objective lays out special tokens, for an exported tokenizer.

    Token names are Loom's reserved tokens (data_pipeline/tokenizers.py, SPECIAL_TOKENS).
    """

    roles: dict[str, str]
    """transformers tokenizer attribute (eos_token, mask_token, ...) -> Loom token."""
    single: tuple[str, ...] | None = None
    """What the tokenizer adds around one text, as a `tokenizers` TemplateProcessing
    template ($A is the text); None adds nothing."""
    pair: tuple[str, ...] | None = None
    """The same for a pair of texts ($A, $B; ":1" marks token type 1)."""
    config_ids: dict[str, str] = field(default_factory=dict)
    """HF model config field (eos_token_id, ...) -> Loom token whose id it takes."""
    input_names: tuple[str, ...] = ("input_ids", "attention_mask")
    """What the tokenizer returns (BERT adds token_type_ids)."""

    def config_token_ids(self, token_ids: Mapping[str, int] | None) -> dict[str, int]:
        """The config fields of `config_ids`, given Loom token -> id ({} without ids)."""
        if not token_ids:
            return {}
        missing = sorted(set(self.config_ids.values()) - set(token_ids))
        if missing:
            raise ConfigError(f"the tokenizer has no {missing} token, which the config needs")
        return {key: int(token_ids[name]) for key, name in self.config_ids.items()}
