"""Pipeline parallelism on gloo processes trains exactly like one process.

For GPT (rotary, document mask), BERT (post-LN, padding, NSP head) and GLM (2-D positions,
blank-infilling mask), under every schedule: the pipelined loss equals the single-process
loss, every parameter's gradient (gathered over the stages by name, tied embeddings
included) equals the single-process one, the global gradient norm agrees, one LAMB step
gives the same weights, evaluation gives the same sums, and a second step accumulated
on top of the first (no zero_grad) still agrees.
"""

from __future__ import annotations

import contextlib
import copy
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from models import ModelConfig, build_model
from parallel.dist import World
from parallel.engine import TrainingSpec
from parallel.pipeline import PipelineEngine, split_for_rank, split_stages
from tests.conftest import free_port, spawn_ranks
from trainer.config import PrecisionConfig
from trainer.loss import summed_losses, target_counts
from trainer.optim import Lamb, param_groups
from trainer.precision import LossScaler

V, T, B, N_MICRO = 64, 16, 8, 4
FAMILIES = ("gpt", "bert", "glm")


def tiny_config(family: str, n_layer: int) -> ModelConfig:
    common = {"n_layer": n_layer, "d_model": 32, "n_head": 2, "max_seq_len": T}
    if family == "gpt":
        return ModelConfig(name="gpt_pp", family="gpt", position="rotary", **common)
    if family == "bert":
        return ModelConfig(
            name="bert_pp",
            family="bert",
            objective="mlm_nsp",
            pre_ln=False,
            activation="gelu",
            type_vocab_size=2,
            **common,
        )
    return ModelConfig(name="glm_pp", family="glm", objective="glm_blank", **common)


def make_batch(family: str, *, rows: int = B, seed: int = 0) -> tuple[dict, dict]:
    """Deterministic inputs and labels exercising every per-sample input of the family."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (rows, T), generator=g)
    if family == "gpt":
        doc_start = torch.rand(rows, T, generator=g) < 0.15
        doc_start[:, 0] = True
        doc_id = doc_start.long().cumsum(1)
        idx = torch.arange(T).expand(rows, T)
        start = torch.where(doc_start, idx, torch.zeros_like(idx)).cummax(1).values
        inputs = {
            "input_ids": ids,
            "position_ids": idx - start,
            "attn_mask": (doc_id[:, :, None] == doc_id[:, None, :])[:, None],
        }
        return inputs, {"labels": torch.randint(0, V, (rows, T), generator=g)}
    if family == "bert":
        lengths = torch.randint(T // 2, T + 1, (rows,), generator=g)
        real = torch.arange(T)[None] < lengths[:, None]
        labels = torch.where(torch.rand(rows, T, generator=g) < 0.3, ids, -100)
        inputs = {
            "input_ids": ids,
            "token_type_ids": (torch.arange(T)[None] >= lengths[:, None] // 2).long() * real,
            "attention_mask": real,
        }
        nsp = torch.randint(0, 2, (rows,), generator=g)
        return inputs, {"labels": torch.where(real, labels, -100), "nsp_labels": nsp}
    sep = torch.randint(T // 2, T - 2, (rows,), generator=g)
    idx = torch.arange(T).expand(rows, T)
    part_b = idx >= sep[:, None]
    positions = torch.where(part_b, sep[:, None] - 1, idx)
    block = torch.where(part_b, idx - sep[:, None] + 1, torch.zeros_like(idx))
    inputs = {"input_ids": ids, "position_ids": torch.stack([positions, block], 1), "sep": sep}
    return inputs, {
        "labels": torch.where(part_b, torch.randint(0, V, (rows, T), generator=g), -100)
    }


def reference_step(
    model: nn.Module, inputs: dict, labels: dict, weights: dict, *, chunks: int = 1
) -> dict:
    """Single-process forward + backward, whole batch or accumulated over `chunks` pieces
    (the trainer's gradient accumulation); returns the summed loss of each task."""
    totals: dict[str, torch.Tensor] = {}
    for i in range(chunks):
        piece = {k: v.tensor_split(chunks)[i] for k, v in inputs.items()}
        target = {k: v.tensor_split(chunks)[i] for k, v in labels.items()}
        sums = summed_losses(model(**piece), target)
        sum(sums[k] * weights[k] for k in sums).backward()
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + v.detach().double()
    return totals


def gathered(pairs) -> dict[str, torch.Tensor]:
    """{name: tensor} over every pipeline rank (tiny models: plain object gather)."""
    mine = {name: t.detach().clone() for name, t in pairs}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    out: dict[str, torch.Tensor] = {}
    for part in every:
        out.update(part)
    return out


def assert_tensors_match(got: dict, want: dict, what: str) -> None:
    """Same names, and each tensor within 1e-5 relative to its largest entry."""
    assert got.keys() == want.keys(), (what, sorted(set(got) ^ set(want)))
    for name, ref in want.items():
        ref = ref.detach()
        atol = 1e-5 * max(float(ref.abs().max()), 1e-12)
        torch.testing.assert_close(
            got[name], ref, rtol=1e-5, atol=atol, msg=lambda m, n=name: f"{what} {n}: {m}"
        )


def check_family(family: str, *, schedule: str, virtual_stages: int, mesh) -> None:
    cfg = tiny_config(family, n_layer=mesh.size() * virtual_stages)
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=V)
    # `ref` runs the whole batch at once; `acc` accumulates over the same microbatches.
    ref, acc = copy.deepcopy(model), copy.deepcopy(model)
    runner = pipeline_engine(model, cfg, mesh=mesh, schedule=schedule, v=virtual_stages)
    what = f"{family}/{schedule}/v{virtual_stages}"
    check_train_step(runner, ref, family, seed=0, what=what)
    reference_step(acc, *batch_and_weights(family, seed=0), chunks=N_MICRO)

    norm = runner.clip_grad_norm_(1e9)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1e9)
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0.0)
    torch.nn.utils.clip_grad_norm_(acc.parameters(), 1e9)

    # The step is compared with the accumulating reference: LAMB's first step moves each
    # element by lr * g / (|g| + eps), which would turn the last-bit difference between a
    # whole-batch and a microbatched gradient sum into ~1e-5 of a zero-initialised bias.
    acc_opt = Lamb(param_groups(acc, weight_decay=0.01), lr=1e-2)
    runner.optimizer.step()  # Lamb(param_groups(stages' parameters, 0.01), lr=1e-2)
    acc_opt.step()
    params = gathered(runner.named_parameters())
    acc_params = dict(acc.named_parameters(remove_duplicate=False))
    assert_tensors_match(params, acc_params, f"{what} param after Lamb")

    check_eval(runner, acc, family)
    # No zero_grad: gradients (tied copies included) accumulate into the second step's.
    check_train_step(runner, acc, family, seed=2, what=f"{what} second step", chunks=N_MICRO)


