"""Knowledge distillation from a frozen teacher: `distill.*` (trainer/config.py DistillConfig).

The student is the job's model, trained on its objective's batches; the teacher is another
model of the BERT family (a Loom run or checkpoint, a folder of export_hf.py --to-loom, or
a Hugging Face folder), read once, frozen, in eval mode, and placed by the job's layout
(whole on every rank, split by its tensor-parallel plan under parallel.tp, sharded block by
block over the data-parallel ranks under parallel.zero=3: `parallel.parallelize.place_frozen`).
Under TP the logits are vocabulary-parallel DTensors and each rank holds some heads'
attention scores; the soft targets and the score MSE reduce over the shards. The teacher
never enters the student's optimizer or checkpoints; a resumed run reads it again from
distill.teacher.

For every micro-batch the engine runs the teacher's forward, under no_grad, right before the
loss (`TrainingSpec.loss_targets`), so its outputs live no longer than that micro-batch's
loss. The loss is

    hard_weight x (the objective's own tasks: MLM, ...)
  + soft_weight x T^2 x CE(softmax(teacher logits / T), softmax(student logits / T))
  + cosine_weight x (1 - cos(student last hidden state, teacher's))
  + embedding_weight x MSE(W_e student embedding output, teacher's)
  + hidden_weight x sum over m = 1..M of MSE(W_h student block m's output, teacher block g(m)'s)
  + attention_weight x sum over m = 1..M of MSE(student scores of block m, teacher's of g(m))

with g(m) = m x N / M for a student of M blocks and a teacher of N (TinyBERT's uniform
map), T = distill.temperature, and W_h, W_e learned maps to the teacher's width where the
widths differ (TinyBERT; `models.bert.Bert.add_distill_projections`, trained and saved
with the student, left out of Hugging Face exports). Each distillation term is a task of its
own (`loss_kd`, `loss_cos`, `loss_emb`, `loss_hid`, `loss_att` in metrics.jsonl), scored on
every real (non-padding) token and normalised by their count over the global batch, as the
objective's tasks are by theirs: the soft-target cross-entropy is summed over the
vocabulary, each MSE is a mean over the hidden width (over heads and keys for the scores,
whose masked keys are 0 on both sides), per token. DistilBERT's mix (Sanh et al. 2019) is
conf/distill/distilbert.yaml (5 x soft CE at T = 2 + 2 x MLM + 1 x cosine, the student's
blocks initialised from every other block of the teacher: `init_from_teacher`); TinyBERT's
general distillation (Jiao et al. 2020) is conf/distill/tinybert.yaml.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from common.errors import ConfigError
from common.log import log_rank0
from data_pipeline.objectives import IGNORE_INDEX
from models.config import ModelConfig
from trainer.config import DISTILL_TASKS, DistillConfig
from trainer.init_from import checkpoint_config, read_weights
from trainer.loss import summed_losses

_TEACHER = "teacher/"  # prefix of the teacher's outputs among the loss's labels

__all__ = [
    "DistillLoss",
    "TeacherTargets",
    "check_teacher",
    "cosine_distance",
    "describe_teacher",
    "distill_labels",
    "distill_outputs",
    "init_student_from_teacher",
    "layer_map",
    "load_teacher_weights",
    "mean_squared",
    "read_teacher",
    "soft_cross_entropy",
    "teacher_config",
    "teacher_forward_flops",
]


def layer_map(n_teacher: int, n_student: int) -> list[int]:
    """g(m) = m x N / M for m = 1..M: the teacher block (1-based) each student block learns
    from."""
    if n_teacher % n_student:
        raise ConfigError(
            f"a student of {n_student} layers learns from a teacher of {n_teacher}: the "
            "layer map g(m) = m x N / M needs the teacher's depth to be a multiple of the "
            "student's"
        )
    return [m * n_teacher // n_student for m in range(1, n_student + 1)]


def read_teacher(source: str) -> tuple[ModelConfig, dict]:
    """(model config, weights by Loom name) of distill.teacher: a Hugging Face folder
    (config.json, converted by models.hf) or a Loom run, checkpoint or --to-loom folder."""
    path = Path(source)
    if (path / "config.json").is_file():
        from models.hf import read_hf_folder

        return read_hf_folder(path)
    what = "distill.teacher"
    return checkpoint_config(path, what=what), read_weights(source, what=what)


def teacher_config(source: str) -> ModelConfig:
    """The model config of distill.teacher, without reading its weights."""
    path = Path(source)
    if (path / "config.json").is_file():
        from transformers import AutoConfig

        from models import hf

        hf_cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        return hf.loom_config(hf.family_of(hf_cfg), hf_cfg)
    return checkpoint_config(path, what="distill.teacher")


def check_teacher(
    student: ModelConfig, teacher: ModelConfig, cfg: DistillConfig, *, rows: int, teacher_rows: int
) -> None:
    """ConfigError naming the field for a teacher this student cannot learn from (`rows`,
    `teacher_rows`: their embedding rows)."""
    for role, model in (("model", student), ("teacher", teacher)):
        if model.family != "bert":
            raise ConfigError(
                f"distill.teacher: the {role} has model.family={model.family!r}; "
                "distillation runs BERT-family students and teachers"
            )
    if cfg.soft_weight > 0 and teacher_rows != rows:
        raise ConfigError(
            f"distill.teacher={cfg.teacher!r} has {teacher_rows} vocabulary rows, the student "
            f"{rows}: soft targets need one vocabulary (the same tokenizer and "
            "model.make_vocab_size_divisible_by)"
        )
    if cfg.hidden_weight > 0 or cfg.attention_weight > 0:
        layer_map(teacher.n_layer, student.n_layer)
    if cfg.attention_weight > 0:
        if student.n_head != teacher.n_head:
            raise ConfigError(
                f"distill.attention_weight > 0 compares attention scores head by head, but "
                f"the student has model.n_head={student.n_head} and the teacher {teacher.n_head}"
            )
        for role, model in (("model", student), ("teacher", teacher)):
            if model.position == "relative_sinusoidal":
                raise ConfigError(
                    f"distill.attention_weight > 0: the {role}'s relative positions "
                    "(model.position=relative_sinusoidal) have no score matrix to compare"
                )


def distill_outputs(cfg: DistillConfig) -> tuple[str, ...]:
    """What the student and the teacher return beside their logits (Bert.distill_outputs):
    "hidden" for the cosine, embedding and hidden-state terms, "attention" for the scores."""
    hidden = cfg.cosine_weight > 0 or cfg.embedding_weight > 0 or cfg.hidden_weight > 0
    return ("hidden",) * hidden + ("attention",) * (cfg.attention_weight > 0)


@torch.no_grad()
def load_teacher_weights(teacher: nn.Module, state: dict[str, torch.Tensor], *, source: str):
    """Every tensor of the teacher from `state`, which must hold exactly the teacher's."""
    own = teacher.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        what = (missing and f"missing {missing[:3]}") or (
            unexpected and f"unexpected {unexpected[:3]}"
        )
        what = what or f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)}"
        raise ConfigError(f"distill.teacher={source!r} does not load into its model ({what})")
    teacher.load_state_dict(state)


