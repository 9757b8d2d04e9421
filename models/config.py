"""Schema of the `model` config group."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from fractions import Fraction

from common.errors import ConfigError

FAMILIES = ("gpt", "bert", "t5", "glm", "electra", "bart", "xlnet")
# Objectives that train an encoder-decoder (families t5 and bart), and only such a model.
SEQ2SEQ_OBJECTIVES = ("span_corruption", "denoising", "mass")
SEQ2SEQ_FAMILIES = ("t5", "bart")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "gated_gelu")
POSITIONS = ("learned", "rotary", "relative", "relative_sinusoidal", "relative_xl", "none")
DROP_POLICIES = ("position", "probs")
# Objectives that score a sentence-pair label (NSP, SOP) on BERT's pair head.
PAIR_OBJECTIVES = ("mlm_nsp", "mlm_sop", "unilm", "mlm_struct")
# Classes of each pair objective's label (model.pair_classes must match): StructBERT's
# sentence structural objective tells next, previous and random apart.
PAIR_CLASSES = {"mlm_nsp": 2, "mlm_sop": 2, "unilm": 2, "mlm_struct": 3}
AUX_LOSS_REDUCTIONS = ("mean", "sum")
# Family xlnet trains with the permutation LM (its two-stream attention) or, as a
# Transformer-XL, with the causal LM; plm needs the query stream only xlnet has.
XLNET_OBJECTIVES = ("plm", "clm")


@dataclass(kw_only=True)
class MoeConfig:
    """Switch / GShard mixture-of-experts layers in place of some dense MLPs.

    Tokens are routed in groups of one sequence (row): capacity, dropping and the
    load-balancing statistics are per row, so any split of the batch over micro-batches or
    data-parallel ranks routes every token the same way.
    """

    num_experts: int = 0
    """Experts per MoE layer; 0 keeps every MLP dense."""
    layers: list[int] | None = None
    """Indices of the blocks whose MLP is an MoE layer (T5: of each stack); None = the odd
    ones, 1, 3, 5, ... (every other layer, as Switch and GShard)."""
    top_k: int = 1
    """Experts per token: 1 is Switch (gate = the top probability, not renormalised); 2 is
    GShard (the two gates renormalised to sum to 1)."""
    capacity_factor: float | None = 1.25
    """Training capacity per expert and row: ceil(factor x tokens x top_k / experts), at least
    min_capacity; tokens past it get no expert output (they pass on the residual). None =
    dropless."""
    eval_capacity_factor: float | None = 2.0
    """Capacity factor in evaluation; None = dropless."""
    min_capacity: int = 4
    """Smallest capacity per expert and row, in tokens."""
    pad_to_capacity: bool = True
    """Each expert's input is a buffer of rows x capacity slots, empty ones zero: shapes fixed
    by the config, so routing never makes the host wait for the device, experts run as one
    batched GEMM and expert parallelism exchanges equal splits. False sends only the kept
    choices, sorted by expert (no padding FLOPs, but their counts are read on the host). A
    dropless layer (capacity null) always sorts."""
    drop_policy: str = "position"
    """Which tokens an over-full expert keeps: position (earlier tokens first, every first
    choice before any second choice; the only one causal families allow) | probs (the
    highest gates)."""
    aux_loss_coef: float = 1e-2
    """Weight of the load-balancing loss coef x E x sum_i f_i P_i (Switch's alpha)."""
    aux_loss_reduce: str = "mean"
    """How the layers' aux and z losses combine: mean (T5X) | sum (Megatron, DeepSpeed)."""
    z_loss_coef: float = 0.0
    """Weight of the router z-loss mean(logsumexp(logits)^2) (ST-MoE uses 1e-3; Switch 0)."""
    jitter_eps: float = 1e-2
    """Training-only multiplicative noise U[1 - eps, 1 + eps] on the router input; 0 = none."""
    expert_dropout: float = 0.0
    """Dropout on the experts' hidden activation (Switch fine-tunes with 0.4)."""
    init_scale: float = 0.1
    """Expert weights ~ truncated normal with std sqrt(init_scale / fan_in) (Switch 2.4)."""

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0

    def layer_ids(self, n_layer: int) -> list[int]:
        """The MoE blocks of a stack of n_layer blocks."""
        if not self.enabled:
            return []
        if self.layers is None:
            return list(range(1, n_layer, 2))
        return sorted(set(self.layers))

    def capacity(self, tokens: int, *, training: bool) -> int | None:
        """Slots per expert for a group of `tokens` tokens (None: dropless)."""
        return self.slots(self.capacity_ratio(training=training), tokens)

    def padded_capacity(self, tokens: int, *, training: bool) -> int | None:
        """Slots per expert for a group of `tokens` tokens when the layer pads each expert's
        input to them; None when it sorts (dropless, pad_to_capacity false, or no experts)."""
        if not self.enabled or not self.pad_to_capacity:
            return None
        return self.capacity(tokens, training=training)

    def capacity_ratio(self, *, training: bool) -> tuple[int, int] | None:
        """The capacity factor as the exact fraction written (1.1 is 11 / 10), as (numerator,
        denominator); None: dropless."""
        factor = self.capacity_factor if training else self.eval_capacity_factor
        return None if factor is None else Fraction(str(factor)).as_integer_ratio()

    def slots(self, ratio: tuple[int, int] | None, tokens: int) -> int | None:
        """max(min_capacity, ceil(ratio x tokens x top_k / E)) in integers, so 1.1 x 90 / 3
        is 33 slots, not 34 (and a compiled layer traces it without a graph break)."""
        if ratio is None:
            return None
        num, den = ratio
        return max(self.min_capacity, -(-num * tokens * self.top_k // (den * self.num_experts)))

    def validate(self, *, n_layer: int) -> None:
        """ConfigError naming the field for any impossible value."""
        if self.num_experts < 0:
            raise ConfigError(f"model.moe.num_experts={self.num_experts} must be >= 0")
        if not self.enabled:
            return
        if self.num_experts == 1:
            raise ConfigError("model.moe.num_experts=1 routes nothing; use 0 (dense) or >= 2")
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(
                f"model.moe.top_k={self.top_k} must be in [1, model.moe.num_experts="
                f"{self.num_experts}]"
            )
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < n_layer]
            if bad or not self.layers:
                raise ConfigError(
                    f"model.moe.layers={self.layers} must list block indices in "
                    f"[0, model.n_layer={n_layer})"
                )
        elif n_layer < 2:
            raise ConfigError(
                f"model.moe.layers=null puts experts in the odd blocks; model.n_layer={n_layer} "
                "has none (list the blocks in model.moe.layers)"
            )
        for key in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, key)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"model.moe.{key}={value} must be > 0 (or null: dropless)")
        if self.min_capacity < 1:
            raise ConfigError(f"model.moe.min_capacity={self.min_capacity} must be >= 1")
        if self.drop_policy not in DROP_POLICIES:
            raise ConfigError(
                f"model.moe.drop_policy={self.drop_policy!r} is unknown; choose one of "
                f"{DROP_POLICIES}"
            )
        if self.aux_loss_reduce not in AUX_LOSS_REDUCTIONS:
            raise ConfigError(
                f"model.moe.aux_loss_reduce={self.aux_loss_reduce!r} is unknown; choose one of "
                f"{AUX_LOSS_REDUCTIONS}"
            )
        for key in ("aux_loss_coef", "z_loss_coef", "jitter_eps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.moe.{key}={getattr(self, key)} must be >= 0")
        if self.jitter_eps >= 1:
            raise ConfigError(f"model.moe.jitter_eps={self.jitter_eps} must be < 1")
        if not 0 <= self.expert_dropout < 1:
            raise ConfigError(f"model.moe.expert_dropout={self.expert_dropout} must be in [0, 1)")
        if self.init_scale <= 0:
            raise ConfigError(f"model.moe.init_scale={self.init_scale} must be > 0")


