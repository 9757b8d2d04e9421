"""Schema of the `data` config group, with one sub-schema per objective family.

`DataConfig.validate()` rejects, before any work starts, every value no run can use, with a
`common.errors.ConfigError` naming the field and value. Each objective's sub-config checks its
own fields (`MlmConfig.validate()` ...), and `DataConfig.check_objective` the constraints
between the fields and an objective at a sequence length; the objectives call the same checks
when they are built, so a config that was never validated is refused the same way.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field

from common.errors import ConfigError
from data_pipeline.tokenizers import check_spec

OBJECTIVES = (
    "clm",
    "mlm",
    "mlm_nsp",
    "mlm_sop",
    "mlm_sbo",
    "mlm_struct",
    "span_corruption",
    "glm_blank",
    "unilm",
    "electra",
    "denoising",
    "mass",
    "plm",
)
MLM_UNITS = ("token", "word", "span", "ngram", "phrase", "knowledge")
# ERNIE 1.0's masking levels, in the order of data.mlm.knowledge_stages.
KNOWLEDGE_STAGES = ("token", "phrase", "entity")
UNILM_TASKS = ("bidirectional", "seq2seq", "left_to_right", "right_to_left")
# Objectives whose inputs keep the documents of a packed row apart (data.document_attention):
# the others cut segments at document boundaries already (the pair tasks, which need attention
# between their two segments) or rearrange the row (span corruption, blank infilling, BART's
# denoising, MASS, XLNet's permutation language modelling).
DOCUMENT_ATTENTION_OBJECTIVES = ("clm", "mlm")
# Shortest seq_len that holds one sample: mlm needs [CLS] x [SEP], the pair tasks
# [CLS] a [SEP] b [SEP], span corruption a kept token, a sentinel and <eos>, blank infilling
# a token and a span of two around its mask; denoising and mass a noised token beside one left
# as it is (BART's source, MASS's encoder context for the fragment); plm one predicted token
# and XLNet's closing [SEP] [CLS].
MIN_SEQ_LEN = {
    "clm": 1,
    "mlm": 3,
    "mlm_nsp": 5,
    "mlm_sop": 5,
    "mlm_struct": 5,
    "mlm_sbo": 3,
    "span_corruption": 3,
    "glm_blank": 4,
    "unilm": 5,
    "electra": 3,
    "denoising": 2,
    "mass": 2,
    "plm": 3,
}
# BART's noising functions (data.denoising): at least one must be on.
DENOISING_FUNCTIONS = ("infill_ratio", "mask_ratio", "delete_ratio", "permute_sentences", "rotate")
# Shares that add up to 1 on paper may exceed it by a rounding error in floating point.
_SHARE_SLACK = 1e-9


def check_seq_len(objective: str, seq_len: int) -> None:
    """ConfigError if samples of `seq_len` tokens are too short for `objective`."""
    need = MIN_SEQ_LEN.get(objective, 1)
    if seq_len < need:
        raise ConfigError(
            f"data.seq_len={seq_len} is too short for data.objective={objective} (needs >= {need})"
        )


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}={value!r} must be a number")
    return float(value)


def _in_interval(name: str, value, *, closed_low: bool = False, closed_high: bool = False):
    """ConfigError unless value lies in the unit interval with the given ends."""
    v = _real(name, value)
    low_ok = v >= 0.0 if closed_low else v > 0.0
    high_ok = v <= 1.0 if closed_high else v < 1.0
    if not (low_ok and high_ok):
        interval = f"{'[' if closed_low else '('}0, 1{']' if closed_high else ')'}"
        raise ConfigError(f"{name}={value!r} must be in {interval}")


def _positive_int(name: str, value, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")


@dataclass(kw_only=True)
class SourceConfig:
    """One prepared corpus in a weighted blend."""

    path: str
    """A directory written by launch/prepare_data.py."""
    weight: float = 1.0
    """Relative share of samples drawn from this source (normalised over all sources)."""


@dataclass(kw_only=True)
class MlmConfig:
    """Masked language modelling (BERT, SpanBERT) and the sentence-pair tasks (NSP, SOP)."""

    mask_prob: float = 0.15
    """Share of (non-special) tokens chosen for prediction."""
    replace_with_mask: float = 0.8
    """Of the chosen tokens: share replaced by [MASK] ..."""
    replace_with_random: float = 0.1
    """... and share replaced by a random token; the rest keep their token. electra takes
    these two at their defaults as unset and puts [MASK] everywhere, as its paper does."""
    unit: str = "token"
    """What is masked together: token | word (whole-word masking) | span (SpanBERT) |
    ngram (UniLM: one token 80% of the time, a bigram or a trigram 10% each) | phrase
    (n-grams of 1, 2 or 3 whole words with P(n) proportional to 1/n) | knowledge (ERNIE 1.0:
    each sample masked at one level of data.mlm.knowledge_stages)."""
    knowledge_stages: list[float] = field(default_factory=lambda: [0.5, 0.25, 0.25])
    """unit=knowledge: shares of samples masked at token, phrase and entity level (ERNIE 1.0
    runs the levels as consecutive training stages; a per-sample mix keeps every level in
    every stretch of training). Entity level masks the corpus's entity spans whole, and
    falls back to phrase masking, with a logged warning, on a corpus without them."""
    span_p: float = 0.2
    """unit=span: parameter of the geometric span-length distribution."""
    span_max: int = 10
    """unit=span: longest span, in words."""
    pair_swap_prob: float = 0.5
    """mlm_nsp / mlm_sop: share of pairs that are negative (random next / swapped order)."""
    shuffle_prob: float = 0.05
    """mlm_struct (StructBERT's word structural objective): share of the unmasked,
    non-overlapping n-grams of shuffle_len tokens whose order is shuffled (paper: 5%)."""
    shuffle_len: int = 3
    """mlm_struct: tokens per shuffled n-gram (paper: K = 3, trigrams)."""
    sbo_max_targets: int = 15
    """mlm_sbo: tokens of one masked span that the span boundary objective scores, at
    relative positions 0..n-1; later tokens of a longer span are scored by MLM only
    (SpanBERT's --max-pair-targets 15)."""

    def validate(self) -> None:
        """ConfigError naming the data.mlm field of any impossible value."""
        if self.unit not in MLM_UNITS:
            raise ConfigError(f"data.mlm.unit={self.unit!r} is unknown; choose one of {MLM_UNITS}")
        _in_interval("data.mlm.mask_prob", self.mask_prob)
        for key in ("replace_with_mask", "replace_with_random", "pair_swap_prob"):
            _in_interval(f"data.mlm.{key}", getattr(self, key), closed_low=True, closed_high=True)
        if self.replace_with_mask + self.replace_with_random > 1.0:
            raise ConfigError(
                f"data.mlm.replace_with_mask + data.mlm.replace_with_random = "
                f"{self.replace_with_mask + self.replace_with_random} exceeds 1"
            )
        _in_interval("data.mlm.span_p", self.span_p, closed_high=True)
        _positive_int("data.mlm.span_max", self.span_max)
        _in_interval("data.mlm.shuffle_prob", self.shuffle_prob, closed_low=True, closed_high=True)
        _positive_int("data.mlm.shuffle_len", self.shuffle_len, minimum=2)
        _positive_int("data.mlm.sbo_max_targets", self.sbo_max_targets)
        self._validate_stages()

    def _validate_stages(self) -> None:
        stages = self.knowledge_stages
        if isinstance(stages, (str, bytes)) or not hasattr(stages, "__len__"):
            raise ConfigError(f"data.mlm.knowledge_stages={stages!r} must be a list of 3 shares")
        if len(stages) != len(KNOWLEDGE_STAGES):
            raise ConfigError(
                f"data.mlm.knowledge_stages={list(stages)} must hold {len(KNOWLEDGE_STAGES)} "
                f"shares ({' / '.join(KNOWLEDGE_STAGES)})"
            )
        for level, share in zip(KNOWLEDGE_STAGES, stages, strict=True):
            _in_interval(
                f"data.mlm.knowledge_stages ({level})", share, closed_low=True, closed_high=True
            )
        if abs(sum(stages) - 1.0) > 1e-6:
            raise ConfigError(
                f"data.mlm.knowledge_stages={list(stages)} add up to {sum(stages)}, not 1"
            )


@dataclass(kw_only=True)
class SpanCorruptionConfig:
    """T5 span corruption."""

    noise_density: float = 0.15
    """Share of input tokens that are corrupted."""
    mean_span: float = 3.0
    """Mean corrupted span length, in tokens."""

    def validate(self) -> None:
        """ConfigError naming the data.span_corruption field of any impossible value (whether
        the kept tokens can separate the spans depends on the window: see span_corruption)."""
        _in_interval("data.span_corruption.noise_density", self.noise_density)
        if not _real("data.span_corruption.mean_span", self.mean_span) >= 1.0:
            raise ConfigError(f"data.span_corruption.mean_span={self.mean_span!r} must be >= 1")


@dataclass(kw_only=True)
class UnilmConfig:
    """UniLM's mix of language-modelling tasks: the share of samples trained under each
    self-attention mask (Dong et al. 2019: 1/3 bidirectional, 1/3 sequence-to-sequence, 1/6
    each unidirectional)."""

    bidirectional: float = 1 / 3
    """Every token sees every other (with next sentence prediction, as BERT)."""
    seq2seq: float = 1 / 3
    """The source segment sees itself; the target sees the source and its own left."""
    left_to_right: float = 1 / 6
    """Each token sees itself and the tokens on its left."""
    right_to_left: float = 1 / 6
    """Each token sees itself and the tokens on its right."""

    def validate(self) -> None:
        """ConfigError naming the data.unilm field of any impossible value."""
        shares = {k: getattr(self, k) for k in UNILM_TASKS}
        for key, value in shares.items():
            _in_interval(f"data.unilm.{key}", value, closed_low=True, closed_high=True)
        if abs(sum(shares.values()) - 1.0) > 1e-6:
            raise ConfigError(f"data.unilm shares {shares} add up to {sum(shares.values())}, not 1")


@dataclass(kw_only=True)
class GlmConfig:
    """GLM autoregressive blank infilling and its multi-task variants."""

    mask_ratio: float = 0.15
    """[MASK] task: spans are drawn until at least this share of tokens is masked."""
    poisson_lambda: float = 3.0
    """[MASK] task: span lengths ~ Poisson(lambda)."""
    sentence_prob: float = 0.0
    """Share of samples using the [sMASK] task (whole sentences, 15% of tokens)."""
    gmask_prob: float = 0.0
    """Share of samples using the [gMASK] task (one span of 50-100% at the end)."""
    gmask_min_ratio: float = 0.5
    """[gMASK] task: shortest generated span as a share of the sample."""
    gmask_max_ratio: float = 1.0
    """[gMASK] task: longest generated span as a share of the sample."""

    def validate(self) -> None:
        """ConfigError naming the data.glm field of any impossible value."""
        _in_interval("data.glm.mask_ratio", self.mask_ratio)
        lam = _real("data.glm.poisson_lambda", self.poisson_lambda)
        if not (lam > 0 and math.isfinite(lam)):
            raise ConfigError(
                f"data.glm.poisson_lambda={self.poisson_lambda!r} must be a finite number > 0"
            )
        for key in ("sentence_prob", "gmask_prob"):
            _in_interval(f"data.glm.{key}", getattr(self, key), closed_low=True, closed_high=True)
        if self.sentence_prob + self.gmask_prob > 1.0 + _SHARE_SLACK:
            raise ConfigError(
                f"data.glm.sentence_prob + data.glm.gmask_prob = "
                f"{self.sentence_prob + self.gmask_prob} must be <= 1"
            )
        low = _real("data.glm.gmask_min_ratio", self.gmask_min_ratio)
        high = _real("data.glm.gmask_max_ratio", self.gmask_max_ratio)
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError(
                f"need 0 < data.glm.gmask_min_ratio={self.gmask_min_ratio} <= "
                f"data.glm.gmask_max_ratio={self.gmask_max_ratio} <= 1"
            )


@dataclass(kw_only=True)
class DenoisingConfig:
    """BART's noising functions (Lewis et al. 2020, section 2.2). The defaults are BART-large's
    mix: text infilling of 30% of the tokens and permutation of every sample's sentences."""

    infill_ratio: float = 0.3
    """Text infilling: share of the window's tokens removed in spans, each span leaving one
    [MASK]."""
    poisson_lambda: float = 3.0
    """Text infilling: span lengths ~ Poisson(lambda); a zero-length span inserts a [MASK]."""
    mask_ratio: float = 0.0
    """Token masking: share of the window's tokens replaced one for one by [MASK]."""
    delete_ratio: float = 0.0
    """Token deletion: share of the window's tokens removed without a trace."""
    random_ratio: float = 0.0
    """Share of the [MASK] tokens that infilling and masking emit which become a uniformly
    drawn non-special token instead (fairseq's --mask-random)."""
    permute_sentences: float = 1.0
    """Share of samples whose sentences are shuffled within each document."""
    rotate: float = 0.0
    """Share of samples whose source is rotated to begin at a random token (document
    rotation)."""

    def validate(self) -> None:
        """ConfigError naming the data.denoising field of any impossible value."""
        for key in ("infill_ratio", "mask_ratio", "delete_ratio", "random_ratio"):
            _in_interval(f"data.denoising.{key}", getattr(self, key), closed_low=True)
        removed = self.infill_ratio + self.mask_ratio + self.delete_ratio
        if not removed < 1.0:
            raise ConfigError(
                f"data.denoising.infill_ratio={self.infill_ratio} + mask_ratio={self.mask_ratio} "
                f"+ delete_ratio={self.delete_ratio} = {removed} must be < 1"
            )
        lam = _real("data.denoising.poisson_lambda", self.poisson_lambda)
        if not (lam > 0 and math.isfinite(lam)):
            raise ConfigError(
                f"data.denoising.poisson_lambda={self.poisson_lambda!r} must be a finite number > 0"
            )
        for key in ("permute_sentences", "rotate"):
            _in_interval(
                f"data.denoising.{key}", getattr(self, key), closed_low=True, closed_high=True
            )
        if not any(getattr(self, key) for key in DENOISING_FUNCTIONS):
            names = ", ".join(DENOISING_FUNCTIONS)
            raise ConfigError(
                f"data.denoising turns every noising function off ({names} all 0), so the "
                "source would equal the target; turn at least one on"
            )

    def counts(self, window: int) -> tuple[int, int, int]:
        """(infilled, masked, deleted) tokens of a window of `window` tokens: each ratio times
        the window, rounded half to even. The three sets are disjoint and must leave at least
        one token of the window alone, else ConfigError (only a very short window fails)."""
        self.validate()
        infill, mask, delete = (
            round(window * ratio)
            for ratio in (self.infill_ratio, self.mask_ratio, self.delete_ratio)
        )
        if infill + mask + delete >= window:
            raise ConfigError(
                f"data.seq_len={window} is too short for data.denoising: infilling, masking and "
                f"deletion take {infill} + {mask} + {delete} of its {window} tokens and must leave "
                "one; raise data.seq_len or lower the ratios"
            )
        return infill, mask, delete


@dataclass(kw_only=True)
class MassConfig:
    """MASS, masked sequence-to-sequence pretraining (Song et al. 2019): the encoder sees the
    window with one fragment masked, the decoder predicts that fragment."""

    fragment_ratio: float = 0.5
    """Length of the masked fragment as a share of the window, at least one token (the
    paper's 50%)."""
    replace_with_mask: float = 0.8
    """Of the fragment's encoder tokens: share replaced by [MASK] ..."""
    replace_with_random: float = 0.1
    """... and share replaced by a random non-special token; the rest keep their token
    (the paper's 80/10/10, section 4.1)."""

    def validate(self) -> None:
        """ConfigError naming the data.mass field of any impossible value."""
        _in_interval("data.mass.fragment_ratio", self.fragment_ratio)
        for key in ("replace_with_mask", "replace_with_random"):
            _in_interval(f"data.mass.{key}", getattr(self, key), closed_low=True, closed_high=True)
        if self.replace_with_mask + self.replace_with_random > 1.0 + _SHARE_SLACK:
            raise ConfigError(
                f"data.mass.replace_with_mask={self.replace_with_mask} + replace_with_random="
                f"{self.replace_with_random} = {self.replace_with_mask + self.replace_with_random} "
                "exceeds 1"
            )


@dataclass(kw_only=True)
class PlmConfig:
    """XLNet's permutation language modelling with partial prediction (Yang et al. 2019): spans
    of the window are predicted, last in a random factorisation order."""

    predict_ratio: float = 1 / 6
    """Share of the window's tokens predicted, at least one: the last 1/K of each factorisation
    order (K = 6; the paper uses 6 or 7). Each span of L targets is placed in a context of
    round(L / predict_ratio) tokens."""
    max_span: int = 5
    """Longest span of consecutive targets; span lengths are uniform in 1..max_span (XLNet's
    largest n-gram)."""

    def validate(self) -> None:
        """ConfigError naming the data.plm field of any impossible value."""
        _in_interval("data.plm.predict_ratio", self.predict_ratio)
        _positive_int("data.plm.max_span", self.max_span)


@dataclass(kw_only=True)
class DataConfig:
    """Where training samples come from and how they are turned into batches."""

    path: str | None = None
    """A directory written by launch/prepare_data.py (holds manifest.json); None uses the
    built-in sample corpus, prepared on first use into cache_dir."""
    sources: list[SourceConfig] | None = None
    """Weighted blend of prepared corpora ([{path, weight}, ...]); replaces `path`."""
    tokenizer: str = "byte"
    """Tokenizer for the built-in corpus: byte | bpe:N | wordpiece:N | unigram:N | a
    tokenizer.json | a SentencePiece .model."""
    seq_len: int | None = None
    """Tokens per training sample; None means model.max_seq_len."""
    cache_dir: str | None = None
    """Where the built-in corpus is prepared; None means $LOOM_CACHE or ~/.cache/loom."""
    val_fraction: float = 0.05
    """Share of documents held out for evaluation when preparing the built-in corpus; 0
    prepares it without a validation split (then set trainer.eval_every=0)."""
    objective: str | None = None
    """Pretraining objective applied to each batch; None takes model.objective. One of
    clm | mlm | mlm_nsp | mlm_sop | mlm_sbo | mlm_struct | span_corruption | glm_blank |
    unilm | electra | denoising | mass | plm."""
    document_attention: bool = False
    """Stop attention and position ids from crossing document boundaries in packed rows."""
    num_workers: int = 0
    """DataLoader worker processes that read and transform batches ahead of the step."""
    mlm: MlmConfig = field(default_factory=MlmConfig)
    span_corruption: SpanCorruptionConfig = field(default_factory=SpanCorruptionConfig)
    glm: GlmConfig = field(default_factory=GlmConfig)
    unilm: UnilmConfig = field(default_factory=UnilmConfig)
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)
    mass: MassConfig = field(default_factory=MassConfig)
    plm: PlmConfig = field(default_factory=PlmConfig)

    def validate(self) -> None:
        """ConfigError naming the field and value of anything that cannot run."""
        if self.seq_len is not None:
            _positive_int("data.seq_len", self.seq_len, minimum=2)
        self._validate_corpus()
        _in_interval("data.val_fraction", self.val_fraction, closed_low=True)
        if self.objective is not None:
            self.check_objective(self.objective, seq_len=self.seq_len)
        if not isinstance(self.document_attention, bool):
            raise ConfigError(f"data.document_attention={self.document_attention!r} must be a bool")
        _positive_int("data.num_workers", self.num_workers, minimum=0)
        self.mlm.validate()
        self.span_corruption.validate()
        self.glm.validate()
        self.unilm.validate()
        self.denoising.validate()
        self.mass.validate()
        self.plm.validate()

    def check_objective(self, name: str, *, seq_len: int | None = None) -> None:
        """The constraints between these fields and objective `name` (data.objective, or
        model.objective when that is None) with samples of `seq_len` tokens (when known)."""
        if name not in OBJECTIVES:
            raise ConfigError(f"data.objective={name!r} is unknown; choose one of {OBJECTIVES}")
        if self.document_attention and name not in DOCUMENT_ATTENTION_OBJECTIVES:
            raise ConfigError(
                f"data.document_attention=true is not supported by data.objective={name} "
                f"(it applies to {' and '.join(DOCUMENT_ATTENTION_OBJECTIVES)}); "
                "set data.document_attention=false"
            )
        if seq_len is not None:
            check_seq_len(name, seq_len)
            if name == "denoising":
                self.denoising.counts(seq_len)

    def _validate_corpus(self) -> None:
        """data.path, data.sources, data.tokenizer and data.cache_dir."""
        if self.path is not None and (not isinstance(self.path, str) or not self.path.strip()):
            raise ConfigError(f"data.path={self.path!r} must be a directory (or null)")
        if self.cache_dir is not None and not isinstance(self.cache_dir, str):
            raise ConfigError(f"data.cache_dir={self.cache_dir!r} must be a directory (or null)")
        check_spec(self.tokenizer)
        if self.sources is None:
            return
        if self.path is not None:
            raise ConfigError("set data.path or data.sources, not both")
        if not self.sources:
            raise ConfigError("data.sources is empty")
        seen: dict[str, int] = {}
        for i, source in enumerate(self.sources):
            path, weight = source.path, source.weight
            if not isinstance(path, str) or not path.strip():
                raise ConfigError(f"data.sources[{i}].path={path!r} must be a directory")
            w = _real(f"data.sources[{i}].weight", weight)
            if not (w > 0 and math.isfinite(w)):
                raise ConfigError(
                    f"data.sources[{i}].weight={weight!r} must be a finite number > 0"
                )
            key = os.path.normpath(os.path.expanduser(path))
            if key in seen:
                raise ConfigError(
                    f"data.sources[{i}].path={path!r} repeats data.sources[{seen[key]}]; "
                    "list each corpus once"
                )
            seen[key] = i
