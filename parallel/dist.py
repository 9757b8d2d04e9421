"""Process-group set-up and the few collectives the trainer needs.

Everything distributed lives in `parallel/`; the trainer calls these helpers and never
touches torch.distributed itself.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from common.cpu_math import settle_cpu_math
from parallel.config import DETERMINISTIC_ENV, ParallelConfig, check_deterministic_env
from parallel.launch_env import launch_env

# Outermost to innermost, as torchtitan orders them: the innermost axis gets the
# fastest links (TP within a node, then the all-to-alls of expert parallelism), pipeline
# stages span the slowest. `ep` is carved out of data parallelism: dp = dp_replicate x
# dp_shard x ep.
MESH_AXES = ("pp", "dp_replicate", "dp_shard", "ep", "tp")
# Flattened axes (see init_world): dp = dp_replicate x dp_shard x ep, fsdp = dp_shard x ep,
# edp = dp_replicate x dp_shard.
FLAT_AXES = ("dp", "fsdp", "edp")


@dataclass(frozen=True)
class World:
    """Where this process sits: global rank, data-parallel coordinates, device, mesh."""

    rank: int
    world_size: int
    local_rank: int
    dp_rank: int
    dp_size: int
    device: torch.device
    mesh: DeviceMesh | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int) -> torch.device:
    """CPU, or the CUDA device of this local rank; where a launcher shows each process one
    GPU (a Slurm task bound to its GPU), that one."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device='cuda' but no CUDA device is visible")
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        count = torch.cuda.device_count()
        index = 0 if count == 1 else local_rank
        if index >= count:
            raise ValueError(
                f"local rank {local_rank} has no CUDA device: {count} are visible "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})"
            )
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def use_deterministic_kernels() -> None:
    """Make every step's results the same from run to run on one layout (a GPU's atomics
    and autotuning otherwise vary them in the last bits): PyTorch's deterministic kernels
    (an operation that has none raises), cuDNN without autotuning, and the environment of
    DETERMINISTIC_ENV. Call before CUDA and the process group start; ValueError names a
    variable already set to a value that would undo it."""
    check_deterministic_env(os.environ)
    for name, accepted in DETERMINISTIC_ENV.items():
        os.environ.setdefault(name, accepted[0])
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def world_size_from_env() -> int:
    """The world size torchrun or Slurm describes (1 for a plain process); ValueError names
    a double launch."""
    return launch_env().world_size


def init_world(
    cfg: ParallelConfig, *, device_preference: str, deterministic: bool = False
) -> World:
    """Join the process group that torchrun or Slurm's tasks describe in the environment;
    collectives may wait parallel.init_timeout_s until `tighten_timeout` is called.
    deterministic: `use_deterministic_kernels` first (trainer.deterministic). CPU math is
    settled first of all (common.cpu_math: its first multi-threaded call may be inexact)."""
    settle_cpu_math()
    env = launch_env()
    env.export()
    if deterministic:
        use_deterministic_kernels()
    world_size = env.world_size
    cfg.check_available(world_size=world_size)
    rank, local_rank = env.rank, env.local_rank
    device = resolve_device(device_preference, local_rank)
    dp_size = cfg.data_parallel_size(world_size)
    if world_size == 1:
        return World(rank=0, world_size=1, local_rank=0, dp_rank=0, dp_size=1, device=device)
    backend = process_group_backend(cfg.backend, device)
    if "nccl" in backend:
        # NCCL's own failure handling: a collective error or timeout tears the process
        # down, and its flight recorder keeps the last collectives for a post-mortem.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        os.environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
        os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            device_id=device if device.type == "cuda" else None,
            timeout=timedelta(seconds=cfg.init_timeout_s),
        )
    mesh = init_device_mesh(device.type, mesh_shape(cfg, dp_size), mesh_dim_names=MESH_AXES)
    # Flattened axes: "dp", every data-parallel rank (batches, loss sums, dense gradients,
    # whether replicas or ZeRO shards); "fsdp", the ranks ZeRO-2/3 shard dense parameters
    # over; "edp", the ranks holding the same experts (all of dp when ep = 1).
    mesh["dp_replicate", "dp_shard", "ep"]._flatten(mesh_dim_name="dp")
    mesh["dp_shard", "ep"]._flatten(mesh_dim_name="fsdp")
    mesh["dp_replicate", "dp_shard"]._flatten(mesh_dim_name="edp")
    dp_rank = mesh["dp"].get_local_rank()
    return World(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        dp_rank=dp_rank,
        dp_size=dp_size,
        device=device,
        mesh=mesh,
    )


def process_group_backend(backend: str | None, device: torch.device) -> str:
    """gloo on CPU; on CUDA NCCL for device tensors with gloo beside it for the host-side
    scalars (loss sums, token counts, stop flags), so every collective finds a backend
    for its tensors' device. An explicit parallel.backend=gloo is taken as it is."""
    if device.type != "cuda":
        return backend or "gloo"
    if backend in (None, "nccl"):
        return "cpu:gloo,cuda:nccl"
    return backend


def mesh_shape(cfg: ParallelConfig, dp_size: int) -> tuple[int, int, int, int, int]:
    """(pp, dp_replicate, dp_shard, ep, tp): ZeRO-2/3 shard over the data-parallel ranks,
    ZeRO-0/1 replicate the model (ZeRO-1 shards only optimizer states); the ep ranks are
    data-parallel ranks that split the experts."""
    edp = dp_size // cfg.ep
    sharded = cfg.zero >= 2
    return (cfg.pp, 1 if sharded else edp, edp if sharded else 1, cfg.ep, cfg.tp)


def tighten_timeout(world: World, seconds: float) -> None:
    """Set every process group of the world (the default one and each mesh axis, flattened
    ones included) to time out after `seconds`; called once the first step is done."""
    if not world.distributed:
        return
    timeout = timedelta(seconds=seconds)
    groups = [None]
    if world.mesh is not None:
        names = list(world.mesh.mesh_dim_names or ()) + list(FLAT_AXES)
        groups += [world.mesh[name].get_group() for name in dict.fromkeys(names)]
    for group in groups:
        dist.distributed_c10d._set_pg_timeout(timeout, group)


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def dp_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """Sum a tensor over the data-parallel ranks (in place on a copy; returns the sum)."""
    if world.dp_size == 1:
        return values
    out = values.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=world.mesh["dp"].get_group())
    return out


def max_over_ranks_(value: torch.Tensor, world: World) -> torch.Tensor:
    """`value` (on the device) set in place to its maximum over every rank, without a wait
    on the host: e.g. an overflow verdict that any rank's gradient shard may raise."""
    if world.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value


def max_over_ranks(value: int, world: World) -> int:
    """The largest of every rank's `value` (one small all-reduce), e.g. a reason to stop."""
    if not world.distributed:
        return value
    out = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return int(out.item())


def gather_objects(obj: object, world: World) -> list[object]:
    """Every rank's `obj` (picklable, small), in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out: list[object] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out
