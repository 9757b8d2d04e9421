"""trainer.deterministic: the kernel flags and the environment it sets, what it refuses, and
that a deterministic step computes what the default step does (on CPU the kernels are the
same; tests/gpu runs the same job twice on CUDA and compares the bits)."""

from __future__ import annotations

import os

import pytest
import torch

from parallel.config import DETERMINISTIC_ENV
from parallel.dist import init_world, use_deterministic_kernels
from trainer.config import TrainerConfig, compose_job
from trainer.loop import Trainer, host_values


@pytest.fixture
def clean_state():
    """No deterministic variable set; flags and variables put back afterwards."""
    saved_env = {name: os.environ.pop(name, None) for name in DETERMINISTIC_ENV}
    saved_flags = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    yield
    for name, value in saved_env.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value
    torch.use_deterministic_algorithms(saved_flags[0], warn_only=saved_flags[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved_flags[2:]


def test_sets_the_kernel_flags_and_fills_in_the_environment(clean_state):
    use_deterministic_kernels()
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()  # strict: raises
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert os.environ["NCCL_ALGO"] == "Ring"


def test_keeps_accepted_values_the_user_set(clean_state):
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    os.environ["NCCL_ALGO"] = "ring"
    use_deterministic_kernels()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["NCCL_ALGO"] == "ring"


@pytest.mark.parametrize(
    ("name", "value"), [("CUBLAS_WORKSPACE_CONFIG", ":0:0"), ("NCCL_ALGO", "Tree,NVLS")]
)
def test_refuses_a_varying_setting_by_name_before_changing_anything(clean_state, name, value):
    os.environ[name] = value
    with pytest.raises(ValueError, match=f"trainer.deterministic=true needs {name}.*{value!r}"):
        use_deterministic_kernels()
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(ValueError, match=name):  # and the config check, before any work
        TrainerConfig(deterministic=True).validate()
    TrainerConfig(deterministic=False).validate()


@pytest.mark.parametrize("model", ["gpt_moe_debug", "electra_debug"])
def test_a_deterministic_step_equals_the_default_one_on_cpu(
    clean_state, loom_cache, tmp_path, monkeypatch, model
):
    """MoE's combine (index_add_) and ELECTRA's sampling (integer cumulative sums) are the
    operations with a separate deterministic path on CUDA; on CPU both give the same bits."""
    monkeypatch.setenv("LOOM_CACHE", str(loom_cache))
    losses = []
    for deterministic in (False, True):
        job = compose_job(
            [
                f"+model={model}",
                "trainer.tensorboard=false",
                f"trainer.deterministic={str(deterministic).lower()}",
                f"trainer.out_dir={tmp_path / str(deterministic)}",
            ]
        )
        world = init_world(job.parallel, device_preference="cpu", deterministic=deterministic)
        trainer = Trainer(job, world)
        losses.append([host_values(trainer.train_step(step))["loss"] for step in range(2)])
    assert torch.are_deterministic_algorithms_enabled()
    assert losses[0] == losses[1]
