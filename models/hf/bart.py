"""Hugging Face interop for `models.bart.Bart`: configs and state-dict name mapping.

`to_hf` / `from_hf` rename parameters between Loom's layout (`encoder.blocks.3.attn.q`,
`decoder.blocks.0.cross_attn.o`, `mlp.fc_in`) and `transformers.BartForConditionalGeneration`'s
(`model.encoder.layers.3.self_attn.q_proj`, `model.decoder.layers.0.encoder_attn.out_proj`,
`fc1`); both sides are post-LN with separate q, k, v, o projections and biases everywhere, so
tensors are shared, not copied or reshaped; only the position tables (below) and padded
vocabulary rows are rebuilt.

Positions: Hugging Face's `BartLearnedPositionalEmbedding` keeps fairseq's padding offset: it
has max_position_embeddings + 2 rows and reads position p at row p + 2, so rows 0 and 1 are
never read. Loom's `wpe` holds positions 0 .. max_seq_len - 1 and nothing else. The rule:
Loom's `max_seq_len` is HF's `max_position_embeddings`; `to_hf` writes two zero rows before
Loom's table, and `from_hf` drops HF's first two rows and refuses a table that does not have
exactly model.max_seq_len + 2 rows (it neither cuts nor extends positions). This is why
Loom's bart_base has 2 x 2 x d_model = 3,072 parameters fewer than BartForConditionalGeneration
(139,417,344 against 139,420,416).

`final_logits_bias`: a (1, V) buffer added to HF's logits, which pretraining never changes
(zeros). Loom has no output bias: `to_hf` writes zeros and `from_hf` refuses a non-zero one
(a fine-tuned checkpoint may have one; its logits could not be reproduced).

Embeddings: Hugging Face stores the shared token table three times (`model.shared`, and
`embed_tokens` of each stack) and ties `lm_head` to it. transformers 5 reads
`tie_word_embeddings=False` as "untie all of them" (each stack would get its own input table,
and `save_pretrained` would drop the aliases), so only a tied Loom BART
(model.tie_embeddings=true, every recipe) converts; `from_hf` refuses aliases or a head that
differ from `model.shared`.

Vocabulary rows: the HF model gets `cfg.vocab_size` rows when that is set, else every row of
the checkpoint (padding included). `to_hf` drops the padded rows beyond it; `from_hf` pads
back to `cfg.padded_vocab_size(rows)` with zero rows.

Dropout: HF has `dropout` (residual branches and embeddings), `attention_dropout` and
`activation_dropout`; Loom has one `model.dropout` for the first two and none inside the MLP.
`hf_config` sets dropout = attention_dropout = model.dropout and activation_dropout = 0;
`loom_config` takes `dropout` alone and ignores the other two, as it ignores
`encoder_layerdrop` / `decoder_layerdrop`: they only act in training.

Tokens (`TOKENS`): the denoising objective (data_pipeline/objectives/denoising.py) feeds the
decoder <eos> then the window shifted right (BART starts its decoder with </s>), pads the
source with <pad>, puts no <bos> anywhere and leaves [MASK] where infilling removed a span;
its window is cut from packed rows in which each document ends with <eos>. So an exported
tokenizer lays a text out as `text <eos>` and a pair as two packed documents,
`A <eos> B <eos>`, and names [MASK] its mask token; with the tokenizer's ids the HF config's
pad_token_id, eos_token_id, decoder_start_token_id and forced_eos_token_id are <pad>, <eos>,
<eos>, <eos>, and bos_token_id is None (without ids, BartConfig's defaults pad 1, eos 2,
decoder start 2 stay, which are BART's own vocabulary's). The family's other objective, mass,
gives the decoder [MASK] where a fragment starts instead of a start token, so HF's
`generate` does not decode as it was trained; its weights convert all the same.

Configs Hugging Face BART cannot express raise ConfigError naming the field: heads narrower or
wider than d_model / n_head (model.d_kv), layers without biases, an epsilon other than 1e-5
(BartConfig has no field for it: its LayerNorms use PyTorch's default), an untied head.

Shape legend: V vocabulary rows, P position rows, D model width.
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

__all__ = ["TOKENS", "from_hf", "hf_config", "loom_config", "to_hf"]

# Rows HF's position tables keep before position 0 (fairseq's padding offset).
POSITION_OFFSET = 2
# PyTorch's LayerNorm default, which every LayerNorm of HF's BART uses.
LAYER_NORM_EPS = 1e-5
# Loom activation -> BartConfig.activation_function (gelu_new: the tanh approximation).
_ACT_TO_HF = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}

TOKENS = TokenConventions(
    roles={
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "[UNK]",
        "mask_token": "[MASK]",
    },
    single=("$A", "<eos>"),
    pair=("$A", "<eos>", "$B", "<eos>"),
    config_ids={
        "pad_token_id": "<pad>",
        "eos_token_id": "<eos>",
        "decoder_start_token_id": "<eos>",
        "forced_eos_token_id": "<eos>",
    },
)

SHARED = "model.shared.weight"
EMBED_ALIASES = ("model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
HEAD = "lm_head.weight"
LOGITS_BIAS = "final_logits_bias"
# Loom module -> HF module inside one block (each has a weight and a bias).
_PROJECTIONS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj"}
_BLOCK = {
    **{f"attn.{p}": f"self_attn.{q}" for p, q in _PROJECTIONS.items()},
    "ln_attn": "self_attn_layer_norm",
    "mlp.fc_in": "fc1",
    "mlp.fc_out": "fc2",
    "ln_mlp": "final_layer_norm",
}
_DECODER_BLOCK = {
    **_BLOCK,
    **{f"cross_attn.{p}": f"encoder_attn.{q}" for p, q in _PROJECTIONS.items()},
    "ln_cross": "encoder_attn_layer_norm",
}


def _check(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first field BartForConditionalGeneration cannot express."""
    problems = {
        "family": (cfg.family == "bart", "only family=bart maps to BartForConditionalGeneration"),
        "pre_ln": (not cfg.pre_ln, "BART's blocks are post-LN"),
        "norm": (cfg.norm == "layernorm", "BART uses LayerNorm"),
        "position": (cfg.position == "learned", "BART learns absolute positions"),
        "bias": (cfg.bias, "BART has biases in every linear layer and LayerNorm"),
        "activation": (cfg.activation in _ACT_TO_HF, f"BART supports {sorted(_ACT_TO_HF)}"),
        "d_kv": (
            cfg.d_kv is None or cfg.d_kv * cfg.n_head == cfg.d_model,
            "BART's heads are d_model // n_head wide",
        ),
        "layer_norm_eps": (
            cfg.layer_norm_eps == LAYER_NORM_EPS,
            f"BartConfig has no epsilon; its LayerNorms use {LAYER_NORM_EPS}",
        ),
        "tie_embeddings": (
            cfg.tie_embeddings,
            "transformers 5 unties the stacks' input tables from model.shared too when "
            "tie_word_embeddings=False, where Loom's BART shares one",
        ),
    }
    check_fields(cfg, problems, target="BartForConditionalGeneration")


