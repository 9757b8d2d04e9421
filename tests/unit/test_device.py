"""Which device a process takes and which backends its process group gets, with CUDA's
answers stood in for (no GPU here): one GPU per local rank under torchrun, the one visible
GPU under a Slurm task bound to it, NCCL with gloo beside it for host-side scalars."""

from __future__ import annotations

import pytest
import torch

from parallel.dist import process_group_backend, resolve_device


@pytest.fixture
def gpus(monkeypatch):
    """A machine with `n` visible GPUs; returns the devices set_device was given."""
    chosen: list[int] = []

    def visible(n: int) -> list[int]:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
        return chosen

    return visible


def test_each_local_rank_takes_its_own_gpu(gpus):
    chosen = gpus(8)
    assert resolve_device("auto", 5) == torch.device("cuda", 5)
    assert resolve_device("cuda", 0) == torch.device("cuda", 0)
    assert chosen == [5, 0]


def test_a_task_bound_to_one_gpu_takes_that_one_whatever_its_local_rank(gpus):
    chosen = gpus(1)
    assert resolve_device("auto", 3) == torch.device("cuda", 0)
    assert chosen == [0]


def test_a_local_rank_without_a_gpu_is_named(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ValueError, match="local rank 2 has no CUDA device: 2 are visible"):
        resolve_device("auto", 2)


def test_cpu_unless_cuda_is_there_or_asked_for(gpus):
    gpus(0)
    assert resolve_device("auto", 0) == torch.device("cpu")
    with pytest.raises(ValueError, match="trainer.device='cuda' but no CUDA device"):
        resolve_device("cuda", 0)
    gpus(4)
    assert resolve_device("cpu", 1) == torch.device("cpu")


def test_cuda_groups_get_gloo_beside_nccl_for_host_tensors():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert process_group_backend(None, cuda) == "cpu:gloo,cuda:nccl"
    assert process_group_backend("nccl", cuda) == "cpu:gloo,cuda:nccl"
    assert process_group_backend("gloo", cuda) == "gloo"  # asked for as it is
    assert process_group_backend(None, cpu) == "gloo"
