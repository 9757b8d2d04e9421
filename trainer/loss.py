"""Cross-entropy of every scored task of a batch, normalised over the global batch.

An objective's "<x>labels" tensor is scored against the model's "<x>logits" (a model
that returns a bare tensor returns "logits"). Each task's loss is its summed token
cross-entropy divided by its number of scored targets in the whole global batch (all
micro-batches, all data-parallel ranks), and the training loss is the sum over tasks:
the gradient is then the same for any split of the global batch.

With `trainer.loss_chunk_tokens` > 0 the language-model labels go into the model's forward
(`with_chunked_labels`), which scores its logits a slice at a time and returns the summed
loss of each row as "row_losses" in place of "logits" (models.blocks.chunked_row_losses).

A model may decide a task's targets itself: ELECTRA's replaced-token targets depend on its
generator's samples. It returns them as "<x>targets" (0/1) beside "<x>logits" (one logit
per position), the task is binary (summed binary cross-entropy), and the objective's
"<x>labels" only say which positions count (-100 elsewhere). Such a model also reads the
language-model labels in every forward (ELECTRA builds its discriminator's input from
them), and `task_weight` gives its RTD task the weight model.rtd_weight (lambda) in the
training loss, which is then sum over tasks of weight x task mean; each task's own mean is
logged unweighted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data_pipeline.objectives import IGNORE_INDEX
from models.config import ModelConfig
from trainer.config import DISTILL_TASKS, DistillConfig

# Label keys of tasks whose model reads the language-model labels in its forward pass.
_READS_LM_LABELS = ("rtd_labels",)


def as_logits_dict(outputs: torch.Tensor | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {"logits": outputs} if isinstance(outputs, torch.Tensor) else outputs


def with_chunked_labels(inputs: dict, labels: dict, chunk_tokens: int) -> dict:
    """The model inputs, plus the "labels" task's targets when the loss is chunked or the
    model reads them anyway (ELECTRA: the objective's "rtd_labels" say so)."""
    reads = chunk_tokens > 0 or any(key in labels for key in _READS_LM_LABELS)
    if not reads or "labels" not in labels:
        return inputs
    return {**inputs, "labels": labels["labels"]}


def task_weight(label_key: str, model: ModelConfig, distill: DistillConfig | None = None) -> float:
    """The weight of a task's mean in the training loss: model.rtd_weight for ELECTRA's
    replaced token detection, 1 for every other task; when distilling, the task's
    distill.*_weight (distill.hard_weight times that for the objective's own tasks)."""
    weight = model.rtd_weight if label_key == "rtd_labels" else 1.0
    if distill is not None and distill.enabled:
        return distill.task_weight(label_key) * (1.0 if label_key in DISTILL_TASKS else weight)
    return weight


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
        decided = key[: -len("labels")] + "targets"
        target = target.to(value.device, non_blocking=True)  # the engines moved it already
        if decided in logits:  # binary, targets from the model, positions from the labels
            # Weights 0 and 1 rather than a boolean selection: the same sum, and no wait
            # for the device to count the selected positions.
            scored = (target != IGNORE_INDEX).to(torch.float32)
            sums[key] = F.binary_cross_entropy_with_logits(
                value.float(), logits[decided].float(), weight=scored, reduction="sum"
            )
            continue
        sums[key] = F.cross_entropy(
            value.reshape(-1, value.size(-1)).float(),
            target.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
    return sums


def task_name(label_key: str) -> str:
    """metrics.jsonl name of a task's loss: "labels" -> "loss_lm", "nsp_labels" -> "loss_nsp"."""
    prefix = label_key[: -len("labels")].rstrip("_")
    return f"loss_{prefix or 'lm'}"
