"""Loom `Bert` without a pair head <-> Hugging Face `transformers.RobertaForMaskedLM`.

RoBERTa (Liu et al. 2019) is BERT's encoder and MLM head trained without the sentence-pair
task, so the Loom side is a `Bert` with `model.pair_head=false` (conf/model/roberta_*.yaml)
and the conversion is BERT's (models/hf/bert.py: fused qkv split per head, vocabulary rows,
the tied decoder and its bias) under RoBERTa's key names, plus one difference in positions.

Positions: HF's RoBERTa numbers a token's position from its padding id: an unpadded sequence
has positions padding_idx + 1 .. padding_idx + T, with padding_idx = config.pad_token_id = 1,
so its table has max_seq_len + 2 rows, of which row 1 is the padding row (padded tokens read
it) and row 0 is never read. Loom's table holds positions 0 .. max_seq_len - 1 and nothing
else. So HF row p + 2 is Loom row p: `to_hf` writes zeros in rows 0 and 1 (HF initialises the
padding row to zeros too) and `from_hf` drops them. The model itself knows nothing of this.
This is also why Loom's roberta_base has 2 x d_model = 1,536 parameters fewer than
RobertaForMaskedLM (124,695,897 against 124,697,433).

The HF config always has pad_token_id = 1, which fixes where positions start. With Loom's
byte-level BPE tokenizer <pad> is id 1 too; with another tokenizer (the byte tokenizer's <pad>
is 257) HF reads token id 1 as padding when it numbers positions, and an exported tokenizer
pads with Loom's <pad>: right padding, which the tokenizer does by default, leaves the real
tokens' positions as Loom's.

Activation: RobertaForMaskedLM's MLM head applies the exact GELU whatever `hidden_act` says,
and Loom's applies the blocks' activation, so only model.activation=gelu converts (RoBERTa's).

Tokens (`TOKENS`): Loom's mlm objective feeds [CLS] row [SEP], where a row runs across
documents with <eos> between them (RoBERTa's FULL-SENTENCES), so an exported tokenizer adds
[CLS] .. [SEP] around a text and joins a pair with <eos>, as two documents in one row; [CLS]
and [SEP] are also its bos and eos (RoBERTa's <s> and </s>). No token types are returned: the
model has one (type_vocab_size 1).

Shape legend: D model width.
"""

from __future__ import annotations

import torch

from common.errors import ConfigError
from models.config import ModelConfig
from models.hf.bert import (
    EncoderLayout,
    encoder_from_hf,
    encoder_hf_fields,
    encoder_loom_fields,
    encoder_problems,
    encoder_to_hf,
)
from models.hf.common import TokenConventions, check_fields, take

__all__ = ["TOKENS", "from_hf", "hf_config", "loom_config", "to_hf"]

# RoBERTa's padding id; positions start right after it.
PAD_ID = 1
POSITION_OFFSET = PAD_ID + 1

TOKENS = TokenConventions(
    roles={
        "bos_token": "[CLS]",
        "eos_token": "[SEP]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
        "pad_token": "<pad>",
        "unk_token": "[UNK]",
    },
    single=("[CLS]", "$A", "[SEP]"),
    pair=("[CLS]", "$A", "<eos>", "$B", "[SEP]"),
    config_ids={"bos_token_id": "[CLS]", "eos_token_id": "[SEP]"},
)

_LAYOUT = EncoderLayout(
    name="RoBERTa",
    top={
        "tte.weight": "roberta.embeddings.token_type_embeddings.weight",
        "emb_ln.weight": "roberta.embeddings.LayerNorm.weight",
        "emb_ln.bias": "roberta.embeddings.LayerNorm.bias",
        "mlm_dense.weight": "lm_head.dense.weight",
        "mlm_dense.bias": "lm_head.dense.bias",
        "mlm_ln.weight": "lm_head.layer_norm.weight",
        "mlm_ln.bias": "lm_head.layer_norm.bias",
    },
    layers="roberta.encoder.layer.",
    wte="roberta.embeddings.word_embeddings.weight",
    decoder="lm_head.decoder.weight",
    out_bias="lm_head.bias",
    ignored=("roberta.embeddings.position_ids", "roberta.embeddings.token_type_ids"),
)
_POSITIONS = "roberta.embeddings.position_embeddings.weight"


