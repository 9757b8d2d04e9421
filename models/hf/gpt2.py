"""Loom GPT <-> Hugging Face `GPT2LMHeadModel` weights and configs.

Two layouts differ beyond the names:

* HF GPT-2 uses `Conv1D` layers whose weights are stored (in, out), the transpose of
  `nn.Linear`'s (out, in).
* HF's fused `c_attn` output is [q; k; v], each (H, K); Loom's fused `qkv` is per head,
  (H, 3, K), so that a tensor-parallel column shard holds whole heads (see models/blocks.py).

Vocabulary rows: the HF model gets `cfg.vocab_size` rows when that is set, else every row
of the checkpoint (padding included). `to_hf` drops the padded rows beyond it; `from_hf` pads
back to `cfg.padded_vocab_size(rows)` with zero rows (their logits are 0 until trained).

Only what GPT-2 can express is converted: learned (or no) positions, LayerNorm with biases,
biased linears, gelu_tanh / gelu / relu, and heads of width d_model // n_head (anything else
raises ConfigError naming the field). A Loom model with position=none is exported with an
all-zero position table, which computes the same function.

Tokens (`TOKENS`): the causal-LM objective packs documents separated by <eos> and adds
nothing around a text, so an exported tokenizer adds nothing either; the HF config's
eos_token_id and pad_token_id are the tokenizer's <eos> and <pad> when `hf_config` is given
the token ids, so generation stops at <eos>.

Shape legend: D = d_model, H = heads, K = head size, F = MLP inner size, V = vocabulary rows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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

if TYPE_CHECKING:  # transformers is a dev dependency, imported only when converting
    from transformers import GPT2Config

__all__ = ["HF_CLASS", "TOKENS", "from_hf", "hf_config", "loom_config", "to_hf"]

HF_CLASS = "GPT2LMHeadModel"

# Loom activation -> HF `activation_function`. gelu_new is GPT-2's own tanh approximation.
_ACT_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}

TOKENS = TokenConventions(
    roles={"eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "[UNK]"},
    config_ids={"eos_token_id": "<eos>", "pad_token_id": "<pad>"},
)

# Per-block parameters: Loom suffix, HF suffix, how the tensor is laid out on the HF side.
#   copy: identical; t: Conv1D transpose; qkv_w / qkv_b: per-head <-> [q; k; v] (+ transpose).
_BLOCK_MAP = (
    ("ln1.weight", "ln_1.weight", "copy"),
    ("ln1.bias", "ln_1.bias", "copy"),
    ("attn.qkv.weight", "attn.c_attn.weight", "qkv_w"),
    ("attn.qkv.bias", "attn.c_attn.bias", "qkv_b"),
    ("attn.out.weight", "attn.c_proj.weight", "t"),
    ("attn.out.bias", "attn.c_proj.bias", "copy"),
    ("ln2.weight", "ln_2.weight", "copy"),
    ("ln2.bias", "ln_2.bias", "copy"),
    ("mlp.fc_in.weight", "mlp.c_fc.weight", "t"),
    ("mlp.fc_in.bias", "mlp.c_fc.bias", "copy"),
    ("mlp.fc_out.weight", "mlp.c_proj.weight", "t"),
    ("mlp.fc_out.bias", "mlp.c_proj.bias", "copy"),
)
_TOP_MAP = (
    ("wpe.weight", "transformer.wpe.weight"),
    ("ln_f.weight", "transformer.ln_f.weight"),
    ("ln_f.bias", "transformer.ln_f.bias"),
)
# Causal-mask buffers that older transformers versions wrote into GPT-2 checkpoints.
_LEGACY_BUFFERS = (".attn.bias", ".attn.masked_bias")


def _check_exportable(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first field GPT-2 cannot express."""
    problems = {
        "family": (cfg.family == "gpt", "only family=gpt maps to GPT2LMHeadModel"),
        "position": (cfg.position in ("learned", "none"), "GPT-2 has learned positions"),
        "norm": (cfg.norm == "layernorm", "GPT-2 uses LayerNorm"),
        "bias": (cfg.bias, "GPT-2 has biases everywhere"),
        "activation": (cfg.activation in _ACT_TO_HF, f"GPT-2 supports {sorted(_ACT_TO_HF)}"),
        "pre_ln": (cfg.pre_ln, "GPT-2 is pre-LN"),
        "d_kv": (
            cfg.d_kv is None or cfg.d_kv * cfg.n_head == cfg.d_model,
            "GPT-2 heads are d_model // n_head wide",
        ),
    }
    check_fields(cfg, problems, target=HF_CLASS)


def hf_config(
    cfg: ModelConfig, *, vocab_size: int, token_ids: dict[str, int] | None = None
) -> GPT2Config:
    """`GPT2Config` of `cfg` with `vocab_size` rows (normally cfg.vocab_size or the rows).

    `token_ids` (Loom reserved token -> id of the run's tokenizer) sets eos_token_id and
    pad_token_id; without it they are None.
    """
    from transformers import GPT2Config

    _check_exportable(cfg)
    check_vocab_size(vocab_size)
    ids = {"eos_token_id": None, "pad_token_id": None, **TOKENS.config_token_ids(token_ids)}
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.d_ff,
        activation_function=_ACT_TO_HF[cfg.activation],
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=cfg.layer_norm_eps,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        # GPT2Config defaults to GPT-2's own <|endoftext|> id (50256), which means nothing
        # for a Loom tokenizer.
        bos_token_id=None,
        **ids,
    )


