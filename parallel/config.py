"""Schema of the `parallel` config group."""

from __future__ import annotations

from dataclasses import dataclass

from common.errors import ConfigError
from models.config import ModelConfig

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")
MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "zero_bubble")
OFFLOADS = ("none", "cpu", "nvme")
# The environment that deterministic kernels and collectives need (trainer.deterministic),
# read once by each library, so set before CUDA and NCCL start: the accepted values, the
# first one the default. cuBLAS keeps a fixed workspace per stream, so its split-K
# reductions run in one order; NCCL's ring all-reduce adds in an order fixed by the
# topology (its other algorithms may pick a reduction tree by message size).
DETERMINISTIC_ENV = {
    "CUBLAS_WORKSPACE_CONFIG": (":4096:8", ":16:8"),
    "NCCL_ALGO": ("Ring",),
}


def check_deterministic_env(environ: dict[str, str]) -> None:
    """ValueError naming a variable of DETERMINISTIC_ENV set to a value that would let
    results vary from run to run (unset is fine: the default is filled in)."""
    for name, accepted in DETERMINISTIC_ENV.items():
        value = environ.get(name)
        if value is not None and value.lower() not in {a.lower() for a in accepted}:
            raise ValueError(
                f"trainer.deterministic=true needs {name} unset or one of {list(accepted)}; "
                f"it is {value!r}"
            )


