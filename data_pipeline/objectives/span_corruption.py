"""T5 span corruption (Raffel et al. 2020, section 3.1.4): data.objective=span_corruption.

From a raw window of `raw_len` tokens, `num_noise = round(raw_len * noise_density)` tokens in
`num_spans = round(num_noise / mean_span)` spans are corrupted. Span lengths come from T5's
random segmentation: the noise tokens and the kept tokens are each cut into `num_spans`
non-empty pieces at uniformly chosen points and interleaved kept/noise, so the window starts
with kept tokens and ends with noise. Each noise span becomes one sentinel in the input, and
the targets list the spans after their sentinels:

    window   a b c d e f g h
    noise        c d     g h
    inputs   a b <extra_id_0> e f <extra_id_1> <eos>
    targets  <extra_id_0> c d <extra_id_1> g h <eos>

Exact lengths
-------------
The counts depend only on `raw_len`, so every sample of a given window length has the same
input and target lengths. `t5_lengths(seq_len, ...)` picks, like T5's `random_spans_helper`,
the longest window whose input (kept tokens + one sentinel per span + <eos>) is at most
`seq_len` tokens; since the input grows by at most one token per window token, that input is
exactly `seq_len` long (512 inputs: 568 window tokens, 114 targets).

That window is *longer* than the loader's rows of seq_len + 1 tokens (568 > 513): corrupting
15% of the tokens and replacing ~3-token spans by one sentinel shrinks the window. The window
is therefore min(t5 window, row length) tokens from the start of the row. With rows of
seq_len + 1 tokens (the current loader) the input has fewer than seq_len real tokens (463 for
seq_len 512) and is padded with <pad> up to seq_len, with attention_mask False there; rows of
at least the T5 window length (`SpanCorruption.sample_len`) give exactly seq_len real input
tokens and no padding. Targets are never padded: their length is fixed by the window.

The window may span several packed documents; their <eos> separators are ordinary tokens
here (T5 corrupted each document chunk separately).

Legend: B = batch, R = row length (seq_len + 1 from the loader), W = window length,
N = seq_len (encoder input length), T = target length.
"""

from __future__ import annotations

import numpy as np
import torch

from common.errors import ConfigError
from data_pipeline.config import DataConfig, SpanCorruptionConfig, check_seq_len
from data_pipeline.objectives import sample_rng

__all__ = ["SpanCorruption", "corrupt_spans", "noise_mask", "span_counts", "t5_lengths"]

_SENTINEL = "<extra_id_{}>"


