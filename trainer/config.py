"""Schemas of the `optim`, `precision`, `trainer` and `distill` groups, and the whole job.

Each group is a kw-only dataclass registered in Hydra's ConfigStore; `load_job_config`
merges a composed Hydra config into the schema, so an unknown key or a wrong type fails
at start-up with the key's full name, and `validate_job` rejects impossible values.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from common.errors import ConfigError
from data_pipeline.config import OBJECTIVES, DataConfig
from models.build import check_pipeline_split
from models.config import ModelConfig
from parallel.config import ParallelConfig, check_deterministic_env, check_tp_divisibility
from trainer.slurm import SlurmConfig

OPTIMIZERS = ("adamw", "lamb")
DECAYS = ("linear", "cosine", "constant")
DTYPES = ("fp32", "bf16", "fp16")


@dataclass(kw_only=True)
class OptimConfig:
    """Optimizer, learning-rate schedule and gradient clipping."""

    name: str = "adamw"
    """adamw | lamb."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warm-up."""
    min_lr: float = 1e-4
    """Floor the decay ends at."""
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    """Added to sqrt(v_hat) in the denominator."""
    weight_decay: float = 0.01
    """Decoupled weight decay; never applied to biases and norm weights."""
    bias_correction: bool = True
    """Divide the moments by (1 - beta^t) (LAMB only; AdamW always corrects)."""
    foreach: bool | None = None
    """Multi-tensor (foreach) implementation; None picks it on CUDA and the per-tensor loop
    on CPU, where it is faster. Both give the same result. Under fp16 AdamW is torch's fused
    kernel whatever this says (it skips an overflowing step without a wait); LAMB takes its
    device-side path."""
    fused_lamb: bool = False
    """With optim.name=lamb and parallel.engine=deepspeed on CUDA: DeepSpeed's FusedLamb
    kernel instead of Loom's LAMB. Under ZeRO it takes one trust ratio per flat partition
    (clamped to [0.01, 10]), not per tensor, so it is an opt-in, not the exact LAMB."""
    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this; 0 disables clipping."""
    warmup_steps: int = 20
    """Optimizer steps of linear warm-up from 0 to lr."""
    decay: str = "cosine"
    """Shape after warm-up: linear | cosine | constant."""
    decay_steps: int | None = None
    """Step at which the decay reaches min_lr; None means trainer.max_steps."""

    def validate(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name={self.name!r} is unknown; choose one of {OPTIMIZERS}")
        if self.decay not in DECAYS:
            raise ValueError(f"optim.decay={self.decay!r} is unknown; choose one of {DECAYS}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optim.min_lr={self.min_lr} must be in [0, optim.lr={self.lr}]")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"optim.{key}={getattr(self, key)} must be in [0, 1)")
        if self.eps <= 0:
            raise ValueError(f"optim.eps={self.eps} must be > 0")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.warmup_steps < 0:
            raise ValueError(
                "optim.weight_decay, optim.grad_clip and optim.warmup_steps must be >= 0"
            )
        if self.decay_steps is not None and self.decay_steps <= 0:
            raise ValueError(f"optim.decay_steps={self.decay_steps} must be > 0 (or null)")


@dataclass(kw_only=True)
class PrecisionConfig:
    """Compute dtype of matmuls; parameters and optimizer states stay fp32."""

    dtype: str = "fp32"
    """fp32 | bf16 (autocast) | fp16 (autocast + dynamic loss scaling)."""
    initial_scale: float = 65536.0
    """fp16: starting loss scale."""
    growth_factor: float = 2.0
    """fp16: scale multiplier after growth_interval clean steps."""
    backoff_factor: float = 0.5
    """fp16: scale multiplier after a step whose gradients overflowed (the step is skipped)."""
    growth_interval: int = 1000
    """fp16: clean steps between scale increases."""

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"precision.dtype={self.dtype!r} is unknown; choose one of {DTYPES}")
        if self.initial_scale <= 0 or self.growth_interval <= 0:
            raise ValueError("precision.initial_scale and precision.growth_interval must be > 0")
        if self.growth_factor <= 1.0 or not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(
                "precision.growth_factor must be > 1 and precision.backoff_factor in (0, 1)"
            )


@dataclass(kw_only=True)
class TrainerConfig:
    """The loop: batch sizes, length, logging, evaluation and checkpoints."""

    max_steps: int = 300
    """Optimizer steps to train for."""
    global_batch_size: int = 16
    """Sequences per optimizer step, summed over all data-parallel ranks."""
    micro_batch_size: int = 8
    """Sequences per forward pass on one rank; global / (micro x DP) gives accumulation steps."""
    seed: int = 1234
    """Seeds weights, data order and dropout."""
    deterministic: bool = False
    """Deterministic kernels and collectives (parallel.dist.use_deterministic_kernels), so
    that on a GPU two runs of one layout, or a run and its resumption, match to the bit
    (on CPU they do anyway); slower. Needs CUBLAS_WORKSPACE_CONFIG and NCCL_ALGO unset (the
    defaults are filled in) or set to deterministic values."""
    log_every: int = 10
    """Steps between metrics.jsonl / TensorBoard / console records."""
    eval_every: int = 100
    """Steps between evaluations on the held-out split; 0 disables."""
    eval_samples: int = 64
    """Validation samples per evaluation: the split's first rows, the same set for any layout."""
    save_every: int = 100
    """Steps between checkpoints; 0 saves only at the end."""
    keep: int = 2
    """Newest checkpoints kept on disk."""
    init_from: str | None = None
    """Weights to start from (trainer/init_from.py): a Loom run directory, a checkpoint
    directory or a folder written by export_hf.py --to-loom; optimizer, step and data start
    afresh. A checkpoint of this run's own, when resuming, takes precedence."""
    resume: str = "auto"
    """auto (newest complete checkpoint in out_dir, if any) | never | a checkpoint directory."""
    out_dir: str = "runs/${model.name}"
    """Run directory: config.yaml, metrics.jsonl, tb/, checkpoints/."""
    device: str = "auto"
    """auto (cuda if available) | cpu | cuda."""
    peak_flops: float | None = None
    """Peak FLOP/s of one device for MFU; None looks up known GPUs (MFU is null elsewhere)."""
    tensorboard: bool = True
    """Write TensorBoard event files under out_dir/tb."""
    dry_run: bool = False
    """Build the model on the meta device, report parameters, FLOPs/token and per-rank
    memory to out_dir/dry_run.json, and exit without training."""
    time_limit: float | None = None
    """Wall-clock seconds this run may take from its start: it saves and stops (exit state
    time_limit) while the next step and a save still fit. Under Slurm the job's end time
    (SLURM_JOB_END_TIME) counts too. None: no limit."""
    stop_signal: str | None = "USR2"
    """Besides SIGTERM, the signal that saves and stops the run (Slurm's `--signal=USR2@T`
    warning before the time limit): USR1 | USR2 | null."""
    stop_margin_s: float = 30.0
    """Seconds kept in hand before a time limit, beyond the longest step and save so far."""
    loss_chunk_tokens: int = 0
    """Score the language-model logits this many tokens at a time, inside the model, so
    the (tokens x vocabulary) logits are never held whole (their backward recomputes one
    slice at a time: one more forward of the output layer); 0 keeps whole logits."""
    hang_timeout_s: float | None = None
    """Seconds without a finished step (or evaluation batch) after which every rank writes
    its threads' stacks to out_dir/hang/ and the job fails; None: 20x the median step, at
    least 120 s; 0: no watchdog."""

    def validate(self) -> None:
        positive = (
            "max_steps",
            "global_batch_size",
            "micro_batch_size",
            "log_every",
            "eval_samples",
            "keep",
        )
        for key in positive:
            if getattr(self, key) <= 0:
                raise ValueError(f"trainer.{key}={getattr(self, key)} must be > 0")
        for key in ("eval_every", "save_every", "loss_chunk_tokens"):
            if getattr(self, key) < 0:
                raise ValueError(f"trainer.{key}={getattr(self, key)} must be >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"trainer.device={self.device!r} must be auto, cpu or cuda")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ValueError(f"trainer.peak_flops={self.peak_flops} must be > 0 (or null)")
        if self.init_from is not None and not Path(self.init_from).exists():
            raise ValueError(f"trainer.init_from={self.init_from!r} does not exist")
        if not self.resume:
            raise ValueError("trainer.resume must be auto, never or a checkpoint directory")
        if self.time_limit is not None and self.time_limit <= 0:
            raise ValueError(f"trainer.time_limit={self.time_limit} must be > 0 (or null)")
        if self.stop_signal not in (None, "USR1", "USR2"):
            raise ValueError(f"trainer.stop_signal={self.stop_signal!r} must be USR1, USR2 or null")
        if self.stop_margin_s < 0 or (self.hang_timeout_s or 0) < 0:
            raise ValueError("trainer.stop_margin_s and trainer.hang_timeout_s must be >= 0")
        if self.deterministic:
            check_deterministic_env(os.environ)


# Label key of each distillation task (trainer/distill.py) -> its DistillConfig weight.
DISTILL_TASKS = {
    "kd_labels": "soft_weight",
    "cos_labels": "cosine_weight",
    "emb_labels": "embedding_weight",
    "hid_labels": "hidden_weight",
    "att_labels": "attention_weight",
}


@dataclass(kw_only=True)
class DistillConfig:
    """Knowledge distillation from a frozen teacher (trainer/distill.py states the loss).
    `+distill=distilbert` and `+distill=tinybert` (conf/distill/) set the papers' mixes;
    distill.teacher names the teacher."""

    teacher: str | None = None
    """The teacher: a Loom run directory, a checkpoints/step_N directory, a folder written by
    export_hf.py --to-loom, or a Hugging Face model folder (config.json); None: no
    distillation."""
    temperature: float = 2.0
    """T of the soft targets: both softmaxes at logits / T, the term scaled by T^2."""
    hard_weight: float = 1.0
    """Weight of the objective's own tasks (the student's MLM loss)."""
    soft_weight: float = 0.0
    """Soft-target cross-entropy with the teacher's predictions (DistilBERT: 5)."""
    cosine_weight: float = 0.0
    """1 - cos between the last hidden states (DistilBERT: 1)."""
    embedding_weight: float = 0.0
    """MSE between the embedding outputs (TinyBERT: 1)."""
    hidden_weight: float = 0.0
    """MSE between each student block's output and its teacher block's (TinyBERT: 1)."""
    attention_weight: float = 0.0
    """MSE between each student block's attention scores and its teacher block's (TinyBERT:
    1)."""
    init_from_teacher: bool = False
    """Start the student from the teacher: block i from teacher block i x N / M, every other
    tensor of the same name and shape copied (DistilBERT)."""

    @property
    def enabled(self) -> bool:
        return self.teacher is not None

    @property
    def tasks(self) -> list[str]:
        """The label keys of the distillation tasks with a weight > 0."""
        return [key for key, name in DISTILL_TASKS.items() if getattr(self, name) > 0]

    def task_weight(self, label_key: str) -> float:
        """A task's weight in the loss: its distillation weight, or hard_weight for the
        objective's own tasks."""
        name = DISTILL_TASKS.get(label_key)
        return getattr(self, name) if name is not None else self.hard_weight

    def validate(self) -> None:
        weights = (
            "hard_weight",
            "soft_weight",
            "cosine_weight",
            "embedding_weight",
            "hidden_weight",
            "attention_weight",
        )
        for key in weights:
            value = getattr(self, key)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"distill.{key}={value} must be a finite number >= 0")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"distill.temperature={self.temperature} must be > 0")
        if self.teacher is None:
            changed = [k for k in weights[1:] if getattr(self, k) > 0]
            if changed or self.init_from_teacher:
                key = changed[0] if changed else "init_from_teacher"
                raise ConfigError(f"distill.{key} is set but distill.teacher is not")
            return
        if not Path(self.teacher).exists():
            raise ConfigError(f"distill.teacher={self.teacher!r} does not exist")
        if all(getattr(self, k) == 0 for k in weights[1:]):
            raise ConfigError(
                f"distill.teacher={self.teacher!r} with every distillation weight 0: set "
                "distill.soft_weight, cosine_weight, embedding_weight, hidden_weight or "
                "attention_weight (or use +distill=distilbert / tinybert)"
            )