def pipeline_engine(model: nn.Module, cfg: ModelConfig, *, mesh, schedule: str, v: int):
    """The pipeline engine of this rank of the 1-D `mesh`, with a LAMB optimizer."""
    world = World(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=0,
        dp_rank=0,
        dp_size=1,
        device=torch.device("cpu"),
    )
    split = split_for_rank(model, cfg, pp_mesh=mesh, virtual_stages=v)
    spec = TrainingSpec(
        make_optimizer=lambda m: Lamb(param_groups(m, weight_decay=0.01), lr=1e-2),
        loss_fn=summed_losses,
        scaler=LossScaler(PrecisionConfig()),
        forward_context=contextlib.nullcontext,
        precision="fp32",
        grad_clip=0.0,
        global_batch_size=B,
        micro_batch_size=B // N_MICRO,
    )
    return PipelineEngine(
        model,
        split.stages,
        spec=spec,
        world=world,
        pp_mesh=mesh,
        schedule=schedule,
        n_microbatches=N_MICRO,
        tied=split.tied,
        aliases=split.aliases,
    )


def batch_and_weights(family: str, *, seed: int) -> tuple[dict, dict, dict]:
    inputs, labels = make_batch(family, seed=seed)
    return inputs, labels, {k: 1.0 / n for k, n in target_counts(labels).items()}


def check_train_step(runner, ref: nn.Module, family: str, *, seed: int, what: str, chunks=1):
    """Loss (returned on every rank) and every gradient, gathered by name, match `ref`."""
    ref.train()
    inputs, labels, weights = batch_and_weights(family, seed=seed)
    want = reference_step(ref, inputs, labels, weights, chunks=chunks)
    got = runner.forward_backward([(inputs, labels)], weights)
    assert got.keys() == want.keys(), what
    loss_got = sum(float(got[k]) * weights[k] for k in got)
    loss_want = sum(float(want[k]) * weights[k] for k in want)
    assert abs(loss_got - loss_want) < 1e-5, (what, loss_got, loss_want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-6)
    grads = gathered((n, p.grad) for n, p in runner.named_parameters())
    ref_grads = {n: p.grad for n, p in ref.named_parameters(remove_duplicate=False)}
    assert_tensors_match(grads, ref_grads, f"{what} grad")


def check_eval(runner, ref: nn.Module, family: str) -> None:
    """Forward-only sums, on a batch that needs padding into microbatches."""
    ref.eval()
    inputs, labels = make_batch(family, rows=B - 2, seed=1)
    sums = runner.evaluate(inputs, labels)  # padded rows are not scored
    with torch.no_grad():
        ref_sums = summed_losses(ref(**inputs), labels)
    for k in ref_sums:
        torch.testing.assert_close(sums[k], ref_sums[k].double(), rtol=1e-6, atol=1e-6)


TWO_RANK_LAYOUTS = [("gpipe", 1), ("1f1b", 1), ("interleaved_1f1b", 2), ("zero_bubble", 2)]
# 8 stages, 2 per rank.
FOUR_RANK_LAYOUTS = [("interleaved_1f1b", 2), ("zero_bubble", 2)]