def span_counts(raw_len: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window of `raw_len` tokens, as T5 counts them.

    Python's round (half to even) matches TensorFlow's; at least one noise token, one kept
    token and one span, as T5 clips them. Raises if the kept tokens cannot separate the spans.
    """
    if raw_len < 2:
        raise ValueError(f"span corruption needs a window of at least 2 tokens, got {raw_len}")
    num_noise = min(max(round(raw_len * noise_density), 1), raw_len - 1)
    num_spans = max(round(num_noise / mean_span), 1)
    if raw_len - num_noise < num_spans:
        raise ConfigError(
            f"data.span_corruption.noise_density={noise_density} with mean_span={mean_span} "
            f"leaves {raw_len - num_noise} kept tokens for {num_spans} spans in a window of "
            f"{raw_len}; lower noise_density or raise mean_span"
        )
    return num_noise, num_spans


def _encoded_lengths(raw_len: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(input length, target length) of a window of `raw_len` tokens, <eos> included."""
    num_noise, num_spans = span_counts(raw_len, noise_density, mean_span)
    return raw_len - num_noise + num_spans + 1, num_noise + num_spans + 1


def t5_lengths(
    seq_len: int, noise_density: float = 0.15, mean_span: float = 3.0
) -> tuple[int, int]:
    """(raw window length, target length) for encoder inputs of exactly `seq_len` tokens.

    The longest window whose input fits in `seq_len`, as T5's `random_spans_helper` (without
    its noise_density == 0.5 adjustment, which would break exactness). t5_lengths(512) is
    (568, 114).
    """
    SpanCorruptionConfig(noise_density=noise_density, mean_span=mean_span).validate()
    check_seq_len("span_corruption", seq_len)
    raw_len = seq_len - 1  # its input is at most seq_len, since spans never outnumber noise
    while _encoded_lengths(raw_len + 1, noise_density, mean_span)[0] <= seq_len:
        raw_len += 1
    return raw_len, _encoded_lengths(raw_len, noise_density, mean_span)[1]


def _random_segmentation(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Lengths of `k` non-empty pieces of `n` items, cut at k - 1 distinct uniform points."""
    cuts = np.sort(rng.choice(n - 1, size=k - 1, replace=False)) + 1
    return np.diff(np.concatenate(([0], cuts, [n])))


def noise_mask(
    rng: np.random.Generator, raw_len: int, *, num_noise: int, num_spans: int
) -> np.ndarray:
    """Bool [raw_len], True on noise: kept and noise pieces interleaved, kept first."""
    noise_lengths = _random_segmentation(rng, num_noise, num_spans)
    kept_lengths = _random_segmentation(rng, raw_len - num_noise, num_spans)
    lengths = np.stack([kept_lengths, noise_lengths], axis=1).reshape(-1)
    return np.repeat(np.arange(2 * num_spans) % 2 == 1, lengths)


def _collapse_runs(tokens_BW: np.ndarray, run_BW: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """Each run of True in `run_BW` replaced by one sentinel (the j-th run of a row by
    sentinels[j]); positions outside runs keep their token.

    Every row has the same number of runs and run tokens, so the kept positions of the whole
    batch reshape back into equal rows.
    """
    prev_BW = np.zeros_like(run_BW)
    prev_BW[:, 1:] = run_BW[:, :-1]
    first_BW = run_BW & ~prev_BW
    run_index_BW = np.maximum(np.cumsum(first_BW, axis=1) - 1, 0)
    marked_BW = np.where(first_BW, sentinels[run_index_BW], tokens_BW)
    keep_BW = ~(run_BW & prev_BW)
    return marked_BW[keep_BW].reshape(tokens_BW.shape[0], -1)


def corrupt_spans(
    window_BW: np.ndarray, noise_BW: np.ndarray, *, sentinels: np.ndarray, eos_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of windows under their noise masks, each row ending with <eos>.

    All rows must have the same numbers of noise tokens and spans (true for masks from
    `noise_mask` with one window length).
    """
    eos_B1 = np.full((window_BW.shape[0], 1), eos_id, dtype=np.int64)
    inputs = _collapse_runs(window_BW, noise_BW, sentinels)
    targets = _collapse_runs(window_BW, ~noise_BW, sentinels)
    return np.concatenate([inputs, eos_B1], axis=1), np.concatenate([targets, eos_B1], axis=1)


class SpanCorruption:
    """data.objective=span_corruption; options in data.span_corruption.

    Output: input_ids [B, N] (padded with <pad> when the rows are shorter than `sample_len`),
    attention_mask bool [B, N], decoder_input_ids [B, T] (targets shifted right behind a
    <pad> start token, as T5) and labels [B, T] (the targets).

    `sample_len`: row length that gives exactly seq_len real input tokens (T5's window).
    `target_len`: the target length for the loader's rows of seq_len + 1 tokens (what
    training sees today, e.g. for the FLOPs count); `lengths(row_len)` for any other rows.
    """

    @staticmethod
    def row_length(cfg: DataConfig, seq_len: int) -> int:
        """Packed-row length that yields exactly seq_len encoder tokens (T5's raw window)."""
        opts = cfg.span_corruption
        return t5_lengths(seq_len, opts.noise_density, opts.mean_span)[0]

    @staticmethod
    def target_length(cfg: DataConfig, seq_len: int) -> int:
        """Decoder targets per sample of that window (T5: 114 for 512 at the defaults)."""
        opts = cfg.span_corruption
        return t5_lengths(seq_len, opts.noise_density, opts.mean_span)[1]

    def __init__(self, name: str, *, cfg: DataConfig, tokenizer, seq_len: int, seed: int):
        cfg.check_objective(name, seq_len=seq_len)
        opts = cfg.span_corruption
        self.noise_density, self.mean_span = opts.noise_density, opts.mean_span
        self.seq_len, self.seed = seq_len, seed
        self.sample_len, _ = t5_lengths(seq_len, self.noise_density, self.mean_span)
        self.target_len = self.lengths(seq_len + 1)[2]
        specials = tokenizer.special_tokens
        self.eos_id, self.pad_id = int(tokenizer.eos_id), int(tokenizer.pad_id)
        sentinels = []
        while _SENTINEL.format(len(sentinels)) in specials:
            sentinels.append(specials[_SENTINEL.format(len(sentinels))])
        self.sentinels = np.asarray(sentinels, dtype=np.int64)
        # The loader's rows hold seq_len + 1 tokens: check them now rather than mid-run.
        self._check_sentinels(min(self.sample_len, seq_len + 1))

    def _check_sentinels(self, raw_len: int) -> None:
        _, num_spans = span_counts(raw_len, self.noise_density, self.mean_span)
        if num_spans > len(self.sentinels):
            raise ConfigError(
                f"span corruption of {raw_len} tokens needs {num_spans} sentinels but the "
                f"tokenizer has {len(self.sentinels)} (<extra_id_0> ... in special_tokens); "
                "lower data.seq_len or data.span_corruption.noise_density, or raise mean_span"
            )

    def lengths(self, row_len: int) -> tuple[int, int, int]:
        """(window, real input tokens, targets) for rows of `row_len` tokens."""
        raw_len = min(self.sample_len, row_len)
        input_len, target_len = _encoded_lengths(raw_len, self.noise_density, self.mean_span)
        return raw_len, input_len, target_len

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens_BR = batch["tokens"]
        if tokens_BR.dim() != 2:
            raise ValueError(f"tokens must be [batch, row], got shape {tuple(tokens_BR.shape)}")
        raw_len, input_len, _ = self.lengths(tokens_BR.shape[1])
        self._check_sentinels(raw_len)
        num_noise, num_spans = span_counts(raw_len, self.noise_density, self.mean_span)
        noise_BW = np.stack(
            [
                noise_mask(
                    sample_rng(self.seed, sid), raw_len, num_noise=num_noise, num_spans=num_spans
                )
                for sid in batch["sample_ids"].tolist()
            ]
        )
        window_BW = tokens_BR[:, :raw_len].numpy().astype(np.int64)
        inputs, targets = corrupt_spans(
            window_BW, noise_BW, sentinels=self.sentinels, eos_id=self.eos_id
        )
        b = window_BW.shape[0]
        input_ids_BN = np.full((b, self.seq_len), self.pad_id, dtype=np.int64)
        input_ids_BN[:, :input_len] = inputs
        attention_mask_BN = np.zeros((b, self.seq_len), dtype=bool)
        attention_mask_BN[:, :input_len] = True
        start_B1 = np.full((b, 1), self.pad_id, dtype=np.int64)
        decoder_input_ids_BT = np.concatenate([start_B1, targets[:, :-1]], axis=1)
        return {
            "input_ids": torch.from_numpy(input_ids_BN),
            "attention_mask": torch.from_numpy(attention_mask_BN),
            "decoder_input_ids": torch.from_numpy(decoder_input_ids_BT),
            "labels": torch.from_numpy(targets),
        }