@dataclass(kw_only=True)
class JobConfig:
    """A whole training job: one field per config group."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)


def register_configs() -> None:
    """Store the JobConfig schema in Hydra's ConfigStore as `job_schema`.

    conf/config.yaml names it first in its defaults list, so the dataclasses are the base
    config: their defaults are the only copy, the YAML files list what differs, and Hydra
    rejects an unknown key or a wrong type while composing. Call it before Hydra composes.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="job_schema", node=JobConfig)


def compose_job(overrides: list[str]) -> JobConfig:
    """The JobConfig launch/train.py builds from these command-line overrides (conf/ composed
    by Hydra over the registered schema), for scripts that run outside `hydra.main`."""
    from hydra import compose, initialize_config_dir

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    return load_job_config(cfg)


def load_job_config(cfg: DictConfig | dict) -> JobConfig:
    """Merge a composed config into the schema and return the typed, resolved JobConfig.

    Raises ValueError naming the offending key for unknown keys and wrong types.
    """
    schema = OmegaConf.structured(JobConfig)
    if isinstance(cfg, DictConfig):
        # Plain values: a node Hydra composed on the schema carries its own flags, and a key
        # added with `+group.key=` would be merged in (and then dropped) instead of refused.
        cfg = OmegaConf.to_container(cfg, resolve=False)
    try:
        merged = OmegaConf.merge(schema, cfg)
        OmegaConf.resolve(merged)
        job = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        reason = str(exc).splitlines()[0]
        raise ValueError(f"config key {key!r}: {reason}" if key else reason) from None
    assert isinstance(job, JobConfig)
    return job