def _n_decoder_layer(cfg: ModelConfig) -> int:
    return cfg.n_decoder_layer if cfg.n_decoder_layer is not None else cfg.n_layer


def hf_config(
    cfg: ModelConfig, *, vocab_size: int, token_ids: dict[str, int] | None = None, **overrides
):
    """`transformers.BartConfig` of the same architecture with `vocab_size` rows.

    `token_ids` (Loom reserved token -> id of the run's tokenizer) sets the pad, eos, decoder
    start and forced eos ids (see `TOKENS`); bos_token_id is None either way. `overrides` are
    further BartConfig arguments (e.g. attn_implementation="eager").
    """
    from transformers import BartConfig

    _check(cfg)
    check_vocab_size(vocab_size)
    fields = {
        "vocab_size": vocab_size,
        "max_position_embeddings": cfg.max_seq_len,
        "d_model": cfg.d_model,
        "encoder_layers": cfg.n_layer,
        "decoder_layers": _n_decoder_layer(cfg),
        "encoder_attention_heads": cfg.n_head,
        "decoder_attention_heads": cfg.n_head,
        "encoder_ffn_dim": cfg.ffn_size,
        "decoder_ffn_dim": cfg.ffn_size,
        "activation_function": _ACT_TO_HF[cfg.activation],
        "dropout": cfg.dropout,
        "attention_dropout": cfg.dropout,
        "activation_dropout": 0.0,
        "init_std": cfg.init_std,
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        **TOKENS.config_token_ids(token_ids),
    }
    return BartConfig(**{**fields, **overrides})


