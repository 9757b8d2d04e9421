"""GLM autoregressive blank infilling (Du et al. 2022) and its multi-task variants.

Legend: B = batch, S = row length (seq_len + 1), T = seq_len, N = raw window length,
k = number of spans, M = masked tokens (sum of span lengths).

One sample (every row is exactly seq_len tokens):
    Part A   the window x[:N], each span replaced by one mask token     N - M + k tokens
    Part B   the spans in a random order; span s_1..s_L is fed as      M + k tokens
             "<sop> s_1 .. s_L" and predicts "s_1 .. s_L <eop>"
    padding  <pad>, label -100, positions 0 (only when fewer spans than planned fit)

|A| + |B| = N + 2k, so each sample reads the raw window N = seq_len - 2k from the start of its
packed row (the rest of the row is unused). k is solved per sample: the smallest k whose first
k span lengths cover mask_ratio * (seq_len - 2k) tokens.

2D positions: Part A token i has position i and block position 0; every token of a span has
the position of the span's mask token in Part A and block positions 1..L+1.

Tasks, drawn per sample (the original draws one task per batch; per sample keeps the mix
independent of batch composition):
    [MASK]   prob 1 - sentence_prob - gmask_prob: spans with lengths ~ Poisson(poisson_lambda)
             truncated to 1..MAX_SPAN, drawn until >= mask_ratio of the window is covered,
             placed at random without overlap, never touching each other, never crossing a
             document boundary and never covering <eos>.
    [sMASK]  prob sentence_prob: whole sentences (split at sent_start / doc_start, <eos>
             left out), taken in random order until >= mask_ratio of the window is covered.
    [gMASK]  prob gmask_prob: one span at the end of the window whose length is uniform in
             [gmask_min_ratio, gmask_max_ratio] of the window (it may cross documents: it is
             plain left-to-right language modelling of a packed row).

Output: input_ids int64 [B, T], position_ids int64 [B, 2, T], sep int64 [B] (length of
Part A: the model builds its attention mask from it), labels int64 [B, T] (-100 on Part A and
padding). All randomness comes from `sample_rng(seed, sample_id, salt=SALT)`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from data_pipeline.config import DataConfig
from data_pipeline.objectives import IGNORE_INDEX, sample_rng

__all__ = ["MAX_SPAN", "SALT", "BlankInfilling", "assemble", "span_length_probs"]

SALT = 0x474C4D  # "GLM": keeps this objective's streams apart from other objectives'
# Longest [MASK]-task span: the original implementation draws lengths 1..39 (a cap of 40,
# exclusive); at lambda=3 longer spans have probability < 1e-20 anyway.
MAX_SPAN = 39
TASKS = ("mask", "sentence", "gmask")
_TOKENS = ("[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>", "<pad>", "<eos>")


def span_length_probs(lam: float, *, max_len: int = MAX_SPAN) -> np.ndarray:
    """P(L = 1..max_len) of Poisson(lam) conditioned on 1 <= L <= max_len."""
    lengths = np.arange(1, max_len + 1)
    log_pmf = lengths * math.log(lam) - lam - np.array([math.lgamma(n + 1) for n in lengths])
    pmf = np.exp(log_pmf - log_pmf.max())
    return pmf / pmf.sum()


def assemble(
    window_N: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
    *,
    order: np.ndarray,
    mask_id: int,
    sop_id: int,
    eop_id: int,
) -> dict[str, np.ndarray | int]:
    """Part A and Part B of one sample from non-overlapping spans (sorted by start).

    `order` is the permutation of the spans in Part B. Returns input_ids, labels, position
    and block position arrays of length N + 2k, and sep = |Part A|.
    """
    n = len(window_N)
    starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
    offset_M = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    covered_M = np.repeat(starts, lengths) + offset_M
    masked_N = np.zeros(n, dtype=bool)
    masked_N[covered_M] = True
    is_start_N = np.zeros(n, dtype=bool)
    is_start_N[starts] = True
    keep_N = ~masked_N | is_start_N
    a_tokens = np.where(is_start_N, mask_id, window_N)[keep_N]
    sep = len(a_tokens)
    mask_pos_k = (np.cumsum(keep_N) - 1)[starts]

    order = np.asarray(order, np.int64)
    span_len = lengths[order] + 1  # <sop> + span as inputs, span + <eop> as targets
    span_of = np.repeat(order, span_len)
    within = np.arange(span_len.sum()) - np.repeat(np.cumsum(span_len) - span_len, span_len)
    first = starts[span_of]
    b_inputs = np.where(within == 0, sop_id, window_N[first + np.maximum(within - 1, 0)])
    last = within == lengths[span_of]
    b_targets = np.where(last, eop_id, window_N[first + np.minimum(within, lengths[span_of] - 1)])
    return {
        "input_ids": np.concatenate([a_tokens, b_inputs]),
        "labels": np.concatenate([np.full(sep, IGNORE_INDEX), b_targets]),
        "positions": np.concatenate([np.arange(sep), mask_pos_k[span_of]]),
        "block_positions": np.concatenate([np.zeros(sep, np.int64), within + 1]),
        "sep": sep,
    }


def _runs(allowed_N: np.ndarray, breaks_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of maximal runs of allowed positions, also cut at every break."""
    n = len(allowed_N)
    prev_allowed_N = np.concatenate([[False], allowed_N[:-1]])
    starts = np.flatnonzero(allowed_N & (breaks_N | ~prev_allowed_N))
    # First disallowed position at or after each index (n if none).
    blocked_N = np.where(allowed_N, n, np.arange(n))
    next_blocked_N = np.minimum.accumulate(blocked_N[::-1])[::-1]
    next_start = np.concatenate([starts[1:], [n]])
    ends = np.minimum(next_start, next_blocked_N[starts])
    return starts, ends - starts


