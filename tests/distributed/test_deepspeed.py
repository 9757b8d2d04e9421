"""parallel.engine=deepspeed: ZeRO 1/2/3 (+ CPU offload) on 2 gloo processes train a tiny
GPT with Loom's LAMB and loss normalisation exactly like one process; checkpoints move
between DeepSpeed layouts and the native engine; unsupported layouts are refused.

One module-scoped run of two spawned ranks trains every scenario and hands the results
back; the single-process references run here, without torch.distributed.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from models import build_model
from models.config import ModelConfig
from parallel.config import ParallelConfig, check_layout
from parallel.deepspeed_engine import bucket_size, build_ds_config
from parallel.dist import World
from parallel.state import load_model_state, load_optimizer_state, model_state, optimizer_state
from tests.conftest import free_port
from trainer.config import OptimConfig
from trainer.loss import summed_losses, target_counts
from trainer.optim import build_optimizer

needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed"
)

CFG = ModelConfig(n_layer=2, d_model=64, n_head=2, max_seq_len=32, dropout=0.0)
VOCAB, SEQ, GLOBAL, MICRO, DP, STEPS, SEED = 96, 32, 8, 2, 2, 3, 1234
OPTIM = OptimConfig(name="lamb", lr=2e-2, eps=1e-6, weight_decay=0.01, grad_clip=1.0)
# Exact runs: (name, zero, offload). Each rank runs 2 micro-batches per step (accumulation).
EXACT = [("zero1", 1, "none"), ("zero2", 2, "none"), ("zero3", 3, "none"), ("zero2_cpu", 2, "cpu")]
# Every param of the tiny model is under DeepSpeed's default persistence threshold (1e5
# elements), so ZeRO-3 would keep them all gathered; 0 makes it partition them.
PARTITION_ALL = {"stage3_param_persistence_threshold": 0}
SINGLE = World(rank=0, world_size=1, local_rank=0, dp_rank=0, dp_size=1, device=torch.device("cpu"))


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(99)
    return [torch.randint(0, VOCAB, (GLOBAL, SEQ + 1), generator=gen) for _ in range(STEPS)]


def lr_at(step: int) -> float:
    return OPTIM.lr * (step + 1) / STEPS  # changes every step: the schedule must reach DS


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(SEED)
    return build_model(CFG, vocab_size=VOCAB)


def micro_loss(model, rows: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The trainer's normalisation: summed token loss times dp / (global target count)."""
    labels = {"labels": rows[:, 1:]}
    total = summed_losses(model(input_ids=rows[:, :-1]), labels)["labels"]
    return total * weight, total.detach()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run like the ranks do. Kernels split their sums by thread count, and a gradient
    element with heavy cancellation can then differ by 1e-5 relative, which LAMB's
    g / (|g| + eps) at step 1 carries into the weights at the 1e-6 level."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@one_thread()
def eval_loss(model: torch.nn.Module) -> float:
    """Mean token loss of the first batch in eval mode (the trainer evaluates the module)."""
    model.eval()
    with torch.no_grad():
        tokens = batches()[0]
        _, total = micro_loss(model, tokens, 1.0)
    return float(total) / tokens[:, 1:].numel()


def reference(*, stop: int = STEPS, states: tuple[dict, dict] | None = None, start: int = 0):
    """Single process, plain Lamb, torch clipping; optionally resumed from full states."""
    model = fresh_model()
    opt = build_optimizer(model, OPTIM)
    if states is not None:
        load_model_state(model, states[0])
        load_optimizer_state(model, opt, states[1])
    losses, norms = [], []
    for step in range(start, stop):
        tokens = batches()[step]
        count = target_counts({"labels": tokens[:, 1:]})["labels"]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        summed = 0.0
        for rows in tokens.split(MICRO):
            loss, total = micro_loss(model, rows, 1.0 / count)
            loss.backward()
            summed += float(total)
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), OPTIM.grad_clip)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(summed / count)
    return model, opt, losses, norms


# -- the two ranks ----------------------------------------------------------------------


def ds_step(engine, world: World, step: int) -> tuple[float, float, list[bool]]:
    """One optimizer step as the trainer drives it: (logged loss, grad norm, boundaries)."""
    tokens = batches()[step]
    count = target_counts({"labels": tokens[:, 1:]})["labels"]
    for group in engine.param_groups:
        group["lr"] = lr_at(step)
    local = torch.zeros((), dtype=torch.float64)
    boundaries = []
    engine.train()
    for rows in tokens.chunk(world.dp_size)[world.dp_rank].split(MICRO):
        loss, total = micro_loss(engine, rows, world.dp_size / count)
        engine.backward(loss)
        boundaries.append(engine.micro_step())
        local += total.double()
    dist.all_reduce(local)
    return float(local) / count, float(engine.step()), boundaries