def loom_config(hf_cfg, *, name: str = "bart_from_hf") -> ModelConfig:
    """The Loom ModelConfig of an HF `BartConfig`; raises ConfigError on what Loom lacks.

    max_seq_len is max_position_embeddings; dropout is `dropout` (see the module docstring).
    """
    accepted = {
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "is_encoder_decoder": True,
        # Fields of older configs (MBart's layout) that BartForConditionalGeneration ignores;
        # a config that sets them describes weights trained with another layout.
        "normalize_before": False,
        "add_final_layer_norm": False,
    }
    reject_unsupported(hf_cfg, accepted, cls="BartConfig")
    for key in ("attention_heads", "ffn_dim"):
        enc, dec = getattr(hf_cfg, f"encoder_{key}"), getattr(hf_cfg, f"decoder_{key}")
        if enc != dec:
            raise ConfigError(
                f"BartConfig.decoder_{key}={dec} differs from encoder_{key}={enc}; Loom's BART "
                "has one value for both stacks"
            )
    act = known_value(hf_cfg, "activation_function", ACT_FROM_HF, cls="BartConfig")
    cfg = ModelConfig(
        name=name,
        family="bart",
        objective="denoising",
        vocab_size=hf_cfg.vocab_size,
        n_layer=hf_cfg.encoder_layers,
        n_decoder_layer=hf_cfg.decoder_layers,
        d_model=hf_cfg.d_model,
        n_head=hf_cfg.encoder_attention_heads,
        d_ff=hf_cfg.encoder_ffn_dim,
        max_seq_len=hf_cfg.max_position_embeddings,
        dropout=float(hf_cfg.dropout),
        init_std=float(hf_cfg.init_std),
        pre_ln=False,
        activation=ACT_FROM_HF[act],
    )
    cfg.validate()
    return cfg


def _pairs(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(Loom name, HF name) of every parameter but the token table, head and positions."""
    pairs = []
    for stack, n_layer in (("encoder", cfg.n_layer), ("decoder", _n_decoder_layer(cfg))):
        block = _BLOCK if stack == "encoder" else _DECODER_BLOCK
        modules = [(f"{stack}.emb_ln", f"model.{stack}.layernorm_embedding")]
        for i in range(n_layer):
            ours, theirs = f"{stack}.blocks.{i}", f"model.{stack}.layers.{i}"
            modules += [(f"{ours}.{m}", f"{theirs}.{h}") for m, h in block.items()]
        pairs += [(f"{m}.{p}", f"{h}.{p}") for m, h in modules for p in ("weight", "bias")]
    return pairs


def _embeddings_to_hf(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Pop Loom's token table (and its tied head): HF's `shared`, its aliases, `lm_head` and
    a zero `final_logits_bias`, with `cfg.vocab_size` rows (all rows when it is None)."""
    shared_VD = take(state, "shared.weight", side="Loom")
    state.pop("lm_head.weight", None)  # tied: the same tensor as shared.weight
    shared_VD = shared_VD[: hf_rows(cfg, shared_VD.shape[0])]
    out = {SHARED: shared_VD, **{alias: shared_VD for alias in EMBED_ALIASES}}
    out[HEAD] = shared_VD
    out[LOGITS_BIAS] = shared_VD.new_zeros(1, shared_VD.shape[0])
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.shape == b.shape and torch.equal(a, b))


