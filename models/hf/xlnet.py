"""Hugging Face interop for `models.xlnet.XLNet`: configs and state-dict name mapping.

`to_hf` / `from_hf` rename parameters between Loom's layout (`blocks.3.attn.q`,
`blocks.3.mlp.fc_in`, `lm_head`) and `transformers.XLNetLMHeadModel`'s
(`transformer.layer.3.rel_attn.q`, `transformer.layer.3.ff.layer_1`, `lm_loss`). Both are
post-LN with the same parameters; only the layout of the attention projections differs:
Hugging Face keeps q, k, v, r and o as (d_model, n_head, d_head) tensors used by einsum,
Loom as linear layers, so q, k, v, r are transposed ((H K, D) = HF's reshaped (D, H K)
transposed) and o is HF's reshaped as is. `mask_emb` is (1, 1, D) there and (D,) here.
Nothing is rebuilt but padded vocabulary rows, so both counts are equal: 116,750,336
parameters for xlnet_base and 360,300,800 for xlnet_large (the output bias, HF's
`lm_loss.bias`, included; the tied head weight counted once).

Attention type: XLNetConfig.attn_type "bi" is XLNet (attention as perm_mask says), "uni"
Transformer-XL (always causal, perm_mask added on top). Loom's XLNet is causal exactly when
neither perm_mask nor target positions are given, so the two HF types describe one Loom
model used two ways. `hf_config` writes "uni" for a model whose objective is clm (the HF
model is then causal without a perm_mask, as Loom's) and "bi" otherwise; `loom_config`
reads "uni" as objective clm and "bi" as plm.

Memory: Loom's `model.mem_len` is XLNetConfig.mem_len (0 <-> None) and use_mems_eval /
use_mems_train are set when it is > 0. Hugging Face with mem_len=None keeps every past
position when asked to use memory; Loom with mem_len 0 returns none. Loom has no
`reuse_len` (XLNet's pretraining cache of the first positions only), `bi_data` (a batch
half in reverse order) or `same_length` (every query the same number of keys):
`loom_config` refuses them. clamp_len: Hugging Face clamps when it is > 0, Loom reads -1 as
no clamping, so 0 comes back as -1.

Differences outside the weights: a query-stream row allowed no key at all (the first of
a factorisation order, without memory) attends nowhere in Loom (output zero) but uniformly
to every key, its own content included, in Hugging Face; the query stream never sees its
own position in Loom even if perm_mask allows it. With dropout > 0 Hugging Face also drops
the MLP's activations, which Loom does not (`hf_config` cannot switch that off): training
differs, evaluation does not. Loom's max_seq_len bounds a segment; Hugging Face has no
bound, and `loom_config` sets 512 (XLNet's pretraining length).

Tokens (`TOKENS`): the plm objective (data_pipeline/objectives/plm.py) lays a row out as
XLNet does, `A [SEP] [CLS]` with token type 2 on [CLS] (its segment ids only matter by
equality), so an exported tokenizer ends a text with [SEP] [CLS] and a pair as XLNet's
`A [SEP] B [SEP] [CLS]` (types 0, 1, 2), and returns token_type_ids; the HF config's eos and
pad ids are the tokenizer's <eos> and <pad> (bos None). A Transformer-XL (objective clm)
read packed rows with nothing added, so its users encode with add_special_tokens=False
(`EXPORT_NOTES`).

Configs XLNetLMHeadModel cannot express raise ConfigError naming the field: heads whose
size is not d_model / n_head (model.d_kv), a gated MLP.

Shape legend: V vocabulary rows, D model width, H heads, K head size.
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
    check_vocab_size,
    hf_rows,
    known_value,
    pad_rows,
    reject_leftovers,
    reject_unsupported,
    take,
)

__all__ = [
    "EXPORT_NOTES",
    "LOOM_MAX_SEQ_LEN",
    "TOKENS",
    "from_hf",
    "hf_config",
    "loom_config",
    "to_hf",
]

# Loom activation -> XLNetConfig.ff_activation (gelu_new: the tanh approximation).
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}
# max_seq_len of a Loom config read from Hugging Face, which has no bound: XLNet's
# pretraining segment length.
LOOM_MAX_SEQ_LEN = 512

TOKENS = TokenConventions(
    roles={
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "cls_token": "[CLS]",
    },
    single=("$A", "[SEP]", "[CLS]:2"),
    pair=("$A", "[SEP]", "$B:1", "[SEP]:1", "[CLS]:2"),
    config_ids={"eos_token_id": "<eos>", "pad_token_id": "<pad>"},
    input_names=("input_ids", "token_type_ids", "attention_mask"),
)
EXPORT_NOTES = (
    "The tokenizer ends each text with [SEP] [CLS], the layout of the plm objective; a "
    "model trained with objective clm (Transformer-XL) never saw them: encode its text with "
    "add_special_tokens=False.",
)

EMBEDDING = "transformer.word_embedding.weight"
MASK_EMB = "transformer.mask_emb"
HEAD, HEAD_BIAS = "lm_loss.weight", "lm_loss.bias"
# (D, H, K) projections: q, k, v, r are applied as x @ W, o as y @ W^T.
_INPUT_PROJECTIONS = ("q", "k", "v", "r")
_PER_HEAD = ("r_w_bias", "r_r_bias", "r_s_bias", "seg_embed")
# Loom module -> HF module inside one block (each a weight and a bias).
_AFFINE = {
    "ln_attn": "rel_attn.layer_norm",
    "mlp.fc_in": "ff.layer_1",
    "mlp.fc_out": "ff.layer_2",
    "ln_mlp": "ff.layer_norm",
}


def _check(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first field XLNetLMHeadModel cannot express."""
    problems = {
        "family": (cfg.family == "xlnet", "only family=xlnet maps to XLNetLMHeadModel"),
        "activation": (cfg.activation in _ACT_TO_HF, f"XLNet supports {sorted(_ACT_TO_HF)}"),
        "d_kv": (
            cfg.d_kv is None or cfg.d_kv * cfg.n_head == cfg.d_model,
            "XLNetConfig requires d_head = d_model // n_head",
        ),
    }
    check_fields(cfg, problems, target="XLNetLMHeadModel")


