"""Rank, world and rendezvous read from torchrun's or Slurm's environment (as each sets it)."""

from __future__ import annotations

import pytest

from parallel.launch_env import expand_hostlist, launch_env, slurm_port

TORCHRUN = {
    "RANK": "3",
    "WORLD_SIZE": "4",
    "LOCAL_RANK": "1",
    "MASTER_ADDR": "head",
    "MASTER_PORT": "29500",
    "GROUP_WORLD_SIZE": "2",
    "TORCHELASTIC_RUN_ID": "job",
    "TORCHELASTIC_RESTART_COUNT": "1",
}
# What `srun -N 2 -n 4 python ...` gives the task with rank 2 (first task on node b).
SLURM_TASK = {
    "SLURM_JOB_ID": "4321",
    "SLURM_PROCID": "2",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NODELIST": "gpu-[07-08]",
    "SLURM_JOB_NODELIST": "gpu-[07-08]",
    "SLURM_RESTART_COUNT": "2",
}


def test_plain_process_is_rank_zero_of_one():
    env = launch_env({})
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("single", 0, 1, 0)


def test_torchrun_variables_are_read_as_set():
    env = launch_env(TORCHRUN)
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("torchrun", 3, 4, 1)
    assert (env.master_addr, env.master_port, env.restart_count) == ("head", 29500, 1)


def test_torchrun_per_node_under_slurm_is_one_agent_per_task():
    env = launch_env({**TORCHRUN, "SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "2"})
    assert env.launcher == "torchrun" and env.job_id == "7"


def test_slurm_task_per_rank_derives_rendezvous_from_the_job():
    env = launch_env(SLURM_TASK)
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("slurm", 2, 4, 0)
    assert env.master_addr == "gpu-07" and env.master_port == slurm_port("4321") == 24321
    assert env.restart_count == 2
    explicit = launch_env({**SLURM_TASK, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234"})
    assert (explicit.master_addr, explicit.master_port) == ("10.0.0.1", 1234)


def test_batch_shell_is_not_a_job_step():
    """sbatch's own shell has job variables but no step: a plain process there is alone."""
    env = launch_env({"SLURM_JOB_ID": "9", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"})
    assert (env.launcher, env.world_size, env.job_id) == ("single", 1, "9")


def test_double_launch_is_refused_by_name():
    """`srun -n 2 torchrun --standalone ...`: two torchruns that each think they are alone."""
    env = {**TORCHRUN, "GROUP_WORLD_SIZE": "1", "SLURM_STEP_NUM_TASKS": "2"}
    with pytest.raises(ValueError, match=r"double launch: 2 Slurm tasks .* 1 agent"):
        launch_env(env)


def test_incomplete_torchrun_environment_names_the_missing_variables():
    with pytest.raises(ValueError, match="lacks MASTER_ADDR, MASTER_PORT"):
        launch_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


@pytest.mark.parametrize(
    ("text", "hosts"),
    [
        ("node1", ["node1"]),
        ("node[1-3]", ["node1", "node2", "node3"]),
        ("gpu-[07-09,12]", ["gpu-07", "gpu-08", "gpu-09", "gpu-12"]),
        ("a[1-2],b5,c[01-02]x", ["a1", "a2", "b5", "c01x", "c02x"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ],
)
def test_hostlists_expand_like_scontrol(text, hosts):
    assert expand_hostlist(text) == hosts