def distill_labels(inputs: dict[str, torch.Tensor], tasks: list[str]) -> dict[str, torch.Tensor]:
    """Label tensors of the distillation tasks: 0 on every real token of the batch (its
    attention_mask; every token without one), IGNORE_INDEX on padding."""
    ids = inputs["input_ids"]
    real = inputs.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if real is None else real.bool()
    scored = torch.where(real, 0, IGNORE_INDEX).to(torch.int64)
    return {key: scored for key in tasks}


@torch.no_grad()
def init_student_from_teacher(
    student: nn.Module, state: dict[str, torch.Tensor], *, n_teacher: int, source: str
) -> None:
    """DistilBERT's initialisation: student block i takes teacher block i x N / M (every other
    block of a teacher twice as deep: 0, 2, 4, ...), and every other tensor of the same name
    and shape (embeddings, the MLM head) is copied. Tensors the teacher lacks or holds in
    another shape keep the student's own initialisation, and are listed."""
    n_student = len(student.blocks)
    stride = n_teacher // n_student
    copied, kept = 0, []
    for name, target in student.state_dict().items():
        source_name = name
        if name.startswith("blocks."):
            index, _, rest = name[len("blocks.") :].partition(".")
            source_name = f"blocks.{int(index) * stride}.{rest}"
        value = state.get(source_name)
        if value is None or value.shape != target.shape:
            kept.append(name)
            continue
        target.copy_(value)
        copied += 1
    log_rank0(
        "student initialised from the teacher %s: %d tensors (block i from block %d i)%s",
        source,
        copied,
        stride,
        f"; kept the student's own {kept}" if kept else "",
    )