def ds_train(world: World, *, zero: int, offload: str, start: int, stop: int, **kw) -> dict:
    from parallel.deepspeed_engine import initialize_engine

    model = fresh_model()
    config = build_ds_config(
        zero=zero,
        offload=offload,
        nvme_path=None,
        global_batch_size=GLOBAL,
        micro_batch_size=MICRO,
        dp_size=world.dp_size,
        grad_clip=OPTIM.grad_clip,
        num_params=sum(p.numel() for p in model.parameters()),
    )
    config["zero_optimization"].update(kw.get("zero_extra", {}))
    engine = initialize_engine(
        model, build_optimizer(model, OPTIM), config, world=world, exact_lamb=kw.get("exact", True)
    )
    if kw.get("step_first"):
        ds_step(engine, world, 0)  # ZeRO-3 keeps persistent params gathered from now on
    if "states" in kw:
        engine.load_full_states(*kw["states"])
    steps = [ds_step(engine, world, step) for step in range(start, stop)]
    out = {
        "eval_loss": eval_loss(engine.module),
        "losses": [loss for loss, _, _ in steps],
        "norms": [norm for _, norm, _ in steps],
        "boundaries": [b for _, _, bs in steps for b in bs],
        "skipped": engine.skipped_steps,
        "model": engine.full_model_state(),
        "optim": engine.full_optimizer_state(),
    }
    engine.destroy()
    return out


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(DP))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=DP, timeout=datetime.timedelta(seconds=120)
    )
    world = World(
        rank=rank, world_size=DP, local_rank=rank, dp_rank=rank, dp_size=DP, device=SINGLE.device
    )
    results = {}
    for name, zero, offload in EXACT:
        extra = PARTITION_ALL if zero == 3 else {}
        results[name] = ds_train(
            world, zero=zero, offload=offload, start=0, stop=STEPS, zero_extra=extra
        )
    results["naive_zero2"] = ds_train(
        world, zero=2, offload="none", start=0, stop=STEPS, exact=False
    )
    # Saved under ZeRO-3 after 2 steps, resumed under ZeRO-1 for the last step.
    first = ds_train(world, zero=3, offload="none", start=0, stop=2, zero_extra=PARTITION_ALL)
    results["saved_zero3"] = first
    states = (first["model"], first["optim"])
    results["zero3_to_zero1"] = ds_train(
        world, zero=1, offload="none", start=2, stop=3, states=states
    )
    # Saved by the native engine (one process) after 2 steps, resumed under ZeRO-3 with
    # partitioned params + CPU offload (separate fp32 masters) and with persistent params.
    native = torch.load(Path(out_dir) / "native_step2.pt", weights_only=True)
    states = (native["model"], native["optim"])
    results["native_to_zero3_cpu"] = ds_train(
        world, zero=3, offload="cpu", start=2, stop=3, states=states, zero_extra=PARTITION_ALL
    )
    results["native_to_zero3_persistent"] = ds_train(
        world, zero=3, offload="none", start=2, stop=3, states=states, step_first=True
    )
    if rank == 0:
        torch.save(results, Path(out_dir) / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("deepspeed")
    model, opt, _, _ = reference(stop=2)
    native = {"model": model_state(model), "optim": optimizer_state(model, opt)}
    torch.save(native, out / "native_step2.pt")
    torch.multiprocessing.spawn(worker, args=(free_port(), str(out)), nprocs=DP, join=True)
    results = torch.load(out / "results.pt", weights_only=True)
    model, opt, losses, norms = reference()
    results["reference"] = {
        "eval_loss": one_thread()(eval_loss)(model),
        "losses": losses,
        "norms": norms,
        "model": model_state(model),
        "optim": optimizer_state(model, opt),
    }
    results["native_step2"] = native
    return results


def max_rel_error(got: dict, want: dict) -> tuple[float, str]:
    """Largest relative L2 error of any tensor, and its name."""
    errors = {n: float((got[n] - want[n]).detach().norm() / want[n].norm()) for n in want}
    worst = max(errors, key=errors.get)
    return errors[worst], worst


# -- tests --------------------------------------------------------------------------------


@needs_deepspeed
@pytest.mark.parametrize("name", [name for name, _, _ in EXACT])
def test_exact_lamb_under_zero_equals_single_process(runs, name):
    got, want = runs[name], runs["reference"]
    assert got["skipped"] == 0
    assert got["boundaries"] == [False, True] * STEPS  # steps only at the accumulation end
    for a, b in zip(got["losses"], want["losses"], strict=True):
        assert abs(a - b) < 1e-5, (name, got["losses"], want["losses"])
    for a, b in zip(got["norms"], want["norms"], strict=True):
        assert abs(a - b) <= 1e-5 * b, (name, got["norms"], want["norms"])
    assert want["norms"][0] > OPTIM.grad_clip  # clipping took part
    assert abs(got["eval_loss"] - want["eval_loss"]) < 1e-5
    assert got["model"].keys() == want["model"].keys()
    err, worst = max_rel_error(got["model"], want["model"])
    assert err < 1e-6, (name, worst, err)
    moments = {n: s["exp_avg_sq"] for n, s in got["optim"]["state"].items()}
    err, worst = max_rel_error(
        moments, {n: s["exp_avg_sq"] for n, s in want["optim"]["state"].items()}
    )
    assert err < 1e-5, (name, worst, err)


@needs_deepspeed
def test_lamb_without_layouts_takes_one_trust_ratio_per_partition(runs):
    err, _ = max_rel_error(runs["naive_zero2"]["model"], runs["reference"]["model"])
    assert err > 1e-2


@needs_deepspeed
def test_full_states_use_the_native_format(runs):
    got, want = runs["zero3"]["optim"], runs["reference"]["optim"]
    assert got["state"].keys() == want["state"].keys()
    for name, entry in want["state"].items():
        assert got["state"][name].keys() == entry.keys()
        assert float(got["state"][name]["step"]) == float(entry["step"]) == STEPS
        assert got["state"][name]["exp_avg"].shape == entry["exp_avg"].shape
    assert [g["params"] for g in got["param_groups"]] == [g["params"] for g in want["param_groups"]]
    for a, b in zip(got["param_groups"], want["param_groups"], strict=True):
        assert a.keys() == b.keys() and a["lr"] == b["lr"] == lr_at(STEPS - 1)


@needs_deepspeed
@pytest.mark.parametrize(
    "resumed", ["zero3_to_zero1", "native_to_zero3_cpu", "native_to_zero3_persistent"]
)
def test_checkpoint_resumes_under_another_layout(runs, resumed):
    got, want = runs[resumed], runs["reference"]
    assert abs(got["losses"][0] - want["losses"][2]) < 1e-5
    err, worst = max_rel_error(got["model"], want["model"])
    assert err < 1e-6, (resumed, worst, err)


@needs_deepspeed
def test_deepspeed_checkpoint_loads_in_the_native_engine(runs):
    saved = runs["saved_zero3"]
    model, _, losses, _ = reference(states=(saved["model"], saved["optim"]), start=2)
    assert abs(losses[0] - runs["reference"]["losses"][2]) < 1e-5
    err, worst = max_rel_error(model_state(model), runs["reference"]["model"])
    assert err < 1e-6, (worst, err)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (dict(tp=2), r"parallel\.tp=2 with parallel\.engine=deepspeed"),
        (dict(pp=2), r"parallel\.pp=2 with parallel\.engine=deepspeed"),
        (dict(tp=2, pp=2), r"parallel\.tp=2, parallel\.pp=2"),
        (dict(zero=0), r"parallel\.zero=0"),
    ],
)
def test_model_parallel_layouts_are_refused(fields, match):
    cfg = ParallelConfig(engine="deepspeed", **{"zero": 2, **fields})
    with pytest.raises(ValueError, match=match):
        check_layout(cfg, world_size=4)
    check_layout(ParallelConfig(engine="deepspeed", zero=3), world_size=4)