def fit_micro_batch(job: JobConfig, *, world_size: int) -> str | None:
    """Where each data-parallel rank's share of the global batch is smaller than
    trainer.micro_batch_size (16 sequences over 8 ranks: 2 each), the share becomes the
    micro-batch, so a job runs unchanged on more ranks; returns the line saying so."""
    t = job.trainer
    try:
        dp = job.parallel.data_parallel_size(world_size)
    except (ValueError, ConfigError):
        return None  # validate_job names the layout's problem
    share = t.global_batch_size // dp
    if share < 1 or share >= t.micro_batch_size or t.global_batch_size % dp:
        return None
    note = (
        f"trainer.micro_batch_size={t.micro_batch_size} is more than the {share} rows each of "
        f"{dp} data-parallel ranks gets of trainer.global_batch_size={t.global_batch_size}: "
        f"micro-batches of {share}"
    )
    t.micro_batch_size = share
    return note


def validate_job(job: JobConfig, *, world_size: int = 1) -> None:
    """Check every group, then the constraints that span groups."""
    parts = (
        job.model,
        job.data,
        job.optim,
        job.precision,
        job.trainer,
        job.parallel,
        job.slurm,
        job.distill,
    )
    for part in parts:
        part.validate()
    t = job.trainer
    dp = job.parallel.data_parallel_size(world_size)
    if t.global_batch_size % dp:
        raise ValueError(
            f"trainer.global_batch_size={t.global_batch_size} does not split over "
            f"{dp} data-parallel ranks; make it a multiple of {dp}"
        )
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ValueError(
            f"trainer.global_batch_size={t.global_batch_size} is not a multiple of "
            f"trainer.micro_batch_size={t.micro_batch_size} x data-parallel size {dp}"
        )
    objective = job.data.objective or job.model.objective
    if objective not in OBJECTIVES:
        raise ValueError(f"model.objective={objective!r} is unknown; choose one of {OBJECTIVES}")
    seq_len = job.data.seq_len or job.model.max_seq_len
    if seq_len > job.model.max_seq_len:
        raise ValueError(
            f"data.seq_len={seq_len} exceeds model.max_seq_len={job.model.max_seq_len}"
        )
    job.data.check_objective(objective, seq_len=seq_len)
    job.model.check_objective(objective)
    if objective == "mlm_sbo" and job.data.mlm.sbo_max_targets > job.model.sbo_max_targets:
        raise ConfigError(
            f"data.mlm.sbo_max_targets={job.data.mlm.sbo_max_targets} exceeds the span "
            f"boundary head's model.sbo_max_targets={job.model.sbo_max_targets} positions"
        )
    if job.model.mem_len > 0 and job.data.sources is not None and len(job.data.sources) > 1:
        raise ConfigError(
            f"model.mem_len={job.model.mem_len} carries memory along consecutive segments of one "
            f"corpus; data.sources blends {len(job.data.sources)}: prepare them as one corpus"
        )
    if job.parallel.ep > 1 and not job.model.moe.enabled:
        raise ConfigError(
            f"parallel.ep={job.parallel.ep} needs experts to split: set model.moe.num_experts > 0"
        )
    if job.model.moe.num_experts % job.parallel.ep:
        raise ConfigError(
            f"model.moe.num_experts={job.model.moe.num_experts} is not divisible by "
            f"parallel.ep={job.parallel.ep}"
        )
    if job.optim.fused_lamb and (job.optim.name != "lamb" or job.parallel.engine != "deepspeed"):
        raise ValueError(
            f"optim.fused_lamb=true needs optim.name=lamb and parallel.engine=deepspeed, got "
            f"optim.name={job.optim.name!r}, parallel.engine={job.parallel.engine!r}"
        )
    if job.optim.decay_steps is not None and job.optim.decay_steps < job.optim.warmup_steps:
        raise ValueError(
            f"optim.decay_steps={job.optim.decay_steps} is shorter than "
            f"optim.warmup_steps={job.optim.warmup_steps}"
        )