class TeacherTargets:
    """The engine's `loss_targets` hook: the teacher's outputs for a micro-batch's inputs,
    as labels prefixed "teacher/" (logits, hidden states, attention scores as needed)."""

    def __init__(self, teacher: nn.Module, forward_context: Callable):
        self.teacher, self.forward_context = teacher, forward_context

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict:
        inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.no_grad(), self.forward_context():
            out = self.teacher(**inputs)
        return {f"{_TEACHER}{key}": value for key, value in out.items()}


class DistillLoss:
    """The trainer's loss function when distilling: the objective's tasks (summed_losses of
    the student's outputs) and each active distillation task, summed over its scored tokens.
    The teacher's outputs arrive among the labels ("teacher/..."), the scored tokens as the
    task's labels (`distill_labels`)."""

    def __init__(self, cfg: DistillConfig, *, n_student: int, n_teacher: int):
        self.cfg = cfg
        self.tasks = cfg.tasks
        needs_layers = cfg.hidden_weight > 0 or cfg.attention_weight > 0
        self.layers = layer_map(n_teacher, n_student) if needs_layers else []

    def __call__(self, outputs: dict, labels: dict) -> dict[str, torch.Tensor]:
        teacher = {k[len(_TEACHER) :]: v for k, v in labels.items() if k.startswith(_TEACHER)}
        own = {k: v for k, v in labels.items() if not k.startswith(_TEACHER)}
        objective = {k: v for k, v in own.items() if k not in DISTILL_TASKS}
        student_heads = {
            k: v for k, v in outputs.items() if k not in ("hidden_states", "attention_scores")
        }
        sums = summed_losses(student_heads, objective)
        for key in self.tasks:
            scored_BT = own[key].to(outputs["logits"].device, non_blocking=True) != IGNORE_INDEX
            sums[key] = self._task(key, outputs, teacher, scored_BT)
        return sums

    def _task(self, key: str, student: dict, teacher: dict, scored_BT: torch.Tensor):
        if key == "kd_labels":
            return soft_cross_entropy(
                student["logits"], teacher["logits"], scored_BT, temperature=self.cfg.temperature
            )
        if key == "att_labels":
            like = student["logits"]
            s_scores = [_as_dtensor_heads(x, like) for x in student["attention_scores"]]
            t_scores = [_as_dtensor_heads(x, like) for x in teacher["attention_scores"]]
            return sum(
                mean_squared(s_scores[m - 1], t_scores[g - 1], scored_BT, heads=True)
                for m, g in enumerate(self.layers, start=1)
            )
        s_states, t_states = student["hidden_states"], teacher["hidden_states"]
        if key == "cos_labels":
            return cosine_distance(s_states[-1], t_states[-1], scored_BT)
        if key == "emb_labels":
            return mean_squared(s_states[0], t_states[0], scored_BT)
        return sum(  # hid_labels
            mean_squared(s_states[m], t_states[g], scored_BT)
            for m, g in enumerate(self.layers, start=1)
        )


