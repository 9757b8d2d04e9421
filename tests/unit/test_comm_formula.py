"""The communication formula (parallel/comm_model.py) on hand-checked small layouts, the
parameter split it reads from a model, the axis naming it shares with the counter, the
counter itself on a one-process gloo group, and the dry run's report of it."""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build_model
from parallel.comm import (
    CommCounter,
    CommTally,
    axis_label,
    axis_size,
    summary_lines,
    wire_bytes,
)
from parallel.comm_model import CommLayout, StageParams, expected_comm, stage_params
from parallel.config import ParallelConfig

F32 = 4


def volumes(layout: CommLayout) -> dict[tuple[str, str], float]:
    return dict(expected_comm(layout).bytes)


def test_ddp_and_zero1_move_every_gradient_and_parameter_once():
    plain = CommLayout(
        dp=4, micro_batches=2, seq_len=8, d_model=16, stages=(StageParams(params=1000),)
    )
    assert volumes(plain) == {("all_reduce", "dp_replicate"): 1000 * F32}
    zero1 = expected_comm(CommLayout(**{**plain.__dict__, "zero": 1}))
    assert zero1.bytes[("broadcast", "dp_replicate")] == 1000 * F32
    assert zero1.calls[("broadcast", "dp_replicate")] == 4  # each owner broadcasts its bucket


def test_fsdp_gathers_per_micro_batch_and_reduce_scatters_once():
    stage = StageParams(params=1000, blocks=2)  # 3 units: two blocks and the root
    common = dict(dp=2, micro_batches=2, seq_len=8, d_model=16, stages=(stage,))
    zero3 = expected_comm(CommLayout(zero=3, **common))
    # 2 micro-batches x (forward + backward) x this rank's shard of 500 elements
    assert zero3.bytes[("all_gather", "dp_shard")] == 2 * 2 * 500 * F32
    assert zero3.calls[("all_gather", "dp_shard")] == 2 * 2 * 3
    assert zero3.bytes[("reduce_scatter", "dp_shard")] == 1000 * F32
    zero2_bf16 = volumes(CommLayout(zero=2, compute_bytes=2, **common))
    assert zero2_bf16[("all_gather", "dp_shard")] == 2 * 500 * 2  # forwards only, in bf16
    assert zero2_bf16[("reduce_scatter", "dp_shard")] == 1000 * F32  # reduced in fp32
    # Under a pipeline, parameters stay gathered across a step's backwards: n + 1 at ZeRO-3.
    piped = volumes(CommLayout(zero=3, pp=2, **{**common, "stages": (stage, stage)}))
    assert piped[("all_gather", "dp_shard")] == (2 + 1) * 500 * F32


GPT_STAGE = StageParams(row_parallel=4, embedding=True, head=True)  # 2 blocks, whole model


def test_tensor_parallel_all_reduces_activations():
    m, t, d, n = 2, 64, 16, 2
    act, tokens = m * t * d, m * t
    layout = CommLayout(
        tp=2, micro_batches=n, micro_batch_size=m, seq_len=t, d_model=d, stages=(GPT_STAGE,)
    )
    # per micro-batch: 4 sub-layer outputs, 4 input gradients, the embedding, the head's
    # input gradient; and the vocabulary-parallel loss's 3 reductions of one value a token
    want = n * 10 * act * F32 + n * 3 * tokens * F32
    assert volumes(layout) == {("all_reduce", "tp"): want}
    assert expected_comm(layout).calls[("all_reduce", "tp")] == n * 13
    bf16 = volumes(CommLayout(**{**layout.__dict__, "compute_bytes": 2}))
    assert bf16[("all_reduce", "tp")] == n * (4 * act * 2 + 6 * act * F32) + n * 3 * tokens * F32


def test_sequence_parallel_turns_reductions_into_gathers_and_scatters():
    m, t, d, n = 2, 64, 128, 2
    act, shard, tokens = m * t * d, m * t * d // 2, m * t
    stage = StageParams(
        row_parallel=4, embedding=True, head=True, sp_norm_tensors=10, sp_positions=1
    )
    got = volumes(
        CommLayout(
            tp=2,
            sp=True,
            micro_batches=n,
            micro_batch_size=m,
            seq_len=t,
            d_model=d,
            stages=(stage,),
        )
    )
    position_grad = t * d // 2  # the (T, D) table output, sliced by sequence
    assert got[("all_gather", "tp")] == n * (8 * shard + 2 * shard + position_grad) * F32
    assert got[("reduce_scatter", "tp")] == n * (8 * act + 2 * act) * F32
    # 10 norm tensors of d elements, all-reduced once per step; the loss as above
    assert got[("all_reduce", "tp")] == 10 * d * F32 + n * 3 * tokens * F32


