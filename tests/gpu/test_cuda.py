"""Run on a machine with a CUDA device (`pytest -m gpu`); skipped elsewhere."""

from __future__ import annotations

import pytest
import torch

from models import build_model
from models.config import ModelConfig
from tests.conftest import read_metrics

pytestmark = pytest.mark.gpu


def test_gpt_forward_matches_cpu_in_fp32():
    torch.manual_seed(0)
    model = build_model(ModelConfig(), vocab_size=366).eval()
    ids = torch.randint(0, 366, (2, 64))
    with torch.no_grad():
        cpu = model(ids)
        gpu = model.cuda()(ids.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_training_on_cuda_reports_mfu(train_cli, tmp_path, dtype):
    train_cli(
        "trainer.device=cuda",
        f"precision={dtype}",
        "trainer.max_steps=40",
        "trainer.eval_every=0",
        f"trainer.out_dir={tmp_path}",
    )
    records = read_metrics(tmp_path)
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["mfu"] is not None and 0 < records[-1]["mfu"] < 1


def test_deepspeed_fused_lamb_trains(train_cli, tmp_path):
    """The opt-in FusedLamb kernel (per-partition trust ratio) trains under DeepSpeed ZeRO-2."""
    pytest.importorskip("deepspeed")
    train_cli(
        "trainer.device=cuda",
        "optim=lamb",
        "optim.fused_lamb=true",
        "parallel.engine=deepspeed",
        "parallel.zero=2",
        "trainer.max_steps=40",
        "trainer.eval_every=0",
        f"trainer.out_dir={tmp_path}",
        nproc=1,
    )
    records = read_metrics(tmp_path)
    assert records[-1]["loss"] < records[0]["loss"]