def hf_config(
    cfg: ModelConfig, *, vocab_size: int, token_ids: dict[str, int] | None = None, **overrides
):
    """`transformers.XLNetConfig` of the same architecture with `vocab_size` rows.

    `token_ids` (Loom reserved token -> id of the run's tokenizer) sets the eos and pad ids
    (see `TOKENS`); bos_token_id is None either way. `overrides` are further XLNetConfig
    arguments.
    """
    from transformers import XLNetConfig

    _check(cfg)
    check_vocab_size(vocab_size)
    memory = cfg.mem_len > 0
    fields = {
        "vocab_size": vocab_size,
        "d_model": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "d_inner": cfg.ffn_size,
        "ff_activation": _ACT_TO_HF[cfg.activation],
        "attn_type": "uni" if cfg.objective == "clm" else "bi",
        "initializer_range": cfg.init_std,
        "layer_norm_eps": cfg.layer_norm_eps,
        "dropout": cfg.dropout,
        "mem_len": cfg.mem_len if memory else None,
        "reuse_len": None,
        "use_mems_eval": memory,
        "use_mems_train": memory,
        "bi_data": False,
        "clamp_len": cfg.clamp_len,
        "same_length": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": None,
        **TOKENS.config_token_ids(token_ids),
    }
    return XLNetConfig(**{**fields, **overrides})


def loom_config(hf_cfg, *, name: str = "xlnet_from_hf") -> ModelConfig:
    """The Loom ModelConfig of an HF `XLNetConfig`; raises ConfigError on what Loom lacks.

    Objective clm for attn_type "uni", plm for "bi"; max_seq_len LOOM_MAX_SEQ_LEN (see the
    module docstring).
    """
    accepted = {"reuse_len": None, "bi_data": False, "same_length": False}
    reject_unsupported(hf_cfg, accepted, cls="XLNetConfig")
    act = known_value(hf_cfg, "ff_activation", ACT_FROM_HF, cls="XLNetConfig")
    if hf_cfg.attn_type not in ("bi", "uni"):
        raise ConfigError(f"XLNetConfig.attn_type={hf_cfg.attn_type!r} must be 'bi' or 'uni'")
    cfg = ModelConfig(
        name=name,
        family="xlnet",
        objective="clm" if hf_cfg.attn_type == "uni" else "plm",
        vocab_size=hf_cfg.vocab_size,
        n_layer=hf_cfg.n_layer,
        d_model=hf_cfg.d_model,
        n_head=hf_cfg.n_head,
        d_ff=hf_cfg.d_inner,
        max_seq_len=LOOM_MAX_SEQ_LEN,
        dropout=float(hf_cfg.dropout),
        layer_norm_eps=float(hf_cfg.layer_norm_eps),
        tie_embeddings=bool(hf_cfg.tie_word_embeddings),
        init_std=float(hf_cfg.initializer_range),
        pre_ln=False,
        activation=ACT_FROM_HF[act],
        position="relative_xl",
        mem_len=hf_cfg.mem_len or 0,
        clamp_len=hf_cfg.clamp_len if hf_cfg.clamp_len > 0 else -1,
    )
    cfg.validate()
    return cfg


