"""Cross-entropy of every scored task of a batch, normalised over the global batch.

An objective's "<x>labels" tensor is scored against the model's "<x>logits" (a model
that returns a bare tensor returns "logits"). Each task's loss is its summed token
cross-entropy divided by its number of scored targets in the whole global batch (all
micro-batches, all data-parallel ranks), and the training loss is the sum over tasks:
the gradient is then the same for any split of the global batch.

With `trainer.loss_chunk_tokens` > 0 the language-model labels go into the model's forward
(`with_chunked_labels`), which scores its logits a slice at a time and returns the summed
loss of each row as "row_losses" in place of "logits" (models.blocks.chunked_row_losses).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_pipeline.objectives import IGNORE_INDEX


def as_logits_dict(outputs: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"logits": outputs} if isinstance(outputs, torch.Tensor) else outputs


def with_chunked_labels(inputs: dict, labels: dict, chunk_tokens: int) -> dict:
    """The model inputs, plus the "labels" task's targets when the loss is chunked."""
    if chunk_tokens <= 0 or "labels" not in labels:
        return inputs
    return {**inputs, "labels": labels["labels"]}


def target_counts(labels: dict[str, torch.Tensor]) -> dict[str, int]:
    return {key: int((value != IGNORE_INDEX).sum()) for key, value in labels.items()}


def summed_losses(
    outputs: torch.Tensor | dict[str, torch.Tensor], labels: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Summed fp32 cross-entropy per label key."""
    logits = as_logits_dict(outputs)
    sums = {}
    for key, target in labels.items():
        name = key[: -len("labels")] + "logits"
        scored = key[: -len("labels")] + "row_losses"
        if scored in logits:  # scored inside the model (chunked): summed per row
            sums[key] = logits[scored].sum()
            continue
        if name not in logits:
            raise ValueError(f"the objective's {key!r} has no matching model output {name!r}")
        value = logits[name]
        sums[key] = F.cross_entropy(
            value.reshape(-1, value.size(-1)).float(),
            target.reshape(-1).to(value.device),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    return sums


def task_name(label_key: str) -> str:
    """metrics.jsonl name of a task's loss: "labels" -> "loss_lm", "nsp_labels" -> "loss_nsp"."""
    prefix = label_key[: -len("labels")].rstrip("_")
    return f"loss_{prefix or 'lm'}"
