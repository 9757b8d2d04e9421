"""Hugging Face interop for Loom's T5 with mixture-of-experts layers:
`transformers.SwitchTransformersForConditionalGeneration` (Fedus et al. 2021).

`models.hf.t5` hands every config with `model.moe.num_experts` > 0 (and `loom_config` every
HF config of model_type `switch_transformers`) to this module, so the family registry of
`models.hf` (family t5) reaches it unchanged.

Both models are T5: attention, norms, relative position tables, embedding and head map as in
`models.hf.t5`. What differs is the MLP of a block; with j its MLP sub-layer in HF's list (1
in the encoder, 2 in the decoder) and E experts:

    Loom  {stack}.blocks.{i}.mlp.           HF  {stack}.block.{i}.layer.{j}.mlp.
    wi.weight, wo.weight (dense block)          wi.weight, wo.weight
    router.weight                               router.classifier.weight
    experts.w_in [E, F, D], row e               experts.expert_{e}.wi.weight [F, D]
    experts.w_out [E, D, F], row e              experts.expert_{e}.wo.weight [D, F]

Loom -> HF shares tensors (expert e is a view of row e of the stack); HF -> Loom stacks the
experts (a copy).

The configs, field by field:

* MoE blocks. HF derives them per stack: step = n_layers // num_sparse_{stack}_layers, and
  block i is sparse when i % step == 1 (every block when step is 1; none when step is 0).
  Loom's `model.moe.layers` (default: the odd blocks, HF's step 2) must give such a set in
  each stack; HF -> Loom needs both stacks to be their odd blocks (layers: null) or the same
  blocks (listed).
* Routing is the same on both sides: each token goes to its top-1 expert, the gate is the
  router probability (not renormalised), the router is a float32 Linear without bias, the
  tokens of a row are kept in position order up to the capacity, and a dropped token gets no
  expert output (transformers 5.x; 4.x gave it `router_prob * hidden_state`). Loom's top_k > 1
  and drop_policy probs are refused, as are HF's router_bias, router_dtype other than float32
  and router_ignore_padding_tokens.
* Capacity: HF gives each expert a fixed number of slots per row (`expert_capacity`), Loom
  ceil(factor x T / E) for a row of T tokens, at least min_capacity, with a training and an
  evaluation factor. Loom -> HF writes Loom's evaluation capacity for a row of max_seq_len
  tokens (max_seq_len when dropless): the two agree for full-length rows in evaluation. HF ->
  Loom sets min_capacity = expert_capacity and both factors to expert_capacity x E / 512
  (the max_seq_len it sets), so every row of up to 512 tokens gets HF's capacity exactly.
* Dropout: HF's experts drop their hidden activation with dropout_rate, so Loom's
  model.moe.expert_dropout must equal model.dropout.
* router_jitter_noise is model.moe.jitter_eps (in float32 HF multiplies the hidden states in
  place, so in training its experts see the jittered input as well; Loom's see the clean one).
* router_aux_loss_coef and router_z_loss_coef are model.moe.aux_loss_coef and z_loss_coef,
  copied as they are, but the losses differ: HF concatenates the router logits of all of a
  stack's sparse blocks along the sequence, computes one load-balancing loss and one z-loss
  per stack (no losses for a stack whose every block is sparse) and adds encoder and decoder;
  Loom averages (aux_loss_reduce mean) or sums per-block losses. Training gradients of the
  auxiliary losses therefore differ; the logits do not.
* Loom's gated_gelu is refused: the MLPs of HF's Switch Transformers are wi -> activation -> wo
  without a gate in transformers 5.x (its dense_act_fn "gated-gelu" does not build).
* Untied embeddings (tie_word_embeddings false): HF's Switch Transformers then keep four
  separate tables, `shared`, `encoder.embed_tokens`, `decoder.embed_tokens` and `lm_head`.
  Loom -> HF gives the two stacks' tables copies of Loom's one input table (so that
  save_pretrained writes them); HF -> Loom refuses a stack's table that differs from `shared`.

Everything else (vocabulary rows, tokens) is as in `models.hf.t5`.

Shape legend: E experts, F expert inner size, D d_model.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from common.errors import ConfigError
from models.config import ModelConfig, MoeConfig
from models.hf.common import (
    ACT_FROM_HF,
    check_vocab_size,
    known_value,
    reject_leftovers,
    reject_unsupported,
    take,
)
from models.hf.t5 import (
    EMBED_ALIASES,
    TOKENS,
    attention_pairs,
    embeddings_from_hf,
    embeddings_to_hf,
    n_decoder_layers,
    stack_pairs,
    stack_sizes,
    t5_fields,
)

__all__ = [
    "TOKENS",
    "build_hf_model",
    "from_hf",
    "hf_config",
    "hf_expert_capacity",
    "hf_sparse_blocks",
    "loom_config",
    "to_hf",
]

_TARGET = "SwitchTransformersForConditionalGeneration"
_CONFIG = "SwitchTransformersConfig"
# Loom activation -> SwitchTransformersConfig.dense_act_fn (a key of transformers' ACT2FN).
_DENSE_ACT = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new"}
# HF configs carry no input length; models.hf.t5 sets the same.
_MAX_SEQ_LEN = 512
_STACKS = ("encoder", "decoder")


def hf_sparse_blocks(n_layer: int, n_sparse: int) -> list[int]:
    """The blocks Hugging Face makes sparse in a stack of `n_layer` blocks given
    `num_sparse_*_layers=n_sparse` (SwitchTransformersConfig's step, the stack's rule)."""
    step = n_layer // n_sparse if n_sparse > 0 else n_layer
    if step <= 0:
        return []
    return [i for i in range(n_layer) if step == 1 or i % step == 1]


def hf_expert_capacity(cfg: ModelConfig) -> int:
    """HF's expert_capacity for `cfg`: Loom's evaluation capacity of a max_seq_len row."""
    return cfg.moe.capacity(cfg.max_seq_len, training=False) or cfg.max_seq_len


def _stack_layers(cfg: ModelConfig) -> dict[str, int]:
    return {"encoder": cfg.n_layer, "decoder": n_decoder_layers(cfg)}


def _refuse(key: str, cfg: ModelConfig, why: str) -> ConfigError:
    value = functools.reduce(getattr, key.split("."), cfg)
    return ConfigError(f"model.{key}={value!r} cannot be converted to {_TARGET}: {why}")


def _num_sparse(cfg: ModelConfig, stack: str) -> int:
    """num_sparse_{stack}_layers giving Loom's MoE blocks of `stack`, or ConfigError."""
    n_layer = _stack_layers(cfg)[stack]
    wanted = cfg.moe.layer_ids(n_layer)
    for count in (len(wanted), *range(1, n_layer + 1)):
        if hf_sparse_blocks(n_layer, count) == wanted:
            return count
    raise _refuse(
        "moe.layers",
        cfg,
        f"it puts experts in blocks {wanted} of the {n_layer}-block {stack}, but HF makes "
        f"sparse either every block or the blocks i with i % step == 1 (step = n_layers // "
        f"num_sparse_{stack}_layers)",
    )


