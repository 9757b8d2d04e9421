"""The training CLI on one CUDA device, family by family, with what a GPU changes: resume
that matches an uninterrupted run to the bit (deterministic kernels), activation
checkpointing, torch.compile, and steps that never wait for the device. Run on a machine
with a CUDA device (`pytest -m gpu`); skipped elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.config import ModelConfig
from parallel.activation import apply_activation_checkpointing
from parallel.parallelize import repeated_blocks
from tests.conftest import read_metrics
from tests.e2e.test_compile import check_compiled_matches_eager
from tests.e2e.test_families import SHORT
from tests.e2e.test_train_cli import check_resume_is_bit_exact
from tests.gpu.test_cuda import steps_under_sync_check

pytestmark = pytest.mark.gpu

CUDA = ["trainer.device=cuda", "trainer.tensorboard=false"]
# The families besides GPT (which tests/gpu/test_cuda.py runs).
FAMILIES = ["bert_debug", "electra_debug", "t5_debug", "bart_debug", "xlnet_debug", "glm_debug"]


@pytest.mark.parametrize("model", [*FAMILIES, "gpt_rotary_debug"])
def test_every_family_trains_in_bf16_on_cuda(train_cli, tmp_path, model):
    train_cli(f"+model={model}", *CUDA, "precision=bf16", *SHORT, f"trainer.out_dir={tmp_path}")
    records = read_metrics(tmp_path)
    losses = [r["loss"] for r in records]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5, losses
    assert records[-1]["mfu"] is not None and 0 < records[-1]["mfu"] < 1


# MoE: the expert dispatch (index_add_) and the router's jitter draws on the device.
@pytest.mark.parametrize("model", [[], ["+model=gpt_moe_debug"]], ids=["dense", "moe"])
def test_deterministic_resume_on_cuda_is_bit_exact(train_cli, tmp_path, model):
    check_resume_is_bit_exact(
        train_cli, tmp_path, *model, *CUDA, "precision=bf16", "trainer.deterministic=true"
    )


def test_deterministic_electra_runs_repeat_to_the_bit(train_cli, tmp_path):
    """ELECTRA samples its generator with integer cumulative sums (a floating one has no
    deterministic CUDA kernel): two runs agree exactly."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        train_cli(
            "+model=electra_debug",
            *CUDA,
            "precision=bf16",
            "trainer.deterministic=true",
            "trainer.max_steps=10",
            "trainer.log_every=1",
            "trainer.eval_every=0",
            f"trainer.out_dir={run}",
        )
    a, b = ([(r["loss"], r["grad_norm"]) for r in read_metrics(run)] for run in runs)
    assert len(a) == 10 and a == b


def _bf16_step(mode: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, d_model=256, n_head=4, max_seq_len=256, dropout=0.1)
    model = build_model(cfg, vocab_size=512).cuda()
    apply_activation_checkpointing(repeated_blocks(model), mode)
    ids = torch.randint(0, 512, (4, 256), generator=torch.Generator().manual_seed(1)).cuda()
    torch.manual_seed(2)  # the same dropout draws in every mode
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(ids)
    loss = F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_the_bf16_step_on_cuda(mode):
    """Flash attention with dropout recomputed in backward draws the same mask (the RNG
    state is restored): the loss is the same to the bit, each gradient within 1e-3 of its
    norm (the backward's accumulation order may differ)."""
    ref_loss, ref = _bf16_step("none")
    loss, grads = _bf16_step(mode)
    assert torch.equal(loss, ref_loss)
    for name, g in grads.items():
        err = (g - ref[name]).norm() / ref[name].norm().clamp(min=1e-12)
        assert err < 1e-3, (name, float(err))


def test_compiled_blocks_train_like_eager_on_cuda(train_cli, tmp_path):
    """Inductor's Triton kernels against eager in fp32: losses within 1e-3 over 8 steps,
    and no recompilation but evaluation's."""
    tiny = [
        *CUDA,
        "model.n_layer=2",
        "model.d_model=128",
        "trainer.max_steps=8",
        "trainer.log_every=1",
        "trainer.eval_every=4",
    ]
    check_compiled_matches_eager(train_cli, tmp_path, *tiny, tolerance=1e-3)


@pytest.mark.parametrize("model", [*FAMILIES, "gpt_moe_debug"])
def test_other_families_steps_never_wait_for_the_gpu(loom_cache, tmp_path, monkeypatch, model):
    """As tests/gpu/test_cuda.py's GPT check, for the other families and a Switch MoE (its
    layers padded to capacity, the default)."""
    from parallel.dist import init_world
    from trainer.config import compose_job
    from trainer.loop import Trainer

    monkeypatch.setenv("LOOM_CACHE", str(loom_cache))
    job = compose_job([f"+model={model}", *CUDA, "precision=bf16", f"trainer.out_dir={tmp_path}"])
    trainer = Trainer(job, init_world(job.parallel, device_preference="cuda"))
    steps_under_sync_check(trainer, warmup=2, steps=2)
