"""ReplicaSync overlaps its gradient all-reduce with the last backward of a step.

* 2 gloo processes, data parallel (ZeRO-0 and ZeRO-1 ownership), 1 and 3 micro-batches,
  four buckets: the averaged gradients equal, to the bit, those of the reduction after
  backward and the mean of both ranks' gradients. The recorded order of events shows each
  bucket's all-reduce starting during the last backward, as soon as its gradients are
  final and before the first layer's are; in the plan's order, the same on both ranks;
  never during an earlier micro-batch's backward.
* 4 gloo processes, tp 2 x dp 2 and pp 2 x dp 2, ZeRO-0 and ZeRO-1, a debug GPT through
  its engine (forward_backward, then step): the gradients the step clips and the
  parameters after it are bit-equal with and without the overlap, and backward (the
  pipeline schedule's) started every bucket but a tied weight's.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tests.conftest import free_port, spawn_ranks

MICRO_BATCHES = (1, 3)


def _mlp() -> nn.Sequential:
    # With BUCKET_NUMEL = 300 the plan is four buckets: [5.*] (68 elements), [4.*] (272),
    # [2.*] (272), [0.*] (144), in the order backward finishes them.
    return nn.Sequential(
        nn.Linear(8, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 16),
        nn.Linear(16, 4),
    )


@contextlib.contextmanager
def _recording_all_reduce(events: list[str]):
    """Note every all_reduce (ReplicaSync's, by its element count) in `events`."""
    original = dist.all_reduce

    def all_reduce(tensor, *args, **kwargs):
        events.append(f"all_reduce {tensor.numel()}")
        return original(tensor, *args, **kwargs)

    dist.all_reduce = all_reduce
    try:
        yield
    finally:
        dist.all_reduce = original


def _dp_run(rank: int, *, zero1: bool, micro: int, overlap: bool) -> dict:
    from parallel.data_parallel import ReplicaSync

    torch.manual_seed(0)
    model = _mlp()
    sync = ReplicaSync(list(model.parameters()), group=dist.group.WORLD, reduce=True, zero1=zero1)
    events: list[str] = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda _, name=name: events.append(f"grad {name}"))
    torch.manual_seed(1 + rank)  # each rank its own data
    with _recording_all_reduce(events):
        for i in range(micro):
            events.append(f"backward {i}")
            if overlap and i == micro - 1:
                sync.begin_overlap()
            model(torch.randn(5, 8)).square().sum().backward()
        events.append("after backward")
        started, planned = sync.buckets
        local = [p.grad.clone() for p in model.parameters()]
        sync.reduce_gradients()
    return {
        "grads": [p.grad.clone() for p in model.parameters()],
        "local": local,
        "events": events,
        "started": started,
        "planned": planned,
    }


def _mean_over_ranks(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for g in grads:
        both = [torch.empty_like(g) for _ in range(2)]
        dist.all_gather(both, g)
        out.append((both[0] + both[1]) / 2)
    return out


def _dp_worker(rank: int, port: int, out_dir: str) -> None:
    import parallel.data_parallel as dp

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dp.BUCKET_NUMEL = 300
    results = {}
    for zero1 in (False, True):
        for micro in MICRO_BATCHES:
            after = _dp_run(rank, zero1=zero1, micro=micro, overlap=False)
            during = _dp_run(rank, zero1=zero1, micro=micro, overlap=True)
            mean = _mean_over_ranks(after["local"])
            results[f"zero1={zero1}/micro={micro}"] = {
                "bit_equal": all(
                    torch.equal(a, b) for a, b in zip(after["grads"], during["grads"], strict=True)
                ),
                "mean_equal": all(
                    torch.equal(a, m) for a, m in zip(after["grads"], mean, strict=True)
                ),
                **{f"{k}_after": after[k] for k in ("events", "started", "planned")},
                **{f"{k}_during": during[k] for k in ("events", "started", "planned")},
            }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def dp_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("overlap_dp")
    spawn_ranks(_dp_worker, 2, free_port(), str(out))
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]


CASES = [(zero1, micro) for zero1 in (False, True) for micro in MICRO_BATCHES]


@pytest.mark.parametrize(("zero1", "micro"), CASES)
def test_overlapped_gradients_equal_the_reduction_after_backward(dp_results, zero1, micro):
    for rank, results in enumerate(dp_results):
        r = results[f"zero1={zero1}/micro={micro}"]
        assert r["bit_equal"], rank
        assert r["mean_equal"], rank


@pytest.mark.parametrize(("zero1", "micro"), CASES)
def test_buckets_start_during_the_last_backward_in_plan_order(dp_results, zero1, micro):
    plan = ["all_reduce 68", "all_reduce 272", "all_reduce 272", "all_reduce 144"]
    for results in dp_results:
        r = results[f"zero1={zero1}/micro={micro}"]
        events = r["events_during"]
        last = events.index(f"backward {micro - 1}")
        launches = [i for i, e in enumerate(events) if e.startswith("all_reduce")]
        assert [events[i] for i in launches] == plan
        # Nothing during earlier micro-batches; everything before backward returned.
        assert launches[0] > last and launches[-1] < events.index("after backward")
        assert (r["started_during"], r["planned_during"]) == (4, 4)
        events, launches = events[last:], [i - last for i in launches]
        # Each bucket starts as soon as its own gradients are final, before backward has
        # reached the first layer: the last layer's bucket right after its two gradients.
        assert launches[0] == max(events.index("grad 5.weight"), events.index("grad 5.bias")) + 1
        assert launches[0] < events.index("grad 0.weight")
        assert launches[2] < events.index("grad 0.bias")
        # The reduction after backward: the same buckets, after backward.
        after = r["events_after"]
        launches_after = [e for e in after[after.index("after backward") :] if "all_reduce" in e]
        assert launches_after == plan and r["started_after"] == 0
    assert (
        dp_results[0][f"zero1={zero1}/micro={micro}"]["events_during"]
        == (dp_results[1][f"zero1={zero1}/micro={micro}"]["events_during"])
    )