def check_runnable(job: JobConfig, *, world_size: int) -> None:
    """What the layout cannot run with this world, model, precision or optimizer; checked
    before any process group, data or model exists (a dry run may still describe it)."""
    p, t = job.parallel, job.trainer
    p.check_available(world_size=world_size)
    if job.distill.enabled:
        _check_distill_layout(job)
    dp_size = p.data_parallel_size(world_size)
    if job.model.moe.enabled and p.tp > 1:
        raise ConfigError(
            f"model.moe.num_experts={job.model.moe.num_experts} with parallel.tp={p.tp}: "
            "tensor parallelism does not shard experts; spread them with parallel.ep instead"
        )
    if job.model.moe.enabled and p.engine == "deepspeed":
        raise ConfigError(
            "model.moe.num_experts > 0 with parallel.engine=deepspeed: the DeepSpeed engine "
            "does not run Loom's MoE layers; use parallel.engine=native"
        )
    if p.tp > 1:
        from parallel.tensor_parallel import TP_PLANS

        if job.model.family not in TP_PLANS:
            raise ConfigError(
                f"parallel.tp={p.tp} with model.family={job.model.family!r}: the family has no "
                f"tensor-parallel plan (families with one: {', '.join(TP_PLANS)}); set "
                "parallel.tp=1"
            )
        vocab = job.model.vocab_size and job.model.padded_vocab_size()
        check_tp_divisibility(job.model, vocab_rows=vocab or None, tp=p.tp)
        seq_len = job.data.seq_len or job.model.max_seq_len
        if p.sp and p.pp > 1 and job.model.position == "rotary":
            raise ConfigError(
                "parallel.sp=true with parallel.pp > 1 and model.position=rotary: a stage "
                "receives a slice of the sequence and cannot rebuild the rotary tables of the "
                "whole; set parallel.sp=false or model.position=learned"
            )
        if p.sp and seq_len % p.tp:
            raise ConfigError(
                f"parallel.sp=true needs the sequence length to split over parallel.tp={p.tp}; "
                f"data.seq_len (or model.max_seq_len) is {seq_len}"
            )
    if p.pp > 1:
        check_pipeline_split(job.model, pp=p.pp, virtual_stages=p.virtual_stages)
        p.check_pipeline(
            global_batch_size=t.global_batch_size,
            micro_batch_size=t.micro_batch_size,
            dp_size=dp_size,
        )
    if p.engine == "deepspeed":
        if job.precision.dtype == "fp16":
            raise ConfigError(
                "precision.dtype=fp16 is not supported with parallel.engine=deepspeed: DeepSpeed "
                "owns the gradients Loom's loss scaler would unscale; use bf16 or fp32"
            )
        if p.offload == "nvme" and job.optim.name == "lamb" and not job.optim.fused_lamb:
            raise ConfigError(
                "parallel.offload=nvme with optim.name=lamb: NVMe offload keeps the optimizer "
                "partitions on disk between steps, where exact LAMB cannot see them; use "
                "parallel.offload=cpu, or optim.name=adamw"
            )


