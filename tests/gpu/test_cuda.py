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


def test_moe_grouped_gemm_matches_the_expert_loop_on_cuda():
    """bf16 autocast on an SM80+ device takes the grouped GEMM by default; it agrees with
    the per-expert loop in output and in every gradient."""
    from models.moe import Experts, grouped_mm_runs

    torch.manual_seed(0)
    experts = Experts(8, 256, 1024, activation="gelu", bias=True).cuda()
    counts = torch.tensor([300, 0, 17, 512, 64, 1, 0, 130], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda")
    grad = torch.randn(len(x), 256, device="cuda", dtype=torch.bfloat16)
    runs = []
    for grouped in (None, False):
        experts.grouped = grouped
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if grouped is None:
                assert grouped_mm_runs(xi, experts.weights())
            y = experts(xi, counts)
        y.backward(grad)
        runs.append([y.float(), xi.grad, *(p.grad.clone() for p in experts.parameters())])
        experts.zero_grad(set_to_none=True)
    for fast, loop in zip(*runs, strict=True):
        torch.testing.assert_close(fast, loop, rtol=2e-2, atol=2e-2)


def test_moe_model_trains_on_cuda(train_cli, tmp_path):
    train_cli(
        "+model=gpt_moe_debug",
        "trainer.device=cuda",
        "precision=bf16",
        "trainer.max_steps=40",
        "trainer.eval_every=0",
        f"trainer.out_dir={tmp_path}",
    )
    records = read_metrics(tmp_path)
    assert records[-1]["loss"] < records[0]["loss"]
    assert records[-1]["mfu"] is not None and 0 < records[-1]["mfu"] < 1


@pytest.mark.parametrize(
    "overrides",
    [["precision=bf16"], ["precision=fp16"], ["precision=fp16", "optim=lamb"]],
    ids=["bf16", "fp16-adamw", "fp16-lamb"],
)
def test_training_steps_never_wait_for_the_gpu(loom_cache, tmp_path, monkeypatch, overrides):
    """Between logged steps nothing reads the device: losses, token counts, the gradient
    norm and fp16's overflow verdict and loss scale stay on it (the optimizer skips an
    overflowing step there). Any synchronising call in these steps raises under
    torch.cuda.set_sync_debug_mode("error")."""
    from parallel.dist import init_world
    from trainer.config import compose_job
    from trainer.loop import Trainer

    monkeypatch.setenv("LOOM_CACHE", str(loom_cache))
    job = compose_job(["trainer.device=cuda", *overrides, f"trainer.out_dir={tmp_path}"])
    trainer = Trainer(job, init_world(job.parallel, device_preference="cuda"))
    records = steps_under_sync_check(trainer, warmup=2, steps=3)
    assert float(records[-1]["loss"]) < 10


def steps_under_sync_check(trainer, *, warmup: int, steps: int) -> list[dict]:
    """`steps` training steps after `warmup` ones (allocator, cuBLAS handles, optimizer
    state), under set_sync_debug_mode("error"): any call that waits for the device raises.
    Their records, whose losses and norms are still on the device."""
    for step in range(warmup):
        trainer.train_step(step)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        records = [trainer.train_step(step) for step in range(warmup, warmup + steps)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(r["loss"].is_cuda and r["grad_norm"].is_cuda for r in records)
    return records


def _peak_and_estimate(loom_cache, tmp_path, monkeypatch, *overrides: str) -> tuple[float, dict]:
    """Peak allocated GiB over three training steps after two warm-up steps, and the dry
    run's estimate for the same job (its 'total_gib': SDPA keeps no attention scores)."""
    from parallel.dist import init_world
    from trainer.config import compose_job
    from trainer.dry_run import memory_estimate
    from trainer.loop import Trainer

    monkeypatch.setenv("LOOM_CACHE", str(loom_cache))
    job = compose_job(
        ["trainer.device=cuda", "trainer.tensorboard=false", f"trainer.out_dir={tmp_path}"]
        + list(overrides)
    )
    trainer = Trainer(job, init_world(job.parallel, device_preference="cuda"))
    for step in range(2):
        trainer.train_step(step)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for step in range(2, 5):
        trainer.train_step(step)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    estimate = memory_estimate(
        job, params=trainer.counts["total"], vocab=trainer.vocab_size, world_size=1
    )
    return peak, estimate


def test_dry_run_memory_estimate_within_10_percent_of_the_peak(loom_cache, tmp_path, monkeypatch):
    peak, estimate = _peak_and_estimate(
        loom_cache,
        tmp_path,
        monkeypatch,
        "+model=gpt2_small",
        "precision=bf16",
        "data.seq_len=1024",
        "trainer.global_batch_size=8",
        "trainer.micro_batch_size=8",
    )
    assert abs(estimate["total_gib"] - peak) <= 0.10 * peak, (estimate, peak)


def test_chunked_loss_lowers_the_peak_by_the_logits(loom_cache, tmp_path, monkeypatch):
    """GPT-2's 50k vocabulary over 8 x 1024 tokens: whole fp32 logits and their gradient
    are about 3 GiB; scored 1,024 tokens at a time the peak drops by most of that."""
    common = (
        "+model=gpt2_small",
        "precision=bf16",
        "data.seq_len=1024",
        "trainer.global_batch_size=8",
        "trainer.micro_batch_size=8",
    )
    whole, estimate = _peak_and_estimate(loom_cache, tmp_path / "a", monkeypatch, *common)
    chunked, _ = _peak_and_estimate(
        loom_cache, tmp_path / "b", monkeypatch, *common, "trainer.loss_chunk_tokens=1024"
    )
    assert whole - chunked >= 0.5 * estimate["logits_gib"], (whole, chunked, estimate)
