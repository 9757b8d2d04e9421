"""UniLM (Dong et al. 2019): one bidirectional Transformer trained on four cloze tasks that
differ only in what each token may attend to, chosen per sample (data.unilm shares).

Legend: B = batch, S = sample_len (seq_len + 1 tokens per packed row), T = seq_len.

Tasks, each a masked-LM sample (data.mlm: which tokens are predicted and how they are
replaced, exactly as in mlm.py) with its own self-attention mask and token types:
    bidirectional  [CLS] A [SEP] B [SEP] as mlm_nsp, next sentence prediction included
                   (nsp_labels); every token sees every token. Types 0 (A), 1 (B).
    seq2seq        [CLS] A [SEP] B [SEP], B the text that follows A (the halves of the
                   row's longest document piece, split at a sentence start); the source
                   [CLS] A [SEP] sees only itself, the target B [SEP] sees the source and
                   its own tokens up to itself. Masked tokens are drawn from both segments.
                   Types 4 (source), 5 (target).
    left_to_right  [CLS] row [SEP]; each token sees itself and the tokens on its left.
                   Type 2.
    right_to_left  the same row; each token sees itself and the tokens on its right.
                   Type 3.
The separate token types per task are UniLM's released code's convention (six segment
embeddings, `type_vocab_size` 6); BERT's two tables extend to them by copying rows (see
trainer.init_from). Only bidirectional samples score the pair label; the others carry -100.

Output: input_ids, labels, token_type_ids, attention_mask (False on padding), attn_mask
(bool [B, 1, T, T], True = may attend) and nsp_labels. The task of a sample is drawn from
its own stream (seed, sample id), so it is fixed for a sample and changes with the sample
id: a row seen again in a later epoch has a new id, task and mask.
"""

from __future__ import annotations

import numpy as np
import torch

from data_pipeline.config import UNILM_TASKS, DataConfig
from data_pipeline.objectives import IGNORE_INDEX, sample_rng
from data_pipeline.objectives.mlm import MaskedLM, nsp_layout, sop_layout

__all__ = ["TASK_TYPES", "UnifiedLM", "task_mask"]

# Token types of (first segment, second segment) per task.
TASK_TYPES = {
    "bidirectional": (0, 1),
    "left_to_right": (2, 2),
    "right_to_left": (3, 3),
    "seq2seq": (4, 5),
}
# The task stream is apart from the pair and mask streams, which stay those of mlm_nsp.
_TASK_SALT = 3


def task_mask(task: str, t: int, source_len: int) -> np.ndarray:
    """bool [T, T], True where query i may attend key j under `task`; `source_len` is the
    length of [CLS] A [SEP] (seq2seq only)."""
    i = np.arange(t)[:, None]
    j = np.arange(t)[None, :]
    if task == "bidirectional":
        return np.ones((t, t), dtype=bool)
    if task == "left_to_right":
        return j <= i
    if task == "right_to_left":
        return j >= i
    if task == "seq2seq":
        return (j < source_len) | ((i >= source_len) & (j <= i))
    raise ValueError(f"unknown UniLM task {task!r}; choose one of {UNILM_TASKS}")


class UnifiedLM(MaskedLM):
    """data.objective = unilm (module docstring); picklable for workers."""

    def __init__(self, name: str, *, cfg: DataConfig, tokenizer, seq_len: int, seed: int):
        if name != "unilm":
            raise ValueError(f"data.objective={name!r} is not UniLM's")
        cfg.unilm.validate()
        cfg.check_objective(name, seq_len=seq_len)
        super().__init__("mlm_nsp", cfg=cfg, tokenizer=tokenizer, seq_len=seq_len, seed=seed)
        self.name = name
        self.shares = np.array([getattr(cfg.unilm, k) for k in UNILM_TASKS], dtype=np.float64)
        self.shares /= self.shares.sum()

    def task(self, sample_id: int) -> str:
        """The task of one sample: a pure function of (seed, sample id)."""
        rng = sample_rng(self.seed, sample_id, salt=_TASK_SALT)
        return UNILM_TASKS[int(rng.choice(len(UNILM_TASKS), p=self.shares))]

    def __call__(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tokens_BS, bound_BS, sent_BS, ids = self._read(batch)
        b, t = len(ids), self.seq_len
        input_ids_BT = np.empty((b, t), dtype=np.int64)
        types_BT = np.empty((b, t), dtype=np.int64)
        mask_BTT = np.empty((b, t, t), dtype=bool)
        nsp_B = np.full(b, IGNORE_INDEX, dtype=np.int64)
        for r in range(b):
            task = self.task(ids[r])
            first, second = TASK_TYPES[task]
            args = (tokens_BS[r], bound_BS[r], sent_BS[r], ids[r])
            if task == "bidirectional":
                row, _, nsp_B[r], source = self._pair(*args, nsp_layout, self.mlm.pair_swap_prob)
            elif task == "seq2seq":  # A and the text after it, never swapped
                row, _, _, source = self._pair(*args, sop_layout, 0.0)
            else:
                row, _, _ = self._single(tokens_BS[r])
                source = t
            input_ids_BT[r] = row
            types_BT[r] = np.where(np.arange(t) < source, first, second)
            types_BT[r, row == self.pad_id] = 0
            mask_BTT[r] = task_mask(task, t, source)
        out = self._mask(input_ids_BT, ids)
        out["token_type_ids"] = torch.from_numpy(types_BT)
        out["attention_mask"] = torch.from_numpy(input_ids_BT != self.pad_id)
        out["attn_mask"] = torch.from_numpy(mask_BTT)[:, None]
        out["nsp_labels"] = torch.from_numpy(nsp_B)
        return out
