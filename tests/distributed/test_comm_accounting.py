"""Bytes each mesh axis carries in a training step, measured on gloo processes, equal the
formula of parallel/comm_model.py for the same layout (within 5%), for every kind of
collective Loom issues: DDP and ZeRO-1 (all-reduce, broadcast), FSDP2 at ZeRO-2/3
(all-gather, reduce-scatter), tensor parallelism with and without sequence parallelism
(fp32 and bf16), pipelines (send/recv, the tied embedding's gradient), and expert
parallelism (all-to-all: padded to capacity, where the formula is exact, and sorted with no
token dropped, where its bound is).

The two-rank layouts run in one pair of spawned workers (start-up dominates the cost), the
four-rank ones (data parallelism beside TP or PP) in one set of four: each builds
the engine of its layout as the trainer does (parallel.parallelize.build_engine), runs
three steps the way Trainer.train_step does (token-count sum, forward/backward, step,
loss sum) and measures the third with the trainer's own CommAccounting, which writes
comm.json. One more test runs launch/train.py under torchrun, so the trainer's wiring is
covered too.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path

import pytest
import torch

from tests.conftest import free_port, spawn_ranks

WORLD = 2
VOCAB = 96
TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.max_seq_len=32",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.max_steps=3",
    "optim=lamb",
]
CASES: dict[str, list[str]] = {
    "ddp": [],
    "zero1": ["parallel.zero=1"],
    "zero2": ["parallel.zero=2"],
    "zero3": ["parallel.zero=3"],
    "tp": ["parallel.tp=2"],
    # d_model 128: each norm gradient's all-reduce (4 per step under sp) is data, not control
    "tp_sp": ["parallel.tp=2", "parallel.sp=true", "model.d_model=128"],
    "tp_bf16": ["parallel.tp=2", "precision=bf16"],
    "pp": ["parallel.pp=2"],
    "pp_interleaved": [
        "parallel.pp=2",
        "model.n_layer=4",
        "parallel.pp_schedule=interleaved_1f1b",
        "parallel.virtual_stages=2",
    ],
    "ep": ["+model=gpt_moe_debug", "parallel.ep=2", "model.moe.capacity_factor=null"],
    "ep_padded": ["+model=gpt_moe_debug", "parallel.ep=2"],
}
# The axis and kinds each layout must show: the formula cannot pass by being empty.
EXPECTED_KEYS = {
    "ddp": {("all_reduce", "dp_replicate")},
    "zero1": {("all_reduce", "dp_replicate"), ("broadcast", "dp_replicate")},
    "zero2": {("all_gather", "dp_shard"), ("reduce_scatter", "dp_shard")},
    "zero3": {("all_gather", "dp_shard"), ("reduce_scatter", "dp_shard")},
    "tp": {("all_reduce", "tp")},
    "tp_sp": {("all_gather", "tp"), ("reduce_scatter", "tp"), ("all_reduce", "tp")},
    "tp_bf16": {("all_reduce", "tp")},
    "pp": {("send", "pp"), ("recv", "pp")},
    "pp_interleaved": {("send", "pp"), ("recv", "pp")},
    "ep": {("all_to_all", "ep"), ("all_reduce", "ep")},
    "ep_padded": {("all_to_all", "ep"), ("all_reduce", "ep")},
}
# Four ranks: data parallelism beside TP or PP, where Loom's own bucketed gradient
# averaging (ReplicaSync, overlapped with the last backward) carries the dp traffic.
CASES_4 = {
    "tp_dp": ["parallel.tp=2"],
    "tp_dp_zero1": ["parallel.tp=2", "parallel.zero=1"],
    "pp_dp": ["parallel.pp=2"],
}
EXPECTED_KEYS |= {
    "tp_dp": {("all_reduce", "tp"), ("all_reduce", "dp_replicate")},
    "tp_dp_zero1": {("all_reduce", "tp"), ("all_reduce", "dp_replicate")},
    "pp_dp": {("send", "pp"), ("recv", "pp"), ("all_reduce", "dp_replicate")},
}


def _batches(rows: int, calls: int, seq: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(calls):
        ids = torch.randint(0, VOCAB, (rows, seq), generator=g)
        out.append(({"input_ids": ids}, {"labels": torch.roll(ids, -1, 1)}))
    return out


def _run_case(name: str, overrides: list[str], out: Path) -> dict:
    """Three steps of the layout; the third counted by the trainer's CommAccounting."""
    from models import build_model
    from parallel import dist as pdist
    from parallel.dist import init_world
    from parallel.engine import TrainingSpec
    from parallel.parallelize import build_engine
    from tests.unit.test_config import compose_job
    from trainer.comm_report import COUNTED_STEP, CommAccounting
    from trainer.loss import summed_losses
    from trainer.optim import build_optimizer
    from trainer.precision import LossScaler, autocast

    job = compose_job(*TINY, *overrides)
    world = init_world(job.parallel, device_preference="cpu")
    torch.manual_seed(0)
    t, seq = job.trainer, job.model.max_seq_len
    spec = TrainingSpec(
        make_optimizer=lambda m: build_optimizer(m, job.optim),
        loss_fn=summed_losses,
        scaler=LossScaler(job.precision),
        forward_context=lambda: autocast(job.precision, world.device),
        precision=job.precision.dtype,
        grad_clip=job.optim.grad_clip,
        global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size,
    )
    model = build_model(job.model, vocab_size=VOCAB)
    engine = build_engine(model, job.parallel, world=world, model_cfg=job.model, spec=spec)
    rows = job.parallel.rows_per_call(
        global_batch_size=t.global_batch_size,
        micro_batch_size=t.micro_batch_size,
        dp_size=world.dp_size,
    )
    calls = t.global_batch_size // (rows * world.dp_size)
    accounting = CommAccounting(
        job, world, vocab_size=VOCAB, seq_len=seq, start_step=0, run_dir=out / name
    )
    assert accounting.step == COUNTED_STEP
    report = None
    for step in range(1, t.max_steps + 1):
        micro = _batches(rows, calls, seq, seed=100 * step + world.dp_rank)
        with accounting.count(step):  # as Trainer.train_step: sums, step, sums
            local = torch.tensor([float(rows * seq * calls)], dtype=torch.float64)
            count = pdist.dp_sum(local, world)
            losses = engine.forward_backward(micro, {"labels": world.dp_size / float(count)})
            engine.step()
            pdist.dp_sum(torch.stack([losses["labels"]]), world)
        report = accounting.report(step) or report
    return report