def _pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(Loom name, HF name) of the parameters that map unchanged: norms, MLP, attention
    biases and segment encodings."""
    pairs = []
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}", f"transformer.layer.{i}"
        for m, h in _AFFINE.items():
            pairs += [(f"{ours}.{m}.{p}", f"{theirs}.{h}.{p}") for p in ("weight", "bias")]
        pairs += [(f"{ours}.attn.{p}", f"{theirs}.rel_attn.{p}") for p in _PER_HEAD]
    return pairs


def _projections(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(Loom name, HF name, transposed) of each attention projection."""
    out = []
    for i in range(cfg.n_layer):
        ours, theirs = f"blocks.{i}.attn", f"transformer.layer.{i}.rel_attn"
        for p in (*_INPUT_PROJECTIONS, "o"):
            out.append((f"{ours}.{p}.weight", f"{theirs}.{p}", p != "o"))
    return out


def _embeddings_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Pop Loom's token table, head and `mask_emb`: HF's, with `cfg.vocab_size` rows (all
    rows when it is None)."""
    wte_VD = take(state, "wte.weight", side="Loom")
    head_VD = take(state, "lm_head.weight", side="Loom")  # wte.weight itself when tied
    bias_V = take(state, "lm_head.bias", side="Loom")
    rows = hf_rows(cfg, wte_VD.shape[0])
    out = {EMBEDDING: wte_VD[:rows], HEAD: head_VD[:rows], HEAD_BIAS: bias_V[:rows]}
    out[MASK_EMB] = take(state, "mask_emb", side="Loom").view(1, 1, -1)
    return out


def _embeddings_from_hf(
    state: dict[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """Pop HF's token table, head and `mask_emb`: Loom's, padded to
    `cfg.padded_vocab_size(rows)`."""
    wte_VD = take(state, EMBEDDING, side="Hugging Face")
    head_VD = state.pop(HEAD, wte_VD)
    if cfg.tie_embeddings and not (head_VD is wte_VD or torch.equal(head_VD, wte_VD)):
        raise ConfigError(
            f"Hugging Face {HEAD} differs from {EMBEDDING} but model.tie_embeddings=true; "
            "set it to false to keep both"
        )
    rows = wte_VD.shape[0]
    check_hf_rows(cfg, rows)
    padded = cfg.padded_vocab_size(rows)
    wte_VD = pad_rows(wte_VD, padded)
    return {
        "wte.weight": wte_VD,
        "lm_head.weight": wte_VD if cfg.tie_embeddings else pad_rows(head_VD, padded),
        "lm_head.bias": pad_rows(take(state, HEAD_BIAS, side="Hugging Face"), padded),
        "mask_emb": take(state, MASK_EMB, side="Hugging Face").reshape(-1),
    }


def to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Loom `XLNet.state_dict()` -> `XLNetLMHeadModel` state dict (the tied `lm_loss.weight`
    included). Padded vocabulary rows beyond `cfg.vocab_size` go."""
    _check(cfg)
    state = dict(state_dict)
    out = _embeddings_to_hf(state, cfg)
    d, h, k = cfg.d_model, cfg.n_head, cfg.head_dim
    for ours, theirs, transposed in _projections(cfg):
        w = take(state, ours, side="Loom")
        out[theirs] = (w.t() if transposed else w).reshape(d, h, k)
    for ours, theirs in _pairs(cfg):
        out[theirs] = take(state, ours, side="Loom")
    reject_leftovers(state, side="Loom")
    return out


def from_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`XLNetLMHeadModel` state dict -> Loom `XLNet.state_dict()`.

    Loads with `strict=True` into `build_model(cfg, vocab_size=cfg.padded_vocab_size(V))` for
    the HF vocabulary V; the padded rows (and their output bias) are zeros.
    """
    _check(cfg)
    state = dict(state_dict)
    out = _embeddings_from_hf(state, cfg)
    d, inner = cfg.d_model, cfg.n_head * cfg.head_dim
    for ours, theirs, transposed in _projections(cfg):
        w = take(state, theirs, side="Hugging Face")
        if tuple(w.shape) != (d, cfg.n_head, cfg.head_dim):
            raise ConfigError(
                f"Hugging Face {theirs} has shape {tuple(w.shape)}; model.d_model={d} and "
                f"model.n_head={cfg.n_head} need {(d, cfg.n_head, cfg.head_dim)}"
            )
        w = w.reshape(d, inner)
        out[ours] = w.t().contiguous() if transposed else w
    for ours, theirs in _pairs(cfg):
        out[ours] = take(state, theirs, side="Hugging Face")
    reject_leftovers(state, side="Hugging Face")
    return out