def _check_distill_layout(job: JobConfig) -> None:
    """What distillation does not run with: pipeline stages and sequence parallelism (the
    student's and teacher's hidden states are compared whole on each rank), DeepSpeed, a
    chunked loss (the soft targets need whole logits)."""
    p, d = job.parallel, job.distill
    if p.pp > 1:
        raise ConfigError(
            f"distill.teacher with parallel.pp={p.pp}: the loss compares the student's and "
            "teacher's outputs of every layer, which pipeline stages split; use data or "
            "tensor parallelism"
        )
    if p.sp:
        raise ConfigError(
            "distill.teacher with parallel.sp=true: the hidden states are compared whole on "
            "each rank; set parallel.sp=false (tensor parallelism alone works)"
        )
    if p.engine == "deepspeed":
        raise ConfigError(
            "distill.teacher with parallel.engine=deepspeed: the teacher is placed by the native "
            "engine's layout; use parallel.engine=native (parallel.zero=3 shards the teacher too)"
        )
    if d.soft_weight > 0 and job.trainer.loss_chunk_tokens > 0:
        raise ConfigError(
            f"distill.soft_weight={d.soft_weight} with trainer.loss_chunk_tokens="
            f"{job.trainer.loss_chunk_tokens}: soft targets compare whole logits; set "
            "trainer.loss_chunk_tokens=0"
        )


def to_yaml(job: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(job))
