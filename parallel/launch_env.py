"""Where this process sits, read from whichever launcher started it.

Three ways to start Loom, told apart by their environment:

* plain `python launch/train.py`: one process (rank 0 of 1);
* torchrun (`torch.distributed.run`, also `srun --ntasks-per-node=1 torchrun --nnodes N
  --rdzv-backend c10d ...` on a cluster): torchrun sets RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR/PORT, GROUP_WORLD_SIZE (its agents) and TORCHELASTIC_RUN_ID;
* one Slurm task per rank (`srun -n TOTAL python launch/train.py`): Slurm sets
  SLURM_PROCID, SLURM_LOCALID and SLURM_STEP_NUM_TASKS in every task of a job step; the
  rendezvous host is the step's first node and the port is derived from the job id, so
  that jobs sharing a node do not collide (MASTER_ADDR / MASTER_PORT override both).

A double launch, torchrun started by more Slurm tasks than it has agents (`srun -n 2
torchrun --standalone ...`: two independent worlds writing one run directory), is refused
with the message naming it. An sbatch script's own shell is not a job step (no
SLURM_STEP_NUM_TASKS), so a `python launch/train.py` in it is one process.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["LaunchEnv", "expand_hostlist", "launch_env", "slurm_port"]

_TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LaunchEnv:
    launcher: str  # "single" | "torchrun" | "slurm"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    job_id: str | None = None  # the Slurm job id, when under Slurm
    restart_count: int = 0  # SLURM_RESTART_COUNT (requeues) + TORCHELASTIC_RESTART_COUNT

    def export(self) -> None:
        """Set the variables init_process_group's env:// rendezvous reads (Slurm tasks)."""
        if self.launcher != "slurm":
            return
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK=str(self.local_rank),
            MASTER_ADDR=str(self.master_addr),
            MASTER_PORT=str(self.master_port),
        )


def launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv:
    """The launch this process belongs to; ValueError (one line) for a double launch or a
    torchrun environment missing a variable."""
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID")
    restarts = int(env.get("SLURM_RESTART_COUNT", "0") or 0)
    restarts += int(env.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    step_tasks = int(env.get("SLURM_STEP_NUM_TASKS", "0") or 0)
    if "TORCHELASTIC_RUN_ID" in env or "WORLD_SIZE" in env:
        world = int(env.get("WORLD_SIZE", "1"))
        missing = [k for k in _TORCHRUN_KEYS if k not in env]
        if world > 1 and missing:
            raise ValueError(f"WORLD_SIZE={world} but the environment lacks {', '.join(missing)}")
        agents = int(env.get("GROUP_WORLD_SIZE", "1") or 1)
        if "TORCHELASTIC_RUN_ID" in env and step_tasks > agents:
            raise ValueError(
                f"double launch: {step_tasks} Slurm tasks (SLURM_STEP_NUM_TASKS) each started "
                f"torchrun, which expects {agents} agent(s) (--nnodes); start one torchrun per "
                "node (srun --ntasks-per-node=1 torchrun --nnodes N --rdzv-backend c10d ...) "
                "or one Slurm task per rank without torchrun (srun -n TOTAL python ...)"
            )
        return LaunchEnv(
            launcher="torchrun" if world > 1 or "TORCHELASTIC_RUN_ID" in env else "single",
            rank=int(env.get("RANK", "0")),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", "0")),
            master_addr=env.get("MASTER_ADDR"),
            master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else None,
            job_id=job_id,
            restart_count=restarts,
        )
    if step_tasks > 1:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or ""
        hosts = expand_hostlist(nodes)
        return LaunchEnv(
            launcher="slurm",
            rank=int(env["SLURM_PROCID"]),
            world_size=step_tasks,
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            master_addr=env.get("MASTER_ADDR") or (hosts[0] if hosts else "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT") or slurm_port(job_id or "0")),
            job_id=job_id,
            restart_count=restarts,
        )
    return LaunchEnv(launcher="single", job_id=job_id, restart_count=restarts)


def slurm_port(job_id: str) -> int:
    """A rendezvous port in 20000-39999 from the job id: different for jobs that may share a
    node, the same on every task of one job (and after its requeue)."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return 20000 + int(digits) % 20000


def expand_hostlist(text: str) -> list[str]:
    """Slurm's compressed host list (`node[01-03,7],gpu-a[1-2]b`) as host names, in order;
    what `scontrol show hostnames` prints."""
    hosts: list[str] = []
    for item in _split_top_level(text):
        hosts.extend(_expand_one(item))
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split at the commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def _expand_one(item: str) -> list[str]:
    match = re.search(r"\[([^\]]*)\]", item)
    if match is None:
        return [item]
    head, tail = item[: match.start()], item[match.end() :]
    names = []
    for part in match.group(1).split(","):
        low, _, high = part.partition("-")
        if not high:
            values = [low]
        else:
            width = len(low)  # zero padding as written: 01-03 -> 01, 02, 03
            values = [str(v).zfill(width) for v in range(int(low), int(high) + 1)]
        names.extend(head + v for v in values)
    tails = _expand_one(tail)
    return [name + rest for name in names for rest in tails]