# The fields a family does not use, or uses in one way only: any other value is refused
# rather than silently ignored. family -> field -> (accepted values, why).
FAMILY_FIELDS: dict[str, dict[str, tuple[tuple[object, ...], str]]] = {
    "gpt": {
        "type_vocab_size": ((0,), "token-type embeddings are BERT's"),
        "embedding_size": ((None,), "factorised embeddings are ALBERT's"),
        "share_layers": ((False,), "cross-layer sharing is ALBERT's"),
        "n_decoder_layer": ((None,), "GPT has no separate decoder stack"),
        "scale_logits": ((False,), "logit scaling is T5's"),
        "pair_head": ((None,), "the sentence-pair head is BERT's"),
        "pre_ln": ((True,), "GPT is pre-LN (a post-LN stack would need no final norm)"),
        "position": (
            ("learned", "rotary", "none"),
            "the relative bias is T5's, the relative sinusoids NEZHA's (family bert)",
        ),
    },
    "bert": {
        "n_decoder_layer": ((None,), "BERT is an encoder without a decoder stack"),
        "scale_logits": ((False,), "logit scaling is T5's"),
        "position": (
            ("learned", "rotary", "relative_sinusoidal"),
            "the bucketed relative bias is T5's",
        ),
    },
    "glm": {
        "activation": (("gelu_tanh",), "GLM's blocks use the tanh GELU"),
        "norm": (("layernorm",), "GLM's blocks use LayerNorm"),
        "position": (("learned",), "GLM's 2D positions are two learned tables"),
        "type_vocab_size": ((0,), "token-type embeddings are BERT's"),
        "embedding_size": ((None,), "factorised embeddings are ALBERT's"),
        "share_layers": ((False,), "cross-layer sharing is ALBERT's"),
        "n_decoder_layer": ((None,), "GLM has no separate decoder stack"),
        "scale_logits": ((False,), "logit scaling is T5's"),
        "pair_head": ((None,), "the sentence-pair head is BERT's"),
    },
    "t5": {
        "norm": (("rmsnorm",), "T5 normalises with RMSNorm"),
        "position": (("relative",), "T5 encodes positions with its relative bias"),
        "bias": ((False,), "T5's layers have no biases"),
        "pre_ln": ((True,), "T5's blocks are pre-norm"),
        "pair_head": ((None,), "the sentence-pair head is BERT's"),
    },
    "electra": {
        "n_decoder_layer": ((None,), "ELECTRA's two networks are encoders"),
        "scale_logits": ((False,), "logit scaling is T5's"),
        "share_layers": ((False,), "cross-layer sharing is ALBERT's"),
        "pair_head": ((None,), "ELECTRA has no sentence-pair head"),
        "d_kv": ((None,), "ELECTRA's heads are d_model / n_head wide, the generator's too"),
        "position": (("learned",), "ELECTRA learns absolute positions"),
    },
    "bart": {
        "norm": (("layernorm",), "BART's blocks use LayerNorm"),
        "position": (("learned",), "BART learns absolute positions, one table per stack"),
        "pre_ln": ((False,), "BART's blocks are post-LN"),
        "type_vocab_size": ((0,), "token-type embeddings are BERT's"),
        "embedding_size": ((None,), "factorised embeddings are ALBERT's"),
        "share_layers": ((False,), "cross-layer sharing is ALBERT's"),
        "scale_logits": ((False,), "logit scaling is T5's"),
        "pair_head": ((None,), "the sentence-pair head is BERT's"),
        "activation": (
            ("gelu", "gelu_tanh", "relu"),
            "BART's MLP is ungated (gated_gelu is T5 v1.1's)",
        ),
    },
    "xlnet": {
        "norm": (("layernorm",), "XLNet's blocks use LayerNorm"),
        "position": (
            ("relative_xl",),
            "XLNet and Transformer-XL attend with relative sinusoids of the distance",
        ),
        "pre_ln": ((False,), "XLNet's blocks are post-LN"),
        "bias": ((True,), "XLNet's MLP and LayerNorms have biases (its attention has none)"),
        "type_vocab_size": (
            (0,),
            "XLNet encodes segments relatively in every layer, not with token-type embeddings",
        ),
        "embedding_size": ((None,), "factorised embeddings are ALBERT's"),
        "share_layers": ((False,), "cross-layer sharing is ALBERT's"),
        "n_decoder_layer": ((None,), "XLNet has no separate decoder stack"),
        "scale_logits": ((False,), "logit scaling is T5's"),
        "pair_head": ((None,), "the sentence-pair head is BERT's"),
        "activation": (
            ("gelu", "gelu_tanh", "relu"),
            "XLNet's MLP is ungated (gated_gelu is T5 v1.1's)",
        ),
    },
}


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of one Transformer; every field is a hyper-parameter of the network."""

    name: str = "gpt_debug"
    """Label used in the run directory and logs."""
    family: str = "gpt"
    """Architecture family: gpt | bert | t5 | glm | electra | bart | xlnet (one shared block
    library)."""
    objective: str = "clm"
    """Default pretraining objective of this model (data.objective overrides it)."""
    vocab_size: int | None = None
    """Embedding rows before padding; None takes the tokenizer's vocabulary size."""
    make_vocab_size_divisible_by: int = 1
    """Pad the embedding table to a multiple of this (64 or 128 helps GPU matmuls)."""
    n_layer: int = 4
    """Number of Transformer blocks."""
    d_model: int = 128
    """Hidden size (width of the residual stream)."""
    n_head: int = 4
    """Attention heads; must divide d_model."""
    d_ff: int | None = None
    """Inner size of the MLP; None means 4 * d_model."""
    max_seq_len: int = 128
    """Rows of the learned position table: the longest sequence the model accepts, in tokens."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention probabilities and residual branches."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""
    tie_embeddings: bool = True
    """Share the token embedding with the output projection."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of weights."""
    pre_ln: bool = True
    """Normalise before each sub-layer (GPT-2, T5, GLM); false is BERT's post-LN."""
    norm: str = "layernorm"
    """layernorm | rmsnorm (T5)."""
    activation: str = "gelu_tanh"
    """MLP activation: gelu_tanh (GPT-2) | gelu (BERT) | relu (T5 v1.0) | gated_gelu (T5 v1.1)."""
    bias: bool = True
    """Biases in linear layers and norms (T5 has none)."""
    position: str = "learned"
    """Position encoding: learned | rotary | relative (T5 buckets) | relative_sinusoidal
    (NEZHA: fixed sinusoids of the clipped distance added to keys and values; BERT family) |
    relative_xl (Transformer-XL and XLNet: sinusoids of the query-key distance, projected by
    every layer into a position term of the scores, with learned biases; family xlnet) |
    none."""
    rotary_base: float = 10000.0
    """Base of the rotary frequencies (position=rotary)."""
    max_relative_position: int = 64
    """position=relative_sinusoidal: the k of clip(j - i, -k, k), in tokens; farther keys share
    the distance k (NEZHA: 64). The fixed table has 2k + 1 rows."""
    type_vocab_size: int = 0
    """Token-type (segment) embeddings (BERT: 2); 0 disables them."""
    embedding_size: int | None = None
    """ALBERT factorised embeddings (and ELECTRA's shared ones): token embedding width,
    projected to d_model (and to the generator's width); None = d_model."""
    share_layers: bool = False
    """ALBERT cross-layer sharing: one set of block weights applied n_layer times."""
    n_decoder_layer: int | None = None
    """Encoder-decoder models (T5, BART): decoder depth; None = n_layer."""
    d_kv: int | None = None
    """Size of one attention head; None = d_model // n_head (T5 sets it explicitly)."""
    relative_buckets: int = 32
    """T5 relative position bias: number of buckets."""
    relative_max_distance: int = 128
    """T5 relative position bias: distance beyond which all offsets share a bucket."""
    scale_logits: bool = False
    """Multiply the decoder output by d_model**-0.5 before a tied projection (T5 v1.0)."""
    pair_head: bool | None = None
    """BERT family: the [CLS] pooler and 2-way classifier that mlm_nsp and mlm_sop train.
    None builds them (BERT, ALBERT); false leaves them out, for objectives without a pair task
    (RoBERTa's mlm). The other families have no such head and keep None."""
    pair_classes: int = 2
    """BERT family, pair head: classes of its classifier (NSP, SOP: 2; StructBERT's mlm_struct:
    3, next / previous / random). Must match the objective's label; 2 without a pair head."""
    sbo_max_targets: int = 0
    """BERT family: SpanBERT's span boundary head (objective mlm_sbo) with this many rows of
    relative positions inside a span (SpanBERT: 15, as data.mlm.sbo_max_targets); 0 builds no
    such head."""
    sbo_position_size: int = 200
    """Width of the span boundary head's relative position embeddings (SpanBERT: 200)."""
    generator_size: float = 0.25
    """ELECTRA: the generator's d_model, d_ff and n_head as a share of the discriminator's
    (Clark et al. 2020, Table 6: 1/4 for Small and Large, 1/3 for Base); it has the same depth
    and reads the same embeddings. Each product must be a whole number."""
    rtd_weight: float = 50.0
    """ELECTRA: lambda of the loss MLM_generator + lambda x RTD_discriminator (paper: 50)."""
    mem_len: int = 0
    """XLNet family: positions of segment memory kept per layer (Transformer-XL): a forward
    pass with return_mems=True hands back the last mem_len inputs of every layer, which the
    next segment attends to without gradient; 0 keeps none."""
    clamp_len: int = -1
    """XLNet family: relative distances beyond this share the encoding of +-clamp_len, in
    tokens (Hugging Face's clamp_len); -1 clamps nothing."""
    moe: MoeConfig = field(default_factory=MoeConfig)
    """Mixture-of-experts layers (num_experts 0: dense)."""

    @property
    def head_dim(self) -> int:
        return self.d_kv if self.d_kv is not None else self.d_model // self.n_head

    @property
    def has_pair_head(self) -> bool:
        """Whether the model builds the sentence-pair head (BERT, unless pair_head=false)."""
        return self.family == "bert" and self.pair_head is not False

    @property
    def ffn_size(self) -> int:
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    def generator_config(self) -> ModelConfig:
        """ELECTRA's generator: a BERT-family masked LM of the discriminator's depth whose
        width, MLP and heads are generator_size times the discriminator's, over the shared
        embeddings (embedding_size wide, or d_model) and without a pair head."""
        g = self.generator_size
        return dataclasses.replace(
            self,
            name=f"{self.name}_generator",
            family="bert",
            objective="mlm",
            d_model=round(self.d_model * g),
            n_head=round(self.n_head * g),
            d_ff=round(self.ffn_size * g),
            d_kv=None,
            embedding_size=self.embedding_size or self.d_model,
            pair_head=False,
            generator_size=ModelConfig.generator_size,
            rtd_weight=ModelConfig.rtd_weight,
        )

    def padded_vocab_size(self, vocab_size: int | None = None) -> int:
        """Embedding rows actually allocated: the vocabulary rounded up to the multiple."""
        v = vocab_size if vocab_size is not None else self.vocab_size
        if v is None:
            raise ConfigError("model.vocab_size is unset and no tokenizer vocabulary was given")
        m = self.make_vocab_size_divisible_by
        return ((v + m - 1) // m) * m

    def validate(self) -> None:
        """Raise ValueError naming the field for any impossible value."""
        if self.family not in FAMILIES:
            raise ConfigError(f"model.family={self.family!r} is unknown; choose one of {FAMILIES}")
        positive = ("n_layer", "d_model", "n_head", "max_seq_len", "make_vocab_size_divisible_by")
        for key in positive:
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be > 0")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ConfigError(f"model.vocab_size={self.vocab_size} must be > 0 (or null)")
        if self.d_ff is not None and self.d_ff <= 0:
            raise ConfigError(f"model.d_ff={self.d_ff} must be > 0 (or null)")
        if self.d_kv is None and self.d_model % self.n_head:
            raise ConfigError(
                f"model.n_head={self.n_head} does not divide model.d_model={self.d_model}"
            )
        for key, allowed in (("norm", NORMS), ("activation", ACTIVATIONS), ("position", POSITIONS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(
                    f"model.{key}={getattr(self, key)!r} is unknown; choose one of {allowed}"
                )
        if self.position in ("rotary", "relative_sinusoidal") and self.head_dim % 2:
            raise ConfigError(
                f"model.position={self.position} needs an even head size, got {self.head_dim}"
            )
        if self.position == "relative_xl" and self.d_model % 2:
            raise ConfigError(
                f"model.position=relative_xl needs an even model.d_model (half sines, half "
                f"cosines), got {self.d_model}"
            )
        if self.max_relative_position < 1:
            raise ConfigError(
                f"model.max_relative_position={self.max_relative_position} must be >= 1"
            )
        for key in ("type_vocab_size", "relative_buckets", "relative_max_distance"):
            if getattr(self, key) < 0:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 0")
        for key in ("embedding_size", "n_decoder_layer", "d_kv"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"model.{key}={value} must be > 0 (or null)")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.layer_norm_eps <= 0 or self.init_std <= 0:
            raise ConfigError("model.layer_norm_eps and model.init_std must be > 0")
        self._check_family()
        self._check_sbo()
        self._check_generator()
        self._check_memory()
        if isinstance(self.pair_classes, bool) or not isinstance(self.pair_classes, int):
            raise ConfigError(f"model.pair_classes={self.pair_classes!r} must be an integer")
        if self.pair_classes < 2:
            raise ConfigError(f"model.pair_classes={self.pair_classes} must be >= 2")
        if self.pair_classes != 2 and not self.has_pair_head:
            raise ConfigError(
                f"model.pair_classes={self.pair_classes} needs the sentence-pair head "
                "(family bert, model.pair_head not false); leave it at 2"
            )
        self.check_objective(self.objective)
        self.moe.validate(n_layer=min(self.n_layer, self.n_decoder_layer or self.n_layer))
        if self.moe.enabled and self.share_layers:
            raise ConfigError(
                "model.moe.num_experts > 0 with model.share_layers=true: ALBERT's one shared "
                "block cannot be both dense and MoE; set one of them off"
            )
        causal = self.family in ("gpt", "glm", "t5")
        if self.moe.enabled and causal and self.moe.drop_policy == "probs":
            raise ConfigError(
                f"model.moe.drop_policy=probs with model.family={self.family}: later tokens "
                "would decide which earlier ones are dropped, which a causal model must not "
                "see; use drop_policy=position"
            )

    def check_objective(self, objective: str) -> None:
        """ConfigError if this model cannot train `objective` (model.objective, or a
        data.objective overriding it): a pair task needs the pair head, with as many classes
        as its label has."""
        if objective in PAIR_OBJECTIVES and self.pair_head is False:
            raise ConfigError(
                f"objective {objective} scores a sentence-pair label, but model.pair_head=false "
                "builds no pair head; set model.pair_head=null or use objective mlm"
            )
        need = PAIR_CLASSES.get(objective)
        if need is not None and self.has_pair_head and self.pair_classes != need:
            raise ConfigError(
                f"objective {objective} scores a {need}-class pair label, but "
                f"model.pair_classes={self.pair_classes}; set model.pair_classes={need}"
            )
        if (objective == "electra") != (self.family == "electra"):
            raise ConfigError(
                f"objective {objective} with model.family={self.family}: family electra (a "
                "generator and a discriminator) trains with objective electra, and electra "
                "needs it"
            )
        if objective == "plm" and self.family != "xlnet":
            raise ConfigError(
                f"objective plm with model.family={self.family}: the permutation LM predicts "
                "through XLNet's query stream; use model.family=xlnet"
            )
        if self.family == "xlnet" and objective not in XLNET_OBJECTIVES:
            raise ConfigError(
                f"objective {objective} with model.family=xlnet: XLNet trains with "
                f"{' or '.join(XLNET_OBJECTIVES)} (the causal LM is Transformer-XL's)"
            )
        if (objective in SEQ2SEQ_OBJECTIVES) != (self.family in SEQ2SEQ_FAMILIES):
            raise ConfigError(
                f"objective {objective} with model.family={self.family}: the encoder-decoder "
                f"families {SEQ2SEQ_FAMILIES} train with the objectives {SEQ2SEQ_OBJECTIVES}, "
                "and those need an encoder-decoder"
            )
        if (objective == "mlm_sbo") != (self.sbo_max_targets > 0):
            raise ConfigError(
                f"objective {objective} with model.sbo_max_targets={self.sbo_max_targets}: "
                "the span boundary head (sbo_max_targets > 0) trains with objective mlm_sbo, "
                "and mlm_sbo needs it"
            )

    def _check_sbo(self) -> None:
        """The span boundary head: BERT family only, sizes >= 0 / > 0."""
        if self.sbo_max_targets < 0 or self.sbo_position_size <= 0:
            raise ConfigError(
                f"model.sbo_max_targets={self.sbo_max_targets} must be >= 0 and "
                f"model.sbo_position_size={self.sbo_position_size} > 0"
            )
        if self.sbo_max_targets and self.family != "bert":
            raise ConfigError(
                f"model.sbo_max_targets={self.sbo_max_targets} is not supported by "
                f"family={self.family} (the span boundary head is SpanBERT's); set it to 0"
            )

    def _check_generator(self) -> None:
        """ELECTRA's fields: other families keep their defaults; the generator's sizes are
        whole numbers of heads that divide its width."""
        g, w = self.generator_size, self.rtd_weight
        if self.family != "electra":
            for key, value in (("generator_size", g), ("rtd_weight", w)):
                if value != getattr(ModelConfig, key):
                    raise ConfigError(
                        f"model.{key}={value} is not supported by family={self.family} (it "
                        f"sizes ELECTRA's generator and loss); leave it at "
                        f"{getattr(ModelConfig, key)}"
                    )
            return
        if not (0 < g <= 1 and math.isfinite(g)):
            raise ConfigError(f"model.generator_size={g} must be in (0, 1]")
        if not (w > 0 and math.isfinite(w)):
            raise ConfigError(f"model.rtd_weight={w} must be > 0")
        if self.moe.enabled:
            raise ConfigError(
                f"model.moe.num_experts={self.moe.num_experts} is not supported by "
                "family=electra; set it to 0"
            )
        sizes = {"d_model": self.d_model, "d_ff": self.ffn_size, "n_head": self.n_head}
        for key, size in sizes.items():
            scaled = size * g
            if abs(scaled - round(scaled)) > 1e-6 or round(scaled) < 1:
                raise ConfigError(
                    f"model.generator_size={g} x model.{key}={size} = {scaled:.6g} is not a "
                    "whole number >= 1 (the generator's size)"
                )
        gen_d, gen_h = round(self.d_model * g), round(self.n_head * g)
        if gen_d % gen_h:
            raise ConfigError(
                f"model.generator_size={g} gives the generator {gen_h} heads, which do not "
                f"divide its width {gen_d}"
            )

    def _check_memory(self) -> None:
        """Transformer-XL's fields: family xlnet only, mem_len >= 0, clamp_len -1 or >= 1."""
        if self.family != "xlnet":
            for key in ("mem_len", "clamp_len"):
                value = getattr(self, key)
                if value != getattr(ModelConfig, key):
                    raise ConfigError(
                        f"model.{key}={value} is not supported by family={self.family} (it "
                        f"belongs to XLNet's relative attention); leave it at "
                        f"{getattr(ModelConfig, key)}"
                    )
            return
        if self.mem_len < 0:
            raise ConfigError(f"model.mem_len={self.mem_len} must be >= 0 (0: no memory)")
        if self.clamp_len != -1 and self.clamp_len < 1:
            raise ConfigError(f"model.clamp_len={self.clamp_len} must be >= 1 (or -1: no clamping)")

    def _check_family(self) -> None:
        """The family's own constraints (FAMILY_FIELDS, and the two that are not a list)."""
        for key, (accepted, why) in FAMILY_FIELDS[self.family].items():
            value = getattr(self, key)
            if value not in accepted:
                wanted = (
                    f"set it to {accepted[0]!r}"
                    if len(accepted) == 1
                    else (f"choose one of {accepted}")
                )
                raise ConfigError(
                    f"model.{key}={value!r} is not supported by family={self.family} ({why}); "
                    f"{wanted}"
                )
        if self.family in ("bart", "xlnet") and self.moe.enabled:
            raise ConfigError(
                f"model.moe.num_experts={self.moe.num_experts} is not supported by "
                f"family={self.family} (its blocks are dense); set it to 0"
            )
        if self.family == "glm" and self.n_head * self.head_dim != self.d_model:
            raise ConfigError(
                f"model.d_kv={self.d_kv} is not supported by family=glm: its attention is "
                f"d_model={self.d_model} wide, so d_kv must be null or d_model / n_head"
            )
        # T5: each side needs exact buckets, and log-spaced ones need max_distance beyond them.
        if self.family == "t5" and (
            self.relative_buckets < 4 or self.relative_max_distance <= self.relative_buckets // 2
        ):
            raise ConfigError(
                f"model.relative_buckets={self.relative_buckets} must be >= 4 and "
                f"model.relative_max_distance={self.relative_max_distance} > "
                "relative_buckets / 2"
            )