def _check(cfg: ModelConfig) -> None:
    if cfg.family != "t5":
        raise ConfigError(
            f"model.family={cfg.family!r}: Hugging Face Switch Transformers interop needs family t5"
        )
    moe = cfg.moe
    if not moe.enabled:
        raise _refuse("moe.num_experts", cfg, "a dense T5 converts to T5ForConditionalGeneration")
    checks = {
        "activation": (
            cfg.activation in _DENSE_ACT,
            f"its MLPs are wi -> activation -> wo without a gate; choose one of "
            f"{sorted(_DENSE_ACT)}",
        ),
        "scale_logits": (
            cfg.scale_logits == cfg.tie_embeddings,
            "it rescales the decoder output exactly when tie_word_embeddings is set; set "
            "model.scale_logits equal to model.tie_embeddings",
        ),
        "moe.top_k": (moe.top_k == 1, "it routes each token to one expert (top-1)"),
        "moe.drop_policy": (
            moe.drop_policy == "position",
            "an over-full expert keeps the earliest tokens of a row (position)",
        ),
        "moe.expert_dropout": (
            moe.expert_dropout == cfg.dropout,
            f"its experts drop their hidden activation with dropout_rate, which is "
            f"model.dropout={cfg.dropout}; set model.moe.expert_dropout to the same",
        ),
    }
    for key, (ok, why) in checks.items():
        if not ok:
            raise _refuse(key, cfg, why)
    for stack in _STACKS:
        _num_sparse(cfg, stack)