@dataclass(kw_only=True)
class ParallelConfig:
    """Degrees of each parallel axis; data parallelism takes whatever the world size leaves."""

    dp: int = -1
    """Data-parallel degree; -1 takes whatever world size / (tp x pp) leaves."""
    tp: int = 1
    """Tensor-parallel degree."""
    sp: bool = False
    """Sequence parallelism: shard norms and dropout over the sequence on the TP ranks."""
    pp: int = 1
    """Pipeline-parallel degree (ranks along the pipeline)."""
    ep: int = 1
    """Expert-parallel degree: data-parallel ranks that split every MoE layer's experts
    between them (ep divides the data-parallel degree and model.moe.num_experts)."""
    pp_schedule: str = "1f1b"
    """gpipe | 1f1b | interleaved_1f1b | zero_bubble (the last two use virtual stages)."""
    pp_microbatches: int | None = None
    """Pipeline micro-batches per optimizer step; None = global batch / (micro batch x DP)."""
    virtual_stages: int = 1
    """Pipeline stages per rank (interleaved schedules); layers must divide pp x this."""
    zero: int = 0
    """ZeRO stage: 0 DDP, 1 shards optimizer states, 2 + gradients, 3 + parameters."""
    engine: str = "native"
    """native (torch DDP/FSDP2) or deepspeed."""
    backend: str | None = None
    """torch.distributed backend; None picks gloo on CPU and, on CUDA, nccl for device
    tensors with gloo for host-side scalars (cpu:gloo,cuda:nccl)."""
    offload: str = "none"
    """DeepSpeed ZeRO offload of optimizer states (and parameters at ZeRO-3): none | cpu | nvme."""
    nvme_path: str | None = None
    """Directory for offload=nvme."""
    activation_checkpointing: str = "none"
    """Recompute block activations in backward: none | full | selective (keep matmul outputs)."""
    compile: bool = False
    """torch.compile each Transformer block (regional, as torchtitan does: after tensor
    parallelism and activation checkpointing, before FSDP; blocks of one class share their
    compiled code). Not with parallel.engine=deepspeed."""
    init_timeout_s: float = 600.0
    """Seconds a collective may wait until the first step is done (rendezvous, corpus
    preparation by rank 0, first compilation); a rank that never arrives fails the job."""
    timeout_s: float = 300.0
    """Seconds a collective may wait after the first step (torchtitan tightens it likewise):
    a hung or lost rank fails the job within this, instead of holding the allocation."""

    def validate(self) -> None:
        for key in ("tp", "pp", "ep"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}={getattr(self, key)} must be >= 1")
        if self.dp == 0 or self.dp < -1:
            raise ConfigError(f"parallel.dp={self.dp} must be >= 1 (or -1 for automatic)")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero={self.zero} must be one of 0, 1, 2, 3")
        if self.engine not in ("native", "deepspeed"):
            raise ConfigError(f"parallel.engine={self.engine!r} must be 'native' or 'deepspeed'")
        if self.backend not in (None, "gloo", "nccl"):
            raise ConfigError(f"parallel.backend={self.backend!r} must be gloo, nccl or null")
        if self.pp_schedule not in SCHEDULES:
            raise ConfigError(
                f"parallel.pp_schedule={self.pp_schedule!r} must be gpipe, 1f1b, "
                "interleaved_1f1b or zero_bubble"
            )
        if self.virtual_stages < 1 or (
            self.pp_microbatches is not None and self.pp_microbatches < 1
        ):
            raise ConfigError("parallel.virtual_stages and parallel.pp_microbatches must be >= 1")
        if self.offload not in OFFLOADS:
            raise ConfigError(f"parallel.offload={self.offload!r} must be none, cpu or nvme")
        for key in ("init_timeout_s", "timeout_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"parallel.{key}={getattr(self, key)} must be > 0")
        if self.activation_checkpointing not in ("none", "full", "selective"):
            raise ConfigError(
                f"parallel.activation_checkpointing={self.activation_checkpointing!r} must be "
                "none, full or selective"
            )

    def check_available(self, *, world_size: int) -> None:
        """Refuse layouts that cannot run (dry runs may still describe them)."""
        if self.sp and self.tp == 1:
            raise ConfigError("parallel.sp=true needs parallel.tp > 1")
        if self.compile and self.engine == "deepspeed":
            raise ConfigError(
                "parallel.compile=true is not available with parallel.engine=deepspeed"
            )
        if self.offload != "none" and self.engine != "deepspeed":
            raise ConfigError(f"parallel.offload={self.offload} needs parallel.engine=deepspeed")
        if self.activation_checkpointing == "selective" and self.ep > 1 and self.zero >= 2:
            # torch 2.13's selective checkpointing replays ops by count, and the FSDP2 unit
            # of a block's experts runs its hooks a different number of times in recompute.
            raise ConfigError(
                f"parallel.activation_checkpointing=selective with parallel.ep={self.ep} and "
                f"parallel.zero={self.zero}: torch's selective checkpointing does not survive "
                "the expert units' FSDP2 hooks inside each block; use "
                "activation_checkpointing=full, or zero=1"
            )
        if self.engine == "deepspeed":
            check_layout(self, world_size=world_size)

    def pipeline_microbatches(
        self, *, global_batch_size: int, micro_batch_size: int, dp_size: int
    ) -> int:
        """Microbatches per schedule step: pp_microbatches, or the accumulation steps."""
        if self.pp_microbatches is not None:
            return self.pp_microbatches
        return global_batch_size // (micro_batch_size * dp_size)

    def rows_per_call(self, *, global_batch_size: int, micro_batch_size: int, dp_size: int) -> int:
        """Rows of each batch the trainer hands the engine: the micro-batch, or under a
        pipeline the rank's whole share of the global batch (the schedule splits it)."""
        if self.pp > 1:
            return global_batch_size // dp_size
        return micro_batch_size

    def check_pipeline(self, *, global_batch_size: int, micro_batch_size: int, dp_size: int):
        """Refuse, naming the fields, what torch's pipeline schedules would refuse later."""
        if self.pp == 1:
            return
        n = self.pipeline_microbatches(
            global_batch_size=global_batch_size, micro_batch_size=micro_batch_size, dp_size=dp_size
        )
        rows = global_batch_size // dp_size
        if rows % n:
            raise ConfigError(
                f"parallel.pp_microbatches={n} does not divide the {rows} rows each "
                f"data-parallel rank gets of trainer.global_batch_size={global_batch_size}"
            )
        if self.pp_schedule not in MULTI_STAGE_SCHEDULES and self.virtual_stages != 1:
            raise ConfigError(
                f"parallel.pp_schedule={self.pp_schedule} runs one stage per rank; set "
                f"parallel.virtual_stages=1 (got {self.virtual_stages}) or use "
                "interleaved_1f1b / zero_bubble"
            )
        if self.pp_schedule == "1f1b" and n < self.pp:
            raise ConfigError(
                f"parallel.pp_schedule=1f1b needs parallel.pp_microbatches={n} "
                f">= parallel.pp={self.pp} (raise trainer.global_batch_size or lower "
                "trainer.micro_batch_size)"
            )
        rounds = max(1, n // self.pp)
        if self.pp_schedule in MULTI_STAGE_SCHEDULES and n % rounds:
            raise ConfigError(
                f"parallel.pp_schedule={self.pp_schedule} needs parallel.pp_microbatches={n} "
                f"to be a multiple of {rounds} (rounds of parallel.pp={self.pp} microbatches)"
            )

    def data_parallel_size(self, world_size: int) -> int:
        """Ranks per data-parallel replica group; fails if the degrees do not fit the world."""
        model_parallel = self.tp * self.pp
        if world_size % model_parallel:
            raise ConfigError(
                f"parallel.tp={self.tp} x parallel.pp={self.pp} does not divide "
                f"the world size {world_size}"
            )
        dp = world_size // model_parallel
        if self.dp != -1 and self.dp != dp:
            raise ConfigError(
                f"parallel.dp={self.dp} x tp={self.tp} x pp={self.pp} = "
                f"{self.dp * model_parallel} does not match the world size {world_size}"
            )
        if dp % self.ep:
            raise ConfigError(
                f"parallel.ep={self.ep} does not divide the {dp} data-parallel ranks "
                f"(world size {world_size} / (tp={self.tp} x pp={self.pp}))"
            )
        return dp

    def world_size_for_plan(self, launched: int) -> int:
        """World size a dry run describes: the explicit degrees, else the launched world."""
        return self.dp * self.tp * self.pp if self.dp != -1 else launched


def check_layout(cfg: ParallelConfig, *, world_size: int) -> None:
    """Refuse what the DeepSpeed engine does not run: it is data parallel only (ZeRO 1-3)."""
    if cfg.engine != "deepspeed":
        raise ConfigError(f"parallel.engine={cfg.engine!r}: check_layout is for 'deepspeed'")
    others = [f"parallel.{k}={getattr(cfg, k)}" for k in ("tp", "pp") if getattr(cfg, k) != 1]
    if others:
        raise ConfigError(
            f"{', '.join(others)} with parallel.engine=deepspeed: the DeepSpeed engine is data "
            "parallel only; set parallel.tp=1 and parallel.pp=1, or use parallel.engine=native"
        )
    if cfg.zero not in (1, 2, 3):
        raise ConfigError(
            f"parallel.zero={cfg.zero} with parallel.engine=deepspeed: choose ZeRO stage 1, 2 "
            "or 3 (plain DDP is parallel.engine=native, parallel.zero=0)"
        )
    cfg.data_parallel_size(world_size)


def check_tp_divisibility(cfg: ModelConfig, *, vocab_rows: int | None, tp: int) -> None:
    """ValueError naming the field unless heads, MLP width and vocab rows split over `tp`
    (vocab_rows None: not known yet, e.g. before the tokenizer is read)."""
    if tp < 1:
        raise ConfigError(f"parallel.tp={tp} must be >= 1")
    if cfg.n_head % tp:
        raise ConfigError(
            f"model.n_head={cfg.n_head} is not divisible by parallel.tp={tp}: "
            "each tensor-parallel rank holds whole attention heads"
        )
    if cfg.ffn_size % tp:
        raise ConfigError(
            f"model.d_ff={cfg.ffn_size} (the MLP inner size) is not divisible by parallel.tp={tp}"
        )
    if vocab_rows is not None and vocab_rows % tp:
        raise ConfigError(
            f"vocab rows {vocab_rows} (the padded vocabulary) are not divisible by "
            f"parallel.tp={tp}; set model.make_vocab_size_divisible_by to a multiple of {tp}"
        )
    if cfg.family == "electra":
        gen = cfg.generator_config()
        if gen.n_head % tp or gen.ffn_size % tp:
            raise ConfigError(
                f"model.generator_size={cfg.generator_size} gives ELECTRA's generator "
                f"{gen.n_head} heads and an MLP of {gen.ffn_size}, which parallel.tp={tp} "
                "must both divide"
            )