def _worker(rank: int, port: int, out_dir: str, world: int, names: list[str]) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        TORCHELASTIC_RUN_ID="comm-accounting",
    )
    results = {}
    for name in names:
        overrides = {**CASES, **CASES_4}[name]
        try:
            results[name] = _run_case(name, overrides, Path(out_dir))
        except Exception:
            results[name] = {"error": traceback.format_exc()}
            break  # the ranks may now disagree on which collective comes next
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    if dist.is_initialized():
        dist.destroy_process_group()


def _measure(out: Path, world: int, cases: dict) -> dict[str, dict]:
    spawn_ranks(_worker, world, free_port(), str(out), world, list(cases))
    ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    for name in cases:
        written = out / name / "comm.json"
        if "error" not in ranks[0].get(name, {"error": "not run"}):
            assert json.loads(written.read_text())["measured"] == ranks[0][name]["measured"]
    return ranks[0]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, dict]:
    return _measure(tmp_path_factory.mktemp("comm"), WORLD, CASES)


@pytest.fixture(scope="module")
def reports_4(tmp_path_factory) -> dict[str, dict]:
    return _measure(tmp_path_factory.mktemp("comm4"), 4, CASES_4)


def data_bytes(volumes: dict) -> dict[tuple[str, str], float]:
    """{(kind, axis): bytes} of a comm.json volume, control left out."""
    return {
        (kind, axis): entry["bytes"]
        for kind, axes in volumes.items()
        if kind != "control"
        for axis, entry in axes.items()
    }


@pytest.mark.parametrize("name", list(CASES))
def test_measured_bytes_per_axis_match_the_formula(reports, name):
    check_against_formula(reports, name)


@pytest.mark.parametrize("name", list(CASES_4))
def test_data_parallel_beside_tp_or_pp_matches_the_formula(reports_4, name):
    check_against_formula(reports_4, name)


def check_against_formula(reports: dict, name: str) -> None:
    report = reports.get(name, {"error": "not run (an earlier case failed)"})
    assert "error" not in report, report["error"]
    measured, formula = data_bytes(report["measured"]), data_bytes(report["formula"])
    assert EXPECTED_KEYS[name] <= set(measured), (name, sorted(measured))
    assert set(measured) == set(formula), (name, sorted(measured), sorted(formula))
    for key, want in formula.items():
        assert measured[key] == pytest.approx(want, rel=0.05), (name, key, measured, formula)
    # The step's scalars (loss and token sums, norms, flags) stay apart and small.
    control = sum(e["bytes"] for e in report["measured"].get("control", {}).values())
    assert control < 0.01 * sum(measured.values())


def test_the_comparison_tells_layouts_apart(reports):
    """ZeRO-3 re-gathers every parameter in backward: twice ZeRO-2's all-gather bytes, so a
    formula of the wrong stage would fail the 5% check."""
    two, three = reports["zero2"], reports["zero3"]
    if "error" in two or "error" in three:
        pytest.skip("a layout failed; reported by its own test")
    key = ("all_gather", "dp_shard")
    assert data_bytes(three["measured"])[key] == pytest.approx(2 * data_bytes(two["measured"])[key])


def test_training_run_logs_and_writes_its_communication(train_cli, tmp_path):
    """launch/train.py under torchrun counts its third step once (pipeline shape inference
    and schedule building stay in the first), logs it and writes comm.json."""
    out = tmp_path / "run"
    proc = train_cli(
        "+model=gpt_debug",
        "model.n_layer=2",
        "model.d_model=64",
        "model.n_head=2",
        "model.max_seq_len=64",
        "trainer.global_batch_size=8",
        "trainer.micro_batch_size=2",
        "trainer.max_steps=4",
        "trainer.log_every=1",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "parallel.pp=2",
        f"trainer.out_dir={out}",
        nproc=2,
    )
    report = json.loads((out / "comm.json").read_text())
    assert report["step"] == 3 and report["world_size"] == 2 and len(report["ranks"]) == 2
    measured, formula = data_bytes(report["measured"]), data_bytes(report["formula"])
    assert set(measured) == set(formula) == {("send", "pp"), ("recv", "pp")}
    for key, want in formula.items():
        assert measured[key] == pytest.approx(want, rel=0.05), (key, measured, formula)
    assert proc.stdout.count("communication per rank in step 3") == 1
    assert "pp send:" in proc.stdout and "(formula " in proc.stdout
