"""parallel.engine=deepspeed through launch/train.py: LAMB under DeepSpeed ZeRO matches one
native process, and checkpoints move between the engines."""

from __future__ import annotations

import ctypes.util

import pytest

from parallel.deepspeed_engine import deepspeed_available
from tests.conftest import assert_same_losses

pytestmark = pytest.mark.skipif(not deepspeed_available(), reason="deepspeed is not installed")

TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=2",
    "model.max_seq_len=64",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.log_every=1",
    "trainer.eval_every=3",
    "trainer.eval_samples=6",
    "optim=lamb",
    "optim.warmup_steps=2",
    "optim.decay_steps=6",
    "trainer.save_every=3",
]


@pytest.mark.parametrize(
    "extra", [["parallel.zero=2"], ["parallel.zero=3"], ["parallel.zero=2", "parallel.offload=cpu"]]
)
def test_deepspeed_lamb_matches_native_single_process(train_cli, one_process, tmp_path, extra):
    one = one_process(*TINY, "trainer.max_steps=6")
    train_cli(
        *TINY,
        "trainer.max_steps=6",
        "parallel.engine=deepspeed",
        *extra,
        f"trainer.out_dir={tmp_path / 'ds'}",
        nproc=2,
    )
    assert_same_losses(one, tmp_path / "ds")


def test_deepspeed_checkpoint_resumes_in_native_engine(train_cli, one_process, tmp_path):
    whole = one_process(*TINY, "trainer.max_steps=6")
    split = tmp_path / "split"
    train_cli(
        *TINY,
        "trainer.max_steps=3",
        "parallel.engine=deepspeed",
        "parallel.zero=1",
        f"trainer.out_dir={split}",
        nproc=2,
    )
    train_cli(*TINY, "trainer.max_steps=6", "parallel.zero=3", f"trainer.out_dir={split}", nproc=2)
    assert_same_losses(whole, split)


def test_deepspeed_refuses_model_parallel_layouts(train_cli, tmp_path):
    proc = train_cli(
        *TINY,
        "parallel.engine=deepspeed",
        "parallel.zero=2",
        "parallel.tp=2",
        "parallel.zero=3",
        f"trainer.out_dir={tmp_path}",
        nproc=2,
        check=False,
    )
    assert proc.returncode != 0 and "parallel.tp=2" in proc.stdout + proc.stderr


@pytest.mark.skipif(
    ctypes.util.find_library("aio") is None,
    reason="NVMe offload needs libaio (apt install libaio-dev); DeepSpeed builds its async_io op",
)
def test_deepspeed_nvme_offload_matches_native_single_process(train_cli, tmp_path):
    """ZeRO-3 with optimizer states swapped to disk between steps (AdamW: exact LAMB needs
    the partitions in memory and refuses NVMe by name). The first run builds DeepSpeed's
    async_io op, which takes minutes; it is cached afterwards."""
    adamw = [o.replace("optim=lamb", "optim=adamw") for o in TINY] + ["trainer.max_steps=6"]
    train_cli(*adamw, f"trainer.out_dir={tmp_path / 'one'}")
    swap = tmp_path / "nvme"
    train_cli(
        *adamw,
        "parallel.engine=deepspeed",
        "parallel.zero=3",
        "parallel.offload=nvme",
        f"parallel.nvme_path={swap}",
        f"trainer.out_dir={tmp_path / 'ds'}",
        nproc=2,
        timeout=1800,
    )
    assert_same_losses(tmp_path / "one", tmp_path / "ds")
    assert sorted(p.name for p in (swap / "zero_stage_3" / "optimizer").iterdir()) == [
        "rank0",
        "rank1",
    ]
