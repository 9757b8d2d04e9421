"""Schema of the `data` config group."""

from __future__ import annotations

from dataclasses import dataclass

OBJECTIVES = ("clm",)


@dataclass(kw_only=True)
class DataConfig:
    """Where training samples come from and how they are turned into batches."""

    path: str | None = None
    """A directory written by launch/prepare_data.py (holds manifest.json); None uses the
    built-in sample corpus, prepared on first use into cache_dir."""
    tokenizer: str = "byte"
    """Tokenizer for the built-in corpus: byte | bpe:VOCAB | wordpiece:VOCAB | a tokenizer.json."""
    seq_len: int | None = None
    """Tokens per training sample; None means model.max_seq_len."""
    cache_dir: str | None = None
    """Where the built-in corpus is prepared; None means $LOOM_CACHE or ~/.cache/loom."""
    val_fraction: float = 0.05
    """Share of documents held out for evaluation when preparing the built-in corpus."""
    objective: str = "clm"
    """Pretraining objective applied to each batch: clm (causal language modelling)."""

    def validate(self) -> None:
        if self.seq_len is not None and self.seq_len <= 1:
            raise ValueError(f"data.seq_len={self.seq_len} must be > 1 (or null)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"data.objective={self.objective!r} is unknown; choose one of {OBJECTIVES}"
            )
        if not self.tokenizer:
            raise ValueError("data.tokenizer must not be empty")