def loom_config(hf_cfg: GPT2Config, *, name: str = "gpt2_from_hf") -> ModelConfig:
    """The Loom ModelConfig of an HF `GPT2Config`; raises ConfigError on what Loom lacks."""
    unsupported = {
        "add_cross_attention": False,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
    }
    reject_unsupported(hf_cfg, unsupported, cls="GPT2Config")
    act = known_value(hf_cfg, "activation_function", ACT_FROM_HF, cls="GPT2Config")
    cfg = ModelConfig(
        name=name,
        family="gpt",
        objective="clm",
        vocab_size=hf_cfg.vocab_size,
        n_layer=hf_cfg.n_layer,
        d_model=hf_cfg.n_embd,
        n_head=hf_cfg.n_head,
        d_ff=hf_cfg.n_inner,
        max_seq_len=hf_cfg.n_positions,
        dropout=float(hf_cfg.resid_pdrop),
        layer_norm_eps=float(hf_cfg.layer_norm_epsilon),
        tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", True)),
        init_std=float(hf_cfg.initializer_range),
        activation=ACT_FROM_HF[act],
    )
    cfg.validate()
    return cfg


def _to_hf_tensor(x: torch.Tensor, kind: str, n_head: int) -> torch.Tensor:
    if kind == "qkv_w":
        return qkv_per_head_to_blocks(x, n_head).t().contiguous()
    if kind == "qkv_b":
        return qkv_per_head_to_blocks(x, n_head).contiguous()
    if kind == "t":
        return x.t().contiguous()
    return x


def _from_hf_tensor(x: torch.Tensor, kind: str, n_head: int) -> torch.Tensor:
    if kind == "qkv_w":
        return qkv_blocks_to_per_head(x.t(), n_head).contiguous()
    if kind == "qkv_b":
        return qkv_blocks_to_per_head(x, n_head).contiguous()
    if kind == "t":
        return x.t().contiguous()
    return x


def to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Loom GPT state dict -> `GPT2LMHeadModel` state dict (see the module docstring)."""
    _check_exportable(cfg)
    expected = {"wte.weight", "lm_head.weight", "ln_f.weight", "ln_f.bias"}
    if cfg.position == "learned":
        expected.add("wpe.weight")
    expected |= {f"blocks.{i}.{loom}" for i in range(cfg.n_layer) for loom, _, _ in _BLOCK_MAP}
    got = set(state_dict)
    if "lm_head.weight" not in got and cfg.tie_embeddings:
        got.add("lm_head.weight")  # a tied head may be stored once, as wte
    check_keys(got, expected, what="Loom GPT state dict")

    wte_VD = state_dict["wte.weight"]
    vocab = hf_rows(cfg, wte_VD.shape[0])
    head_VD = wte_VD if cfg.tie_embeddings else state_dict["lm_head.weight"]
    out = {"transformer.wte.weight": wte_VD[:vocab], "lm_head.weight": head_VD[:vocab]}
    for loom, hf in _TOP_MAP:
        if loom in state_dict:
            out[hf] = state_dict[loom]
    if cfg.position == "none":
        # A zero table adds nothing, so HF computes exactly the position-free model.
        out["transformer.wpe.weight"] = wte_VD.new_zeros(cfg.max_seq_len, cfg.d_model)
    for i in range(cfg.n_layer):
        for loom, hf, kind in _BLOCK_MAP:
            x = state_dict[f"blocks.{i}.{loom}"]
            out[f"transformer.h.{i}.{hf}"] = _to_hf_tensor(x, kind, cfg.n_head)
    return out


def _normalise_hf_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept GPT2Model (no `transformer.` prefix) too, and drop legacy mask buffers."""
    out = {}
    for key, value in state_dict.items():
        if key != "lm_head.weight" and not key.startswith("transformer."):
            key = f"transformer.{key}"
        if key.startswith("transformer.h.") and key.endswith(_LEGACY_BUFFERS):
            continue
        out[key] = value
    return out


def from_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`GPT2LMHeadModel` (or `GPT2Model`) state dict -> Loom GPT state dict for `cfg`.

    The result loads with `strict=True` into `build_model(cfg, vocab_size=cfg.padded_vocab_size(V))`
    where V is the HF vocabulary.
    """
    _check_exportable(cfg)
    sd = _normalise_hf_keys(state_dict)
    expected = {"transformer.wte.weight", "transformer.wpe.weight"}
    expected |= {hf for _, hf in _TOP_MAP}
    expected |= {f"transformer.h.{i}.{hf}" for i in range(cfg.n_layer) for _, hf, _ in _BLOCK_MAP}
    got = set(sd) - {"lm_head.weight"}
    check_keys(got, expected, what="Hugging Face GPT-2 state dict")
    if "lm_head.weight" not in sd and not cfg.tie_embeddings:
        raise ConfigError("model.tie_embeddings=false but the HF state dict has no lm_head.weight")

    wte_VD = sd["transformer.wte.weight"]
    rows = wte_VD.shape[0]
    check_hf_rows(cfg, rows)
    padded = cfg.padded_vocab_size(rows)
    wte_VD = pad_rows(wte_VD, padded)
    out = {"wte.weight": wte_VD}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = wte_VD
    else:
        out["lm_head.weight"] = pad_rows(sd["lm_head.weight"], padded)
    for loom, hf in _TOP_MAP:
        out[loom] = sd[hf]
    if cfg.position == "none":
        wpe_TD = out.pop("wpe.weight")
        if torch.count_nonzero(wpe_TD):
            raise ConfigError("model.position=none but the HF position table is not all zeros")
    for i in range(cfg.n_layer):
        for loom, hf, kind in _BLOCK_MAP:
            x = sd[f"transformer.h.{i}.{hf}"]
            out[f"blocks.{i}.{loom}"] = _from_hf_tensor(x, kind, cfg.n_head)
    return out