def test_pipeline_sends_activations_and_gradients_across_each_boundary():
    m, t, d, n, tied = 2, 32, 64, 4, 96 * 64
    act = m * t * d
    first = StageParams(tied=tied, embedding=True)
    last = StageParams(tied=tied, head=True)
    common = dict(pp=2, micro_batches=n, micro_batch_size=m, seq_len=t, d_model=d)
    got = volumes(CommLayout(stages=(first, last), **common))
    # each rank: n activations (or their gradients) out, and the tied embedding's gradient
    assert got == {
        ("send", "pp"): n * act * F32 + tied * F32,
        ("recv", "pp"): n * act * F32 + tied * F32,
    }
    middle = StageParams()
    four = volumes(CommLayout(stages=(first, middle, middle, last), **common))  # 2 per rank
    assert four[("send", "pp")] == (3 * 2 * n * act + 2 * tied) * F32 / 2
    sp = volumes(CommLayout(tp=2, sp=True, stages=(first, last), **common))
    assert sp[("send", "pp")] == n * act // 2 * F32 + tied // 2 * F32


def test_expert_parallel_all_to_all_bound():
    stage = StageParams(params=100, experts=400, moe_layers=1)
    got = expected_comm(
        CommLayout(
            dp=2,
            ep=2,
            micro_batches=2,
            micro_batch_size=2,
            seq_len=32,
            d_model=64,
            num_experts=4,
            stages=(stage,),
        )
    )
    assert got.bytes[("all_to_all", "ep")] == 2 * 4 * (2 * 32 * 64) * F32
    assert got.bytes[("control", "ep")] == 2 * 4 * 8  # token counts: int64 per expert
    # dense gradients over dp, which spans the same ranks as ep here, so named "ep"
    assert got.bytes[("all_reduce", "ep")] == 100 * F32


def test_axes_are_named_by_the_ranks_they_span():
    ddp = {"pp": 1, "dp_replicate": 2, "dp_shard": 1, "ep": 1, "tp": 1}
    assert axis_label("dp", ddp) == axis_label("world", ddp) == "dp_replicate"
    with_ep = {**ddp, "ep": 2}
    assert axis_label("dp", with_ep) == axis_label("world", with_ep) == "dp"
    assert axis_label("edp", with_ep) == "dp_replicate" and axis_label("fsdp", with_ep) == "ep"
    mixed = {**ddp, "pp": 2, "tp": 2}
    assert axis_label("world", mixed) == "world" and axis_size("world", mixed) == 8
    assert axis_size("dp", with_ep) == 4


def test_wire_bytes_and_summary():
    assert wire_bytes("all_reduce", 1000, 4) == 1500  # 2 (n - 1) / n
    assert wire_bytes("all_gather", 1000, 4) == 3000  # the shard to each of n - 1 peers
    assert wire_bytes("reduce_scatter", 1000, 1) == 0
    got, want = CommTally(), CommTally()
    got.add("all_reduce", "tp", 1000, 4096, 2)
    want.add("all_reduce", "tp", 1000, 4000, 2)
    got.add("all_reduce", "tp", 1, 4)  # a scalar: control
    lines = summary_lines(got, reference=want)
    assert lines == [
        "tp all_reduce: 4.00 KiB in 2 calls (formula 3.91 KiB, +2.4%)",
        "tp control: 4 B in 1 calls",
    ]
    assert CommTally.from_json(got.to_json()).bytes == got.bytes


# --- reading a model --------------------------------------------------------------------------

TINY_GPT = ModelConfig(n_layer=2, d_model=64, n_head=4, max_seq_len=32)
BLOCK = 128 + (192 * 64 + 192) + (64 * 64 + 64) + 128 + (256 * 64 + 256) + (64 * 256 + 64)
BLOCK_SPLIT = (192 * 64 + 192) + 64 * 64 + (256 * 64 + 256) + 64 * 256  # biases of rows stay


def meta_gpt():
    with torch.device("meta"):
        return build_model(TINY_GPT, vocab_size=96)


def test_stage_params_of_a_tensor_parallel_gpt():
    (stage,) = stage_params(meta_gpt(), TINY_GPT, ParallelConfig(tp=2, sp=True))
    assert stage.params == 96 * 64 + 32 * 64 + 2 * BLOCK + 128  # the tied head counted once
    assert stage.tp_sharded == 96 * 64 + 2 * BLOCK_SPLIT
    assert (stage.blocks, stage.row_parallel, stage.embedding, stage.head) == (2, 4, True, True)
    assert (stage.sp_norm_tensors, stage.sp_positions, stage.tied) == (10, 1, 0)