def _embeddings_from_hf(
    state: dict[str, torch.Tensor], cfg: ModelConfig
) -> dict[str, torch.Tensor]:
    """Pop HF's token table, its aliases, the head and `final_logits_bias`: Loom's `shared`
    and tied `lm_head`, padded to `cfg.padded_vocab_size(rows)`."""
    bias = state.pop(LOGITS_BIAS, None)
    if bias is not None and bias.any():
        raise ConfigError(
            f"Hugging Face {LOGITS_BIAS} is non-zero (max |bias| "
            f"{bias.abs().max().item():.3g}); Loom's BART has no output bias"
        )
    tables = {key: state.pop(key) for key in (*EMBED_ALIASES, HEAD) if key in state}
    shared_VD = state.pop(SHARED, next(iter(tables.values()), None))
    if shared_VD is None:
        raise ConfigError(f"Hugging Face state dict has no {SHARED!r} (nor embed_tokens)")
    for key, table_VD in tables.items():
        if not _same(table_VD, shared_VD):
            raise ConfigError(
                f"Hugging Face {key} differs from {SHARED}; Loom's BART has one token table "
                "for both stacks and the output projection"
            )
    rows = shared_VD.shape[0]
    check_hf_rows(cfg, rows)
    shared_VD = pad_rows(shared_VD, cfg.padded_vocab_size(rows))
    return {"shared.weight": shared_VD, "lm_head.weight": shared_VD}


def to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Loom `Bart.state_dict()` -> `BartForConditionalGeneration` state dict (aliases and the
    zero `final_logits_bias` included). Padded vocabulary rows beyond `cfg.vocab_size` go."""
    _check(cfg)
    state = dict(state_dict)
    out = _embeddings_to_hf(state, cfg)
    for stack in ("encoder", "decoder"):
        wpe_PD = take(state, f"{stack}.wpe.weight", side="Loom")
        lead_PD = wpe_PD.new_zeros(POSITION_OFFSET, wpe_PD.shape[1])
        out[f"model.{stack}.embed_positions.weight"] = torch.cat([lead_PD, wpe_PD])
    for ours, theirs in _pairs(cfg):
        out[theirs] = take(state, ours, side="Loom")
    reject_leftovers(state, side="Loom")
    return out


def from_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`BartForConditionalGeneration` state dict -> Loom `Bart.state_dict()`.

    Loads with `strict=True` into `build_model(cfg, vocab_size=cfg.padded_vocab_size(V))` for
    the HF vocabulary V; the padded rows are zeros. HF's two leading position rows are dropped.
    """
    _check(cfg)
    state = dict(state_dict)
    out = _embeddings_from_hf(state, cfg)
    rows = cfg.max_seq_len + POSITION_OFFSET
    for stack in ("encoder", "decoder"):
        key = f"model.{stack}.embed_positions.weight"
        table_PD = take(state, key, side="Hugging Face")
        if table_PD.shape[0] != rows:
            raise ConfigError(
                f"Hugging Face {key} has {table_PD.shape[0]} rows but model.max_seq_len="
                f"{cfg.max_seq_len} needs {rows} (BART keeps {POSITION_OFFSET} rows before "
                "position 0)"
            )
        out[f"{stack}.wpe.weight"] = table_PD[POSITION_OFFSET:]
    for ours, theirs in _pairs(cfg):
        out[ours] = take(state, theirs, side="Hugging Face")
    reject_leftovers(state, side="Hugging Face")
    return out