def test_config_is_generated_from_loom_settings():
    common = dict(
        nvme_path=None, global_batch_size=64, micro_batch_size=4, dp_size=2, grad_clip=1.0
    )
    cfg = build_ds_config(zero=3, offload="cpu", num_params=10_000_000, **common)
    assert cfg["gradient_accumulation_steps"] == 8 and cfg["train_micro_batch_size_per_gpu"] == 4
    zero = cfg["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["reduce_bucket_size"] == zero["stage3_prefetch_bucket_size"] == 2_500_000
    assert not cfg["fp16"]["enabled"] and not cfg["bf16"]["enabled"]
    assert bucket_size(1000) == 1 << 20 and bucket_size(10**12) == 500_000_000
    nvme = build_ds_config(zero=3, offload="nvme", num_params=1, **{**common, "nvme_path": "/nv"})
    assert nvme["zero_optimization"]["offload_optimizer"]["nvme_path"] == "/nv"


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (dict(precision="fp16"), r"precision\.dtype=fp16"),
        (dict(offload="nvme", nvme_path="/nv"), r"offload=nvme needs parallel\.zero=3"),
        (dict(zero=3, offload="nvme"), r"parallel\.nvme_path"),
        (dict(offload="disk"), r"parallel\.offload='disk'"),
        (dict(global_batch_size=6), r"trainer\.global_batch_size=6"),
    ],
)
def test_bad_deepspeed_settings_are_refused(change, match):
    args = dict(zero=2, offload="none", nvme_path=None, global_batch_size=8, micro_batch_size=2)
    with pytest.raises(ValueError, match=match):
        build_ds_config(**{**args, **change}, dp_size=2, grad_clip=1.0, num_params=1000)