def _check_convertible(cfg: ModelConfig) -> None:
    """Raise ConfigError naming the first field RobertaForMaskedLM cannot express."""
    problems = {
        "family": (cfg.family == "bert", "only family=bert maps to RobertaForMaskedLM"),
        "pair_head": (
            not cfg.has_pair_head,
            "RobertaForMaskedLM has no pair head; a BERT with one converts to BertForPreTraining",
        ),
        **encoder_problems(cfg, name="RoBERTa"),
        # Loom's MLM head applies the blocks' activation, RobertaLMHead always the exact GELU.
        "activation": (cfg.activation == "gelu", "RoBERTa's MLM head applies the exact GELU"),
    }
    check_fields(cfg, problems, target="RobertaForMaskedLM")


def hf_config(
    cfg: ModelConfig, *, vocab_size: int, token_ids: dict[str, int] | None = None, **overrides
):
    """The `transformers.RobertaConfig` of `cfg` with `vocab_size` rows.

    `token_ids` (the run's tokenizer, Loom token -> id) sets bos and eos ([CLS], [SEP]);
    pad_token_id stays 1 whatever the tokenizer (see the module docstring). `overrides` are
    further RobertaConfig arguments (e.g. attn_implementation="eager").
    """
    from transformers import RobertaConfig

    _check_convertible(cfg)
    fields = {
        **encoder_hf_fields(cfg, vocab_size=vocab_size),
        "max_position_embeddings": cfg.max_seq_len + POSITION_OFFSET,
        "pad_token_id": PAD_ID,
        **TOKENS.config_token_ids(token_ids),
    }
    return RobertaConfig(**{**fields, **overrides})


def loom_config(hf_cfg, *, name: str = "roberta_from_hf") -> ModelConfig:
    """The Loom ModelConfig of an HF `RobertaConfig`; raises ConfigError on what Loom lacks."""
    if hf_cfg.pad_token_id != PAD_ID:
        raise ConfigError(
            f"RobertaConfig.pad_token_id={hf_cfg.pad_token_id!r}: its positions start at "
            f"pad_token_id + 1, and Loom converts RoBERTa's layout, pad_token_id={PAD_ID}"
        )
    if hf_cfg.hidden_act != "gelu":
        raise ConfigError(
            f"RobertaConfig.hidden_act={hf_cfg.hidden_act!r}: RobertaForMaskedLM's MLM head "
            "applies the exact GELU whatever hidden_act, and Loom's head applies the blocks' "
            "activation, so only gelu converts"
        )
    max_seq_len = hf_cfg.max_position_embeddings - POSITION_OFFSET
    if max_seq_len <= 0:
        raise ConfigError(
            f"RobertaConfig.max_position_embeddings={hf_cfg.max_position_embeddings} leaves "
            f"no position after the {POSITION_OFFSET} rows RoBERTa keeps before position 0"
        )
    cfg = ModelConfig(
        name=name,
        objective="mlm",
        pair_head=False,
        max_seq_len=max_seq_len,
        **encoder_loom_fields(hf_cfg, cls="RobertaConfig"),
    )
    cfg.validate()
    return cfg


def to_hf(state_dict: dict, cfg: ModelConfig) -> dict:
    """Loom `Bert` state dict -> `RobertaForMaskedLM` state dict (tied keys included)."""
    _check_convertible(cfg)
    sd = dict(state_dict)
    wpe_TD = take(sd, "wpe.weight", side="Loom")
    out = encoder_to_hf(sd, cfg, _LAYOUT)
    out[_POSITIONS] = torch.cat([wpe_TD.new_zeros(POSITION_OFFSET, wpe_TD.shape[1]), wpe_TD])
    return out


def from_hf(state_dict: dict, cfg: ModelConfig) -> dict:
    """`RobertaForMaskedLM` state dict -> Loom `Bert` state dict (tied keys included).

    The result loads with `strict=True` into `build_model(cfg, vocab_size=cfg.padded_vocab_size(V))`
    where V is the HF vocabulary.
    """
    _check_convertible(cfg)
    sd = dict(state_dict)
    table = take(sd, _POSITIONS, side="Hugging Face")
    rows = cfg.max_seq_len + POSITION_OFFSET
    if table.shape[0] != rows:
        raise ConfigError(
            f"the HF position table has {table.shape[0]} rows but model.max_seq_len="
            f"{cfg.max_seq_len} needs {rows} (RoBERTa keeps {POSITION_OFFSET} rows before "
            "position 0)"
        )
    out = encoder_from_hf(sd, cfg, _LAYOUT)
    out["wpe.weight"] = table[POSITION_OFFSET:]
    return out