def _place_spans(
    lengths: np.ndarray, *, allowed_N: np.ndarray, breaks_N: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Random non-adjacent placement of spans; returns (starts, lengths) sorted by start.

    Longest spans go first, which keeps fragmentation low. A span with no room left is
    shortened to the longest free stretch (or dropped); with mask ratios near 15% of normal
    text that does not happen.
    """
    n = len(allowed_N)
    free_N = allowed_N.copy()
    break_cum = np.concatenate([[0], np.cumsum(breaks_N)])
    starts, lens = [], []
    for length in sorted(lengths.tolist(), reverse=True):
        free_cum = np.concatenate([[0], np.cumsum(free_N)])
        for size in range(min(length, n), 0, -1):
            s = np.arange(n - size + 1)
            fits = free_cum[s + size] - free_cum[s] == size
            # No break strictly inside the span: it must not straddle two documents.
            fits &= break_cum[s + size] - break_cum[s + 1] == 0
            candidates = np.flatnonzero(fits)
            if len(candidates):
                start = int(candidates[rng.integers(len(candidates))])
                starts.append(start)
                lens.append(size)
                # One untouched token on each side keeps two blanks from merging into one.
                free_N[max(start - 1, 0) : start + size + 1] = False
                break
    order = np.argsort(starts, kind="stable")
    return np.asarray(starts, np.int64)[order], np.asarray(lens, np.int64)[order]


class BlankInfilling:
    """data.objective=glm_blank; options in data.glm (see the module docstring)."""

    def __init__(self, name: str, *, cfg: DataConfig, tokenizer, seq_len: int, seed: int):
        cfg.glm.validate()
        cfg.check_objective(name, seq_len=seq_len)
        missing = [t for t in _TOKENS if t not in tokenizer.special_tokens]
        if missing:
            raise ValueError(f"tokenizer {tokenizer.kind!r} lacks the GLM tokens {missing}")
        self.name, self.cfg, self.seq_len, self.seed = name, cfg.glm, seq_len, seed
        ids = tokenizer.special_tokens
        self.mask_ids = {"mask": ids["[MASK]"], "sentence": ids["[sMASK]"], "gmask": ids["[gMASK]"]}
        self.sop_id, self.eop_id = ids["<sop>"], ids["<eop>"]
        self.pad_id, self.eos_id = ids["<pad>"], ids["<eos>"]
        self.length_probs = span_length_probs(cfg.glm.poisson_lambda)

    # ---- one sample ------------------------------------------------------------------------

    def choose_task(self, rng: np.random.Generator) -> str:
        u = rng.random()
        if u < self.cfg.sentence_prob:
            return "sentence"
        if u < self.cfg.sentence_prob + self.cfg.gmask_prob:
            return "gmask"
        return "mask"

    def build_one(
        self,
        row_S: np.ndarray,
        *,
        sample_id: int,
        doc_start_S: np.ndarray | None = None,
        sent_start_S: np.ndarray | None = None,
    ) -> dict:
        """One sample as numpy arrays of length seq_len, plus `task`, `window` (the raw text
        it covers), `starts`/`lengths` (spans within the window) and `order` (Part B order)."""
        if len(row_S) < self.seq_len - 2:
            raise ValueError(
                f"glm_blank needs rows of at least seq_len - 2 = {self.seq_len - 2} tokens, "
                f"got {len(row_S)}"
            )
        row_S = np.asarray(row_S, np.int64)
        doc_S = np.zeros(len(row_S), bool) if doc_start_S is None else np.asarray(doc_start_S, bool)
        rng = sample_rng(self.seed, sample_id, salt=SALT)
        task = self.choose_task(rng)
        if task == "mask":
            n, starts, lengths = self._mask_spans(row_S, doc_S, rng)
        elif task == "sentence":
            if sent_start_S is None:
                raise ValueError("the [sMASK] task needs the batch's 'sent_start'")
            breaks_S = doc_S | np.asarray(sent_start_S, bool)
            n, starts, lengths = self._sentence_spans(row_S, breaks_S, rng)
        else:
            n, starts, lengths = self._gmask_span(rng)
        order = rng.permutation(len(starts))
        sample = assemble(
            row_S[:n],
            starts,
            lengths,
            order=order,
            mask_id=self.mask_ids[task],
            sop_id=self.sop_id,
            eop_id=self.eop_id,
        )
        sample = self._pad(sample)
        sample.update(task=task, window=row_S[:n], starts=starts, lengths=lengths, order=order)
        return sample

    def _mask_spans(self, row_S, doc_S, rng) -> tuple[int, np.ndarray, np.ndarray]:
        t, ratio = self.seq_len, self.cfg.mask_ratio
        # Every span has >= 1 token, so this many draws always reach the target.
        draws = rng.choice(
            np.arange(1, MAX_SPAN + 1), size=math.ceil(ratio * t) + 1, p=self.length_probs
        )
        count_K = np.arange(1, len(draws) + 1)
        enough_K = np.cumsum(draws) >= ratio * (t - 2 * count_K)
        k = int(np.argmax(enough_K)) + 1
        n = t - 2 * k
        window = row_S[:n]
        allowed_N = window != self.eos_id
        starts, lengths = _place_spans(draws[:k], allowed_N=allowed_N, breaks_N=doc_S[:n], rng=rng)
        return n, starts, lengths

    def _sentence_spans(self, row_S, breaks_S, rng) -> tuple[int, np.ndarray, np.ndarray]:
        t, ratio = self.seq_len, self.cfg.mask_ratio
        # One priority per row position, fixed before the window is known, so the random
        # sentence order does not change while k (and with it the window) is being solved.
        priority_S = rng.random(len(breaks_S))
        k, empty = 1, np.zeros(0, np.int64)
        while t - 2 * k >= 1:
            n = t - 2 * k
            window = row_S[:n]
            starts, lengths = _runs(window != self.eos_id, breaks_S[:n])
            if not len(starts):
                return n, empty, empty
            order = np.argsort(-priority_S[starts], kind="stable")
            covered = np.cumsum(lengths[order])
            m = min(int(np.searchsorted(covered, ratio * n)) + 1, len(starts))
            if m <= k:
                chosen = np.sort(order[:m])
                return n, starts[chosen], lengths[chosen]
            k = m
        return t - 2, empty, empty

    def _gmask_span(self, rng) -> tuple[int, np.ndarray, np.ndarray]:
        n = self.seq_len - 2
        lo = max(1, math.ceil(self.cfg.gmask_min_ratio * n))
        hi = max(lo, min(n, math.floor(self.cfg.gmask_max_ratio * n)))
        length = int(rng.integers(lo, hi + 1))
        return n, np.array([n - length], np.int64), np.array([length], np.int64)

    def _pad(self, sample: dict) -> dict:
        extra = self.seq_len - len(sample["input_ids"])
        if extra < 0:
            raise AssertionError(f"GLM sample is {-extra} tokens longer than seq_len")
        fills = {"input_ids": self.pad_id, "labels": IGNORE_INDEX}
        for key in ("input_ids", "labels", "positions", "block_positions"):
            tail = np.full(extra, fills.get(key, 0), np.int64)
            sample[key] = np.concatenate([sample[key].astype(np.int64), tail])
        return sample

    # ---- batch -----------------------------------------------------------------------------

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens_BS = batch["tokens"]
        if tokens_BS.dim() != 2:
            raise ValueError(
                f"glm_blank expects tokens [batch, seq_len + 1], got {tokens_BS.shape}"
            )
        if self.cfg.sentence_prob > 0 and "sent_start" not in batch:
            raise ValueError(
                "data.glm.sentence_prob > 0 needs sentence boundaries, but the batch has no "
                "'sent_start'"
            )
        tokens = tokens_BS.numpy()
        doc = batch["doc_start"].numpy() if "doc_start" in batch else None
        sent = batch["sent_start"].numpy() if "sent_start" in batch else None
        samples = [
            self.build_one(
                tokens[i],
                sample_id=int(sid),
                doc_start_S=None if doc is None else doc[i],
                sent_start_S=None if sent is None else sent[i],
            )
            for i, sid in enumerate(batch["sample_ids"].tolist())
        ]

        def stack(key: str) -> torch.Tensor:
            return torch.from_numpy(np.stack([s[key] for s in samples]))

        return {
            "input_ids": stack("input_ids"),
            "position_ids": torch.stack([stack("positions"), stack("block_positions")], dim=1),
            "sep": torch.tensor([s["sep"] for s in samples], dtype=torch.int64),
            "labels": stack("labels"),
        }