def hf_config(cfg: ModelConfig, *, vocab_size: int, token_ids: dict[str, int] | None = None):
    """`transformers.SwitchTransformersConfig` of the same architecture with `vocab_size` rows.

    `token_ids` sets the pad, eos and decoder-start ids as for T5 (`models.hf.t5.TOKENS`);
    without it they are T5's: pad 0, eos 1, decoder start = pad.
    """
    from transformers import SwitchTransformersConfig

    _check(cfg)
    check_vocab_size(vocab_size)
    moe = cfg.moe
    return SwitchTransformersConfig(
        **stack_sizes(cfg, vocab_size),
        num_experts=moe.num_experts,
        num_sparse_encoder_layers=_num_sparse(cfg, "encoder"),
        num_sparse_decoder_layers=_num_sparse(cfg, "decoder"),
        expert_capacity=hf_expert_capacity(cfg),
        router_bias=False,
        router_jitter_noise=float(moe.jitter_eps),
        router_dtype="float32",
        router_ignore_padding_tokens=False,
        router_z_loss_coef=float(moe.z_loss_coef),
        router_aux_loss_coef=float(moe.aux_loss_coef),
        relative_attention_num_buckets=cfg.relative_buckets,
        relative_attention_max_distance=cfg.relative_max_distance,
        dropout_rate=float(cfg.dropout),
        layer_norm_epsilon=float(cfg.layer_norm_eps),
        initializer_factor=float(cfg.init_std),
        dense_act_fn=_DENSE_ACT[cfg.activation],
        tie_word_embeddings=cfg.tie_embeddings,
        **{"decoder_start_token_id": 0, **TOKENS.config_token_ids(token_ids)},
    )


def _loom_layers(hf_cfg) -> list[int] | None:
    """model.moe.layers of an HF config: None (odd blocks of each stack) or the blocks."""
    n_layers = {"encoder": hf_cfg.num_layers, "decoder": hf_cfg.num_decoder_layers}
    blocks = {}
    for stack in _STACKS:
        key = f"num_sparse_{stack}_layers"
        blocks[stack] = hf_sparse_blocks(n_layers[stack], getattr(hf_cfg, key))
        if not blocks[stack]:
            raise ConfigError(
                f"{_CONFIG}.{key}={getattr(hf_cfg, key)} gives the {stack} no sparse block; "
                "Loom puts experts in both stacks"
            )
    if all(blocks[s] == list(range(1, n_layers[s], 2)) for s in _STACKS):
        return None
    if blocks["encoder"] != blocks["decoder"]:
        raise ConfigError(
            f"{_CONFIG}.num_sparse_decoder_layers={hf_cfg.num_sparse_decoder_layers} makes "
            f"decoder blocks {blocks['decoder']} sparse and num_sparse_encoder_layers="
            f"{hf_cfg.num_sparse_encoder_layers} encoder blocks {blocks['encoder']}; Loom's "
            "model.moe.layers names the same blocks in both stacks (or the odd ones of each)"
        )
    return blocks["encoder"]


def _loom_moe(hf_cfg) -> MoeConfig:
    capacity = hf_cfg.expert_capacity
    if capacity < 1:
        raise ConfigError(f"{_CONFIG}.expert_capacity={capacity} must be >= 1")
    # min_capacity = HF's slots: every row of up to _MAX_SEQ_LEN tokens gets exactly them.
    factor = capacity * hf_cfg.num_experts / _MAX_SEQ_LEN
    return MoeConfig(
        num_experts=hf_cfg.num_experts,
        layers=_loom_layers(hf_cfg),
        top_k=1,
        capacity_factor=factor,
        eval_capacity_factor=factor,
        min_capacity=capacity,
        drop_policy="position",
        aux_loss_coef=float(hf_cfg.router_aux_loss_coef),
        z_loss_coef=float(hf_cfg.router_z_loss_coef),
        jitter_eps=float(hf_cfg.router_jitter_noise),
        expert_dropout=float(hf_cfg.dropout_rate),
    )


def loom_config(hf_cfg, *, name: str = "switch_from_hf") -> ModelConfig:
    """The Loom ModelConfig of an HF `SwitchTransformersConfig`; ConfigError naming the HF
    field for what Loom lacks. HF configs carry no input length: 512 is set."""
    unsupported = {"router_bias": False, "router_dtype": "float32"}
    unsupported["router_ignore_padding_tokens"] = False
    reject_unsupported(hf_cfg, unsupported, cls=_CONFIG)
    act = known_value(hf_cfg, "dense_act_fn", ACT_FROM_HF, cls=_CONFIG)
    fields = t5_fields(hf_cfg, activation=ACT_FROM_HF[act], tied=bool(hf_cfg.tie_word_embeddings))
    cfg = ModelConfig(name=name, **fields, moe=_loom_moe(hf_cfg))
    cfg.validate()
    return cfg


