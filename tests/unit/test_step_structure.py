"""The training step leaves its results on the device: losses and the gradient norm come
back as tensors, read only when a step is logged, and the engine's forward, backward and
optimizer step call no operation that makes the host wait for a GPU (on CUDA, tests/gpu
proves no call in a step synchronises)."""

from __future__ import annotations

import gc
import traceback
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from parallel.dist import init_world
from trainer.config import compose_job
from trainer.loop import Trainer, host_values


def test_a_step_returns_tensors_that_logging_reads(loom_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("LOOM_CACHE", str(loom_cache))
    job = compose_job(
        [
            "+model=bert_debug",
            "model.n_layer=2",
            "trainer.tensorboard=false",
            f"trainer.out_dir={tmp_path}",
        ]
    )
    trainer = Trainer(job, init_world(job.parallel, device_preference="cpu"))
    record = trainer.train_step(0)
    tasks = ("loss", "loss_lm", "loss_nsp")
    for key in (*tasks, "grad_norm"):
        assert isinstance(record[key], torch.Tensor) and record[key].dim() == 0, key
    host = host_values(record)
    assert host["loss"] == host["loss_lm"] + host["loss_nsp"]
    assert all(isinstance(host[k], float) for k in (*tasks, "grad_norm"))


@pytest.mark.parametrize(
    "overrides",
    [["precision=fp16", "optim=lamb"], ["+model=gpt_moe_debug", "precision=bf16"]],
    ids=["fp16-lamb", "moe-bf16"],
)
def test_a_dropped_trainer_frees_its_model_at_once(loom_cache, tmp_path, monkeypatch, overrides):
    """No reference cycle holds a trainer: dropping it frees its weights and optimizer state
    without the garbage collector, so the next job in a process (a micro-batch sweep, the
    next GPU test) measures its own memory."""
    monkeypatch.setenv("LOOM_CACHE", str(loom_cache))
    job = compose_job([*overrides, "trainer.tensorboard=false", f"trainer.out_dir={tmp_path}"])
    gc.disable()
    try:
        trainer = Trainer(job, init_world(job.parallel, device_preference="cpu"))
        trainer.train_step(0)
        held = [weakref.ref(o) for o in (trainer, trainer.engine.module, trainer.engine.optimizer)]
        del trainer
        assert [ref() is None for ref in held] == [True, True, True]
    finally:
        gc.enable()


aten = torch.ops.aten
# Operations that read a device tensor on the host, or whose output size depends on the
# values (so the host must wait for them): each synchronises with a GPU. Tensors made from
# host values (lift_fresh) inside the engine are copies to the device.
_SYNCING = {
    aten._local_scalar_dense.default,  # .item(), float(t), bool(t), if t: ...
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
    aten.lift_fresh.default,  # torch.tensor(host values, device=...)
}
_MASK_INDEXED = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default}


class SyncCalls(TorchDispatchMode):
    """Records the operations of _SYNCING, and indexing by boolean masks (nonzero inside).

    Optimizers keep their step counters on the host (torch's unless fused or capturable,
    and Loom's LAMB), so reading those, and what torch.optim does with them, never waits:
    `host_counters` holds the counters' data pointers."""

    def __init__(self, host_counters: set[int]):
        super().__init__()
        self.host_counters = host_counters
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func in _MASK_INDEXED and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )
        if (func in _SYNCING or masked) and not self._host_side(func, args):
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))

    def _host_side(self, func, args) -> bool:
        if func is aten._local_scalar_dense.default:
            return args[0].data_ptr() in self.host_counters
        if func is aten.lift_fresh.default:
            return any("torch/optim/" in f.filename for f in traceback.extract_stack())
        return False


def host_counters(optimizer: torch.optim.Optimizer) -> set[int]:
    return {
        state["step"].data_ptr()
        for state in optimizer.state.values()
        if isinstance(state.get("step"), torch.Tensor)
    }


# A selection whose size depends on the data, read on the host by design: which tokens go
# to which expert when an MoE layer sends only the kept choices (dropless or unpadded).
# Nothing else in a step may wait (a padded MoE layer fills buffers of its capacity, and
# ELECTRA's generator head runs on the objective's fixed slots, not a selection).
_SORTED_MOE = "gpt_moe_debug model.moe.pad_to_capacity=false"
_ALLOWED = {_SORTED_MOE: {"aten.nonzero.default"}}


@pytest.mark.parametrize(
    "run",
    [
        "gpt_debug",
        # LAMB's trust ratios, bf16 autocast and the loss scored in slices inside the model
        "gpt_debug optim=lamb precision=bf16 trainer.loss_chunk_tokens=64",
        # fp16 loss scaling: the overflow verdict stays on the device, the optimizer skips
        # there (torch's fused AdamW, Loom's LAMB), the scale is updated there
        "gpt_debug precision=fp16",
        "gpt_debug optim=lamb precision=fp16",
        "gpt_moe_debug precision=fp16",
        "bert_debug",
        "roberta_debug",
        "electra_debug",
        "t5_debug",
        "bart_debug",
        "xlnet_debug",
        "glm_debug",
        "gpt_moe_debug",
        _SORTED_MOE,
    ],
)
def test_the_engine_step_never_reads_the_device(loom_cache, tmp_path, monkeypatch, run):
    model, *overrides = run.split()
    monkeypatch.setenv("LOOM_CACHE", str(loom_cache))
    job = compose_job(
        [f"+model={model}", *overrides, "trainer.tensorboard=false", f"trainer.out_dir={tmp_path}"]
    )
    trainer = Trainer(job, init_world(job.parallel, device_preference="cpu"))
    host_values(trainer.train_step(0))  # the optimizer's state exists from the first step
    engine = trainer.engine
    seen = SyncCalls(host_counters(engine.optimizer))
    for name in ("forward_backward", "step"):
        method = getattr(engine, name)

        def watched(*args, method=method, **kwargs):
            with seen:
                return method(*args, **kwargs)

        monkeypatch.setattr(engine, name, watched)
    for step in range(1, 3):
        host_values(trainer.train_step(step))
    assert set(seen.calls) <= _ALLOWED.get(run, set()), sorted(set(seen.calls))