def _worker(rank: int, world: int, port: int, layouts: list, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # A rank that fails leaves the others waiting in a collective: let them time out.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("pp",))
        for layout in layouts:
            try:
                for family in FAMILIES:
                    check_family(family, schedule=layout[0], virtual_stages=layout[1], mesh=mesh)
            except BaseException:
                queue.put((rank, layout, traceback.format_exc()))
                raise
            queue.put((rank, layout, "ok"))
    finally:
        dist.destroy_process_group()


def run_ranks(world: int, layouts: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """Run the layouts on `world` spawned gloo processes (one start-up for all of them,
    which dominates the time); returns "ok" or the failures of each layout."""
    queue = mp.get_context("spawn").SimpleQueue()
    fatal = ""
    try:
        spawn_ranks(_worker, world, world, free_port(), layouts, queue)
    except Exception as exc:
        fatal = str(exc)
    outcomes: dict[tuple[str, int], list[str]] = {}
    while not queue.empty():
        rank, layout, outcome = queue.get()
        if outcome != "ok":
            outcomes.setdefault(tuple(layout), []).append(f"rank {rank}:\n{outcome}")
        else:
            outcomes.setdefault(tuple(layout), [])
    return {
        layout: "\n".join(outcomes[layout]) or "ok"
        if layout in outcomes
        else f"not run; processes failed with:\n{fatal}"
        for layout in layouts
    }


@pytest.fixture(scope="module")
def two_rank_outcomes() -> dict:
    return run_ranks(2, TWO_RANK_LAYOUTS)


@pytest.fixture(scope="module")
def four_rank_outcomes() -> dict:
    return run_ranks(4, FOUR_RANK_LAYOUTS)


@pytest.mark.parametrize("layout", TWO_RANK_LAYOUTS, ids=lambda x: f"{x[0]}-v{x[1]}")
def test_two_rank_pipeline_matches_single_process(two_rank_outcomes, layout):
    assert two_rank_outcomes[layout] == "ok", two_rank_outcomes[layout]


@pytest.mark.parametrize("layout", FOUR_RANK_LAYOUTS, ids=lambda x: f"{x[0]}-v{x[1]}")
def test_four_rank_interleaved_pipeline_matches_single_process(four_rank_outcomes, layout):
    assert four_rank_outcomes[layout] == "ok", four_rank_outcomes[layout]


# --- splitting and refusals (no process group needed) ---------------------------------------


def test_stage_names_cover_the_model_once_and_share_its_tensors():
    cfg = tiny_config("bert", n_layer=8)
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=V)
    full = model.state_dict(keep_vars=True)
    seen: dict[str, int] = {}
    for rank in range(2):
        pruned = copy.deepcopy(model)
        copies = pruned.state_dict(keep_vars=True)
        stages = split_stages(pruned, cfg, pp_rank=rank, pp_size=2, virtual_stages=2)
        assert [s.stage_id for s in stages] == [rank, rank + 2]
        for stage in stages:
            assert list(stage.blocks) == [str(2 * stage.stage_id), str(2 * stage.stage_id + 1)]
            for name, tensor in stage.state_dict(keep_vars=True).items():
                assert tensor is copies[name], name  # the model's own tensor, not a copy
                seen[name] = seen.get(name, 0) + 1
        kept = {n for n, _ in pruned.named_parameters(remove_duplicate=False)}
        owned = {n for s in stages for n, _ in s.named_parameters(remove_duplicate=False)}
        assert kept == owned  # what the rank does not own is freed
    assert seen.keys() == full.keys()
    assert all(count == 1 for count in seen.values())
    assert "wte.weight" in seen and "lm_head.weight" in seen


def test_t5_is_refused_naming_the_field():
    cfg = ModelConfig(
        name="t5_pp",
        family="t5",
        objective="span_corruption",
        norm="rmsnorm",
        position="relative",
        bias=False,
        n_layer=2,
    )
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=V)
    with pytest.raises(ValueError, match=r"model\.family='t5'.*parallel\.pp=1"):
        split_stages(model, cfg, pp_rank=0, pp_size=2, virtual_stages=1)


def test_shared_layers_are_refused_naming_the_field():
    cfg = tiny_config("bert", n_layer=4)
    cfg.share_layers = True
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=V)
    with pytest.raises(ValueError, match=r"model\.share_layers"):
        split_stages(model, cfg, pp_rank=0, pp_size=2, virtual_stages=1)


def test_indivisible_layers_are_refused_naming_every_field():
    cfg = tiny_config("gpt", n_layer=6)
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=V)
    pattern = r"model\.n_layer=6.*parallel\.pp=2.*parallel\.virtual_stages=2"
    with pytest.raises(ValueError, match=pattern):
        split_stages(model, cfg, pp_rank=0, pp_size=2, virtual_stages=2)