def build_hf_model(
    cfg: ModelConfig, *, vocab_size: int, token_ids: dict[str, int] | None = None
) -> nn.Module:
    """`SwitchTransformersForConditionalGeneration(hf_config(cfg))`, checked to have its
    sparse blocks where `cfg` has MoE layers. Runs on the current default device (meta works).
    """
    from transformers import SwitchTransformersForConditionalGeneration

    model = SwitchTransformersForConditionalGeneration(
        hf_config(cfg, vocab_size=vocab_size, token_ids=token_ids)
    )
    for stack, n_layer in _stack_layers(cfg).items():
        got = [i for i, block in enumerate(getattr(model, stack).block) if block.is_sparse]
        if got != cfg.moe.layer_ids(n_layer):
            raise ConfigError(
                f"this transformers version makes {stack} blocks {got} sparse for "
                f"model.moe.layers={cfg.moe.layers}, not {cfg.moe.layer_ids(n_layer)}"
            )
    return model


def _layout(cfg: ModelConfig) -> tuple[list[tuple[str, str]], list[tuple[str, list[str]]]]:
    """(Loom name, HF name) of every parameter but the embedding, head and experts; and
    (Loom stacked expert weight, HF names of its rows) of every expert weight."""
    moe_blocks = {stack: set(cfg.moe.layer_ids(n)) for stack, n in _stack_layers(cfg).items()}
    experts: list[tuple[str, list[str]]] = []

    def block_pairs(stack: str, i: int) -> list[tuple[str, str]]:
        pairs, j = attention_pairs(stack, i)
        ours, theirs = f"{stack}.blocks.{i}", f"{stack}.block.{i}.layer.{j}"
        pairs.append((f"{ours}.ln_mlp.weight", f"{theirs}.layer_norm.weight"))
        if i not in moe_blocks[stack]:
            dense = [(f"{ours}.mlp.{p}.weight", f"{theirs}.mlp.{p}.weight") for p in ("wi", "wo")]
            return pairs + dense
        pairs.append((f"{ours}.mlp.router.weight", f"{theirs}.mlp.router.classifier.weight"))
        for loom_w, hf_w in (("w_in", "wi"), ("w_out", "wo")):
            rows = [
                f"{theirs}.mlp.experts.expert_{e}.{hf_w}.weight" for e in range(cfg.moe.num_experts)
            ]
            experts.append((f"{ours}.mlp.experts.{loom_w}", rows))
        return pairs

    return stack_pairs(cfg, block_pairs), experts


def to_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Loom `T5.state_dict()` (with MoE layers) -> `SwitchTransformersForConditionalGeneration`
    state dict. The vocabulary keeps `cfg.vocab_size` rows (all when None)."""
    _check(cfg)
    state = dict(state_dict)
    out = embeddings_to_hf(state, cfg)
    if not cfg.tie_embeddings:
        # Untied, HF keeps each stack's input table apart from `shared`, and save_pretrained
        # would write one tensor once: each gets its own copy, or it would reload at random.
        out.update({alias: out[alias].clone() for alias in EMBED_ALIASES})
    pairs, experts = _layout(cfg)
    for ours, theirs in pairs:
        out[theirs] = take(state, ours, side="Loom")
    for ours, theirs in experts:
        w_E = take(state, ours, side="Loom")
        if w_E.shape[0] != len(theirs):
            raise ConfigError(
                f"Loom {ours} holds {w_E.shape[0]} experts but model.moe.num_experts={len(theirs)}"
            )
        out.update(zip(theirs, w_E.unbind(0), strict=True))
    reject_leftovers(state, side="Loom")
    return out


def from_hf(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`SwitchTransformersForConditionalGeneration` state dict -> Loom `T5.state_dict()`, to
    load with `strict=True` into `build_model(cfg, vocab_size=cfg.padded_vocab_size(V))`."""
    _check(cfg)
    state = dict(state_dict)
    out = embeddings_from_hf(state, cfg)
    pairs, experts = _layout(cfg)
    for ours, theirs in pairs:
        out[ours] = take(state, theirs, side="Hugging Face")
    for ours, theirs in experts:
        out[ours] = torch.stack([take(state, name, side="Hugging Face") for name in theirs])
    reject_leftovers(state, side="Hugging Face")
    return out