def test_stage_params_of_a_pipeline_hold_the_tied_weight_twice():
    first, last = stage_params(meta_gpt(), TINY_GPT, ParallelConfig(pp=2))
    assert first.params == 96 * 64 + 32 * 64 + BLOCK and first.embedding and not first.head
    assert last.params == BLOCK + 128 + 96 * 64 and last.head and not last.embedding
    assert first.tied == last.tied == 96 * 64
    assert (first.blocks, first.row_parallel, last.blocks, last.row_parallel) == (1, 2, 1, 2)


# --- the counter ------------------------------------------------------------------------------


@pytest.fixture()
def one_rank():
    import torch.distributed as dist

    from tests.conftest import free_port

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    yield dist
    dist.destroy_process_group()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the c10d names FSDP2 still uses
def test_counter_sees_c10d_functional_and_ddp_collectives(one_rank):
    import torch.distributed._functional_collectives as funcol

    from parallel.comm import AxisNames

    dist = one_rank
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(10, 10))
    with CommCounter(AxisNames(None)) as counter:
        dist.all_reduce(torch.ones(100))
        dist.broadcast(torch.ones(80, dtype=torch.float64), src=0)
        dist.all_gather_into_tensor(torch.empty(70), torch.ones(70))
        dist.reduce_scatter_tensor(torch.empty(90), torch.ones(90))
        funcol.all_reduce(torch.ones(200), "sum", dist.group.WORLD).wait()  # counted once
        dist.all_reduce(torch.ones(3))  # a scalar-sized sum: control
        model(torch.ones(4, 10)).sum().backward()  # the reducer's all-reduce, from C++
    got = dict(counter.tally.bytes)
    assert got == {
        ("all_reduce", "world"): (100 + 200 + 110) * 4,
        ("broadcast", "world"): 80 * 8,
        ("all_gather", "world"): 70 * 4,
        ("reduce_scatter", "world"): 90 * 4,
        ("control", "world"): 3 * 4,
    }
    assert counter.tally.calls[("all_reduce", "world")] == 3


def test_dry_run_reports_communication_for_any_layout(tmp_path):
    from tests.unit.test_config import compose_job
    from trainer.dry_run import dry_run

    job = compose_job(
        "+model=gpt2_small",
        "trainer.dry_run=true",
        f"trainer.out_dir={tmp_path}",
        "parallel.tp=8",
        "parallel.pp=4",
        "parallel.zero=1",
        "trainer.global_batch_size=512",
        "trainer.micro_batch_size=4",
    )
    report = dry_run(job, world_size=1024)  # dp = 32
    volumes = report["comm_per_rank"]["volumes"]
    assert set(volumes) >= {"all_reduce", "broadcast", "send", "recv"}
    assert volumes["all_reduce"]["dp_replicate"]["bytes"] > 0  # gradients
    assert volumes["all_reduce"]["tp"]["bytes"] > 0  # activations
    # 512 rows over 32 replicas in 4 micro-batches of 4: every rank of a stage boundary
    # sends 4 activations of 4 x 1024 x 768 fp32 values forward and their gradients back
    # (3 boundaries over 4 ranks, each of the 8 tp ranks a copy), and the tied embedding's
    # gradient shard between the first and last stage.
    act = 4 * 1024 * 768 * 4
    tied = report["vocab_rows"] * 768 // 8 * 4
    assert volumes["send"]["pp"]["bytes"] == pytest.approx((3 * 2 * 4 * act + 2 * tied) / 4)
    bad = compose_job(
        "+model=gpt2_small", "trainer.dry_run=true", f"trainer.out_dir={tmp_path}", "parallel.pp=5"
    )
    assert "error" in dry_run(bad, world_size=5)["comm_per_rank"]


def test_expert_parallel_all_to_all_padded_to_capacity():
    """Buffers padded to capacity: E x rows x capacity slots each way, no count exchange."""
    stage = StageParams(params=100, experts=400, moe_layers=1)
    common = dict(dp=2, ep=2, micro_batches=2, micro_batch_size=2, seq_len=32, d_model=64)
    got = expected_comm(CommLayout(num_experts=4, capacity=10, stages=(stage,), **common))
    assert got.bytes[("all_to_all", "ep")] == 2 * 4 * (4 * 2 * 10 * 64) * F32
    assert ("control", "ep") not in got.bytes