# -- tensor x data parallel through the engine ---------------------------------------------

VOCAB, B, T = 96, 2, 32


class _NoScaling:
    enabled = False

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss

    def unscale(self, params) -> None:
        return None

    def update(self, found_inf) -> None:
        pass


def _engine_run(world, *, zero: int, overlap: bool, pp: int = 1) -> dict:
    from models import build_model
    from models.config import ModelConfig
    from parallel.config import ParallelConfig
    from parallel.data_parallel import local
    from parallel.engine import TrainingSpec
    from parallel.parallelize import build_engine
    from trainer.loss import summed_losses

    model_cfg = ModelConfig(n_layer=2, d_model=64, n_head=4, max_seq_len=T)
    torch.manual_seed(0)
    model = build_model(model_cfg, vocab_size=VOCAB)
    spec = TrainingSpec(
        make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1),
        loss_fn=summed_losses,
        scaler=_NoScaling(),
        forward_context=contextlib.nullcontext,
        precision="fp32",
        grad_clip=1.0,
        global_batch_size=2 * B * 2,
        micro_batch_size=B,
    )
    layout = ParallelConfig(pp=2, zero=zero) if pp > 1 else ParallelConfig(tp=2, zero=zero)
    engine = build_engine(model, layout, world=world, model_cfg=model_cfg, spec=spec)
    if not overlap:  # the reduction after backward
        engine.replicas.begin_overlap = lambda **_: None
    clipped = {}
    clip = engine._clip

    def capture_then_clip(max_norm):
        for name, p in engine.module.named_parameters():
            clipped[name] = local(p.grad).clone()
        return clip(max_norm)

    engine._clip = capture_then_clip
    gen = torch.Generator().manual_seed(1 + world.dp_rank)  # tp ranks share their data
    micro = []
    for _ in range(2):
        ids = torch.randint(VOCAB, (B, T + 1), generator=gen)
        micro.append(({"input_ids": ids[:, :-1]}, {"labels": ids[:, 1:]}))
    if pp > 1:  # a pipeline takes the rank's whole batch and splits it into 2 microbatches
        micro = [
            tuple({k: torch.cat([m[i][k] for m in micro]) for k in micro[0][i]} for i in (0, 1))
        ]
    engine.forward_backward(micro, {"labels": 1.0})
    started, planned = engine.replicas.buckets
    engine.step()
    return {
        "grads": clipped,
        "params": {n: local(p.detach()).clone() for n, p in engine.module.named_parameters()},
        "started": started,
        "planned": planned,
    }


def _engine_worker(rank: int, port: int, out_dir: str, pp: int) -> None:
    """tp 2 x dp 2 (pp=1) or pp 2 x dp 2 on 4 ranks: each ZeRO level stepped with and
    without the overlap."""
    import parallel.data_parallel as dp
    from parallel.config import ParallelConfig
    from parallel.dist import init_world

    torch.set_num_threads(1)
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE="4",
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    layout = ParallelConfig(pp=2) if pp > 1 else ParallelConfig(tp=2)
    world = init_world(layout, device_preference="cpu")
    dp.BUCKET_NUMEL = 8192  # several buckets for the debug model
    results = {}
    for zero in (0, 1):
        after = _engine_run(world, zero=zero, overlap=False, pp=pp)
        during = _engine_run(world, zero=zero, overlap=True, pp=pp)
        results[f"zero={zero}"] = {
            "grads_equal": sorted(after["grads"]) == sorted(during["grads"])
            and all(torch.equal(after["grads"][n], during["grads"][n]) for n in after["grads"]),
            "params_equal": all(
                torch.equal(after["params"][n], during["params"][n]) for n in after["params"]
            ),
            "started": [after["started"], during["started"]],
            "planned": during["planned"],
        }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _engine_ranks(out: Path, *, pp: int) -> list[dict]:
    spawn_ranks(_engine_worker, 4, free_port(), str(out), pp)
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(4)]


@pytest.fixture(scope="module", params=[1, 2], ids=["tp2xdp2", "pp2xdp2"])
def engine_results(request, tmp_path_factory) -> tuple[int, list[dict]]:
    pp = request.param
    return pp, _engine_ranks(tmp_path_factory.mktemp(f"overlap_pp{pp}"), pp=pp)


@pytest.mark.parametrize("zero", [0, 1])
def test_engine_steps_bit_equal_with_overlap(engine_results, zero):
    pp, ranks = engine_results
    # Under a pipeline one bucket waits for the step: the tied embedding's copy (first
    # stage) or the output layer's (last stage), whose peer's gradient comes after the
    # schedule. Every other bucket starts during backward (the schedule's).
    held = 1 if pp > 1 else 0
    for rank, results in enumerate(ranks):
        r = results[f"zero={zero}"]
        assert r["grads_equal"], rank
        assert r["params_equal"], rank
        assert r["started"] == [0, r["planned"] - held] and r["planned"] >= 3, (rank, r)