def soft_cross_entropy(
    student_BTV: torch.Tensor, teacher_BTV: torch.Tensor, scored_BT: torch.Tensor, *, temperature
) -> torch.Tensor:
    """Sum over the scored tokens of T^2 x -sum_v p_teacher(v) log p_student(v), both
    softmaxes at temperature T, in fp32 (Hinton et al. 2015; the T^2 keeps the gradient's
    scale independent of T). Vocabulary-parallel logits (DTensors sharded over the
    vocabulary, under loss_parallel) are summed over their shards."""
    t = temperature
    log_p_student = _log_softmax(student_BTV.float() / t)
    p_teacher = _log_softmax(teacher_BTV.float() / t).exp()
    return _token_sum(-(p_teacher * log_p_student).sum(-1), scored_BT) * t * t


def _log_softmax(z_BTV: torch.Tensor) -> torch.Tensor:
    """log_softmax over the last dim. Logits sharded over the vocabulary (a DTensor) are
    normalised by the maximum and the sum of exponentials reduced over every shard, each
    made whole (Replicate) before it is subtracted."""
    if not isinstance(z_BTV, DTensor):
        return F.log_softmax(z_BTV, dim=-1)
    whole = [Replicate()]
    max_BT1 = z_BTV.detach().amax(dim=-1, keepdim=True).redistribute(placements=whole)
    shifted_BTV = z_BTV - max_BT1
    sum_BT1 = shifted_BTV.exp().sum(dim=-1, keepdim=True).redistribute(placements=whole)
    return shifted_BTV - sum_BT1.log()


def cosine_distance(
    student_BTD: torch.Tensor, teacher_BTD: torch.Tensor, scored_BT: torch.Tensor
) -> torch.Tensor:
    """Sum over the scored tokens of 1 - cos(student, teacher) (DistilBERT's cosine loss)."""
    cos_BT = F.cosine_similarity(student_BTD.float(), teacher_BTD.float(), dim=-1)
    return _token_sum(1.0 - cos_BT, scored_BT)


def mean_squared(
    student: torch.Tensor, teacher: torch.Tensor, scored_BT: torch.Tensor, *, heads: bool = False
) -> torch.Tensor:
    """Sum over the scored tokens of the mean squared difference of their vectors: over the
    width of hidden states (B, T, D), or over heads and keys of scores (B, H, T, T), whose
    query is the token (heads may be sharded over TP ranks: a DTensor)."""
    squared = (student.float() - teacher.float()).pow(2)
    if heads:
        _, h, _, keys = squared.shape
        return _token_sum(squared.sum(dim=(1, 3)) / (h * keys), scored_BT)
    return _token_sum(squared.mean(dim=-1), scored_BT)


def _token_sum(per_token_BT: torch.Tensor, scored_BT: torch.Tensor) -> torch.Tensor:
    """Sum of per-token values over the scored tokens. A DTensor (values summed over TP
    shards) comes back replicated: its local value is the whole sum."""
    if not isinstance(per_token_BT, DTensor):
        return (per_token_BT * scored_BT).sum()
    mesh = per_token_BT.device_mesh
    scored = DTensor.from_local(scored_BT.to(per_token_BT.dtype), mesh, [Replicate()])
    return (per_token_BT * scored).sum().redistribute(placements=[Replicate()])


def _as_dtensor_heads(scores_BHTT: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Attention scores of this rank's heads as one DTensor over the TP ranks, when the
    model is tensor-parallel (its logits, `like`, are a DTensor); as they are otherwise."""
    if not isinstance(like, DTensor) or isinstance(scores_BHTT, DTensor):
        return scores_BHTT
    return DTensor.from_local(scores_BHTT, like.device_mesh, [Shard(1)])


def teacher_forward_flops(teacher: ModelConfig, *, vocab_size: int, seq_len: int) -> float:
    """Forward FLOPs per token of the teacher: a third of its training count (forward 2N,
    backward 4N), mask share and heads as the student's objective uses them."""
    from models.flops import flops_per_token

    return flops_per_token(teacher, vocab_size=vocab_size, seq_len=seq_len) / 3


def describe_teacher(teacher: ModelConfig, params: int, flops: float) -> None:
    log_rank0(
        "distilling from teacher %s: %.2fM parameters, %d layers, forward %.3g FLOPs/token",
        teacher.name,
        params / 1e6,
        teacher.n_layer,
        flops,
    )
