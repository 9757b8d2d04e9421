"""Schema of the `data` config group, with one sub-schema per objective family."""

from __future__ import annotations

from dataclasses import dataclass, field

OBJECTIVES = ("clm", "mlm", "mlm_nsp", "mlm_sop", "span_corruption", "glm_blank")


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
    """... and share replaced by a random token; the rest keep their token."""
    unit: str = "token"
    """What is masked together: token | word (whole-word masking) | span (SpanBERT)."""
    span_p: float = 0.2
    """unit=span: parameter of the geometric span-length distribution."""
    span_max: int = 10
    """unit=span: longest span, in words."""
    pair_swap_prob: float = 0.5
    """mlm_nsp / mlm_sop: share of pairs that are negative (random next / swapped order)."""


@dataclass(kw_only=True)
class SpanCorruptionConfig:
    """T5 span corruption."""

    noise_density: float = 0.15
    """Share of input tokens that are corrupted."""
    mean_span: float = 3.0
    """Mean corrupted span length, in tokens."""


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
    """Share of documents held out for evaluation when preparing the built-in corpus."""
    objective: str | None = None
    """Pretraining objective applied to each batch; None takes model.objective. One of
    clm | mlm | mlm_nsp | mlm_sop | span_corruption | glm_blank."""
    document_attention: bool = False
    """Stop attention and position ids from crossing document boundaries in packed rows."""
    num_workers: int = 0
    """DataLoader worker processes that read and transform batches ahead of the step."""
    mlm: MlmConfig = field(default_factory=MlmConfig)
    span_corruption: SpanCorruptionConfig = field(default_factory=SpanCorruptionConfig)
    glm: GlmConfig = field(default_factory=GlmConfig)

    def validate(self) -> None:
        if self.seq_len is not None and self.seq_len <= 1:
            raise ValueError(f"data.seq_len={self.seq_len} must be > 1 (or null)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise ValueError(
                f"data.objective={self.objective!r} is unknown; choose one of {OBJECTIVES}"
            )
        if not self.tokenizer:
            raise ValueError("data.tokenizer must not be empty")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers={self.num_workers} must be >= 0")
        if self.sources is not None:
            if self.path is not None:
                raise ValueError("set data.path or data.sources, not both")
            if not self.sources:
                raise ValueError("data.sources is empty")
            for i, source in enumerate(self.sources):
                if not source.weight > 0:
                    raise ValueError(f"data.sources[{i}].weight={source.weight} must be > 0")
