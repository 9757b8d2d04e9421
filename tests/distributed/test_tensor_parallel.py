"""Tensor (and sequence) parallelism on 2 gloo processes computes what one process does.

For every family (GPT learned, GPT rotary with a gated MLP, BERT post-LN and pre-LN/rotary,
ALBERT, T5 v1.0 and v1.1, GLM), with parallel.sp off and on: the same debug model (same
seed) is built on each rank and in-process as the reference; the TP copy must give the
trainer's loss (summed cross-entropy / scored targets, summed over tasks) within 1e-5,
the same full gradients, and after one LAMB step the same full parameters (so the trust
ratio used full-tensor norms). The logits must come out as a vocabulary-sharded DTensor.

All cases run in one pair of spawned workers (process start-up dominates the cost); each
rank writes its own measurements and the tests below assert on them.
"""

from __future__ import annotations

import copy
import json
import math
import os
import traceback
from datetime import timedelta
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch

from models.config import ModelConfig
from parallel.config import check_tp_divisibility
from parallel.tensor_parallel import TP_PLANS
from tests.conftest import free_port, spawn_ranks

WORLD = 2
VOCAB = 96  # embedding rows, divisible by tp
B, T, T_DEC = 2, 32, 16

_COMMON = dict(n_layer=2, d_model=64, n_head=4, max_seq_len=T, init_std=0.02)
CONFIGS: dict[str, dict] = {
    "gpt_learned": dict(family="gpt"),
    "gpt_rotary_gated": dict(family="gpt", position="rotary", activation="gated_gelu", d_ff=96),
    "bert": dict(
        family="bert", pre_ln=False, activation="gelu", type_vocab_size=2, layer_norm_eps=1e-12
    ),
    "bert_preln_rotary": dict(
        family="bert", pre_ln=True, position="rotary", type_vocab_size=2, tie_embeddings=False
    ),
    "albert": dict(
        family="bert", pre_ln=False, type_vocab_size=2, embedding_size=32, share_layers=True
    ),
    "t5": dict(
        family="t5",
        objective="span_corruption",
        d_kv=16,
        d_ff=128,
        norm="rmsnorm",
        position="relative",
        bias=False,
        activation="relu",
        scale_logits=True,
        init_std=1.0,
        layer_norm_eps=1e-6,
        relative_buckets=8,
        relative_max_distance=16,
    ),
    "t5_v1_1": dict(
        family="t5",
        objective="span_corruption",
        d_kv=16,
        d_ff=96,
        norm="rmsnorm",
        position="relative",
        bias=False,
        activation="gated_gelu",
        tie_embeddings=False,
        init_std=1.0,
        layer_norm_eps=1e-6,
        relative_buckets=8,
        relative_max_distance=16,
    ),
    "glm": dict(family="glm"),
}
CASES = [(name, sp) for name in CONFIGS for sp in (False, True)]


def make_cfg(name: str) -> ModelConfig:
    return ModelConfig(name=name, **{**_COMMON, **CONFIGS[name]})


def make_batch(family: str) -> tuple[dict, dict]:
    """Fixed inputs and labels with ignored targets and padding, as the objectives emit."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    labels[torch.rand(B, T, generator=g) < 0.3] = -100
    if family == "gpt":
        # Packed documents: positions restart where the second document begins.
        positions = torch.cat([torch.arange(10), torch.arange(T - 10)]).expand(B, T)
        return {"input_ids": ids, "position_ids": positions.contiguous()}, {"labels": labels}
    if family == "bert":
        types = (torch.arange(T) >= T // 2).long().expand(B, T).contiguous()
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, -5:] = False
        inputs = {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
        return inputs, {"labels": labels, "nsp_labels": torch.tensor([0, 1])}
    if family == "t5":
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, -6:] = False
        dec = torch.randint(0, VOCAB, (B, T_DEC), generator=g)
        dec_labels = torch.randint(0, VOCAB, (B, T_DEC), generator=g)
        dec_labels[1, -3:] = -100
        inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec}
        return inputs, {"labels": dec_labels}
    # GLM: Part A is bidirectional up to sep; Part B tokens (the spans) carry the loss.
    sep = torch.tensor([20, 24])
    pos = torch.arange(T).expand(B, T).clone()
    block = torch.zeros(B, T, dtype=torch.long)
    for row, s in enumerate(sep.tolist()):
        pos[row, s:] = 5
        block[row, s:] = torch.arange(1, T - s + 1)
    labels[torch.arange(T).expand(B, T) < sep[:, None]] = -100
    inputs = {"input_ids": ids, "position_ids": torch.stack([pos, block], 1), "sep": sep}
    return inputs, {"labels": labels}


def _loss(sums: dict, labels: dict) -> torch.Tensor:
    """The trainer's loss on one process: per task, summed CE / its scored targets."""
    return sum(sums[k] / (labels[k] != -100).sum() for k in sums)


def _rel_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict:
    out = {}
    for name, ref in want.items():
        scale = ref.abs().max().clamp(min=1e-6)
        out[name] = float((got[name] - ref).abs().max() / scale)
    return out


def _full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _local_norms(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """What a TP-unaware optimizer would use: the norm of each rank's shard (kept a
    replicated DTensor, as the optimizer's elementwise ops expect one)."""
    from torch.distributed.tensor import DTensor, Replicate

    return [
        DTensor.from_local(t.to_local().norm(), t.device_mesh, [Replicate()], run_check=False)
        for t in tensors
    ]


def _lamb_step(model: torch.nn.Module, **kwargs) -> dict[str, torch.Tensor]:
    from trainer.optim import Lamb, param_groups

    Lamb(param_groups(model, weight_decay=0.1), lr=0.05, weight_decay=0.1, **kwargs).step()
    return {n: _full(p.detach()) for n, p in model.named_parameters()}


def _run_case(name: str, sp: bool, mesh) -> dict:
    """Loss and grads of the TP model against the reference; then one LAMB step on each
    from the *same* gradients (the TP ones, gathered), so the parameters may differ only
    by the optimizer's handling of shards. From separately computed gradients they would
    differ by more than the gradients do: Adam-style updates divide by sqrt(v) + eps,
    which amplifies rounding-level differences of gradients much smaller than eps."""
    from torch.distributed.tensor import DTensor, Shard

    from models.build import build_model
    from parallel.engine import local_losses
    from parallel.tensor_parallel import (
        apply_tensor_parallel,
        loss_parallel_context,
        reduce_pending_grads,
    )
    from trainer.loss import summed_losses

    summed_losses_tp = local_losses(summed_losses)

    cfg = make_cfg(name)
    torch.manual_seed(0)
    ref = build_model(cfg, vocab_size=VOCAB)
    model = copy.deepcopy(ref)
    inputs, labels = make_batch(cfg.family)
    ref_loss = _loss(summed_losses(ref(**inputs), labels), labels)
    ref_loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}

    apply_tensor_parallel(model, cfg, tp_mesh=mesh, sequence_parallel=sp)
    with loss_parallel_context(True):
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs
        loss = _loss(summed_losses_tp(outputs, labels), labels)
        loss.backward()
    grads = {n: _full(p.grad) for n, p in model.named_parameters()}
    # The trainer lays every gradient out as its parameter before the clip reads it.
    pending = sum(any(pl.is_partial() for pl in p.grad.placements) for p in model.parameters())
    reduce_pending_grads(list(model.parameters()))
    settled = {n: _full(p.grad) for n, p in model.named_parameters()}
    embeddings = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    result = {
        "loss_ref": ref_loss.item(),
        "loss_tp": loss.item(),
        "plain_loss": not isinstance(loss, DTensor),
        "logits_placements": repr(getattr(logits, "placements", None)),
        "logits_sharded": isinstance(logits, DTensor)
        and logits.placements == (Shard(logits.ndim - 1),)
        and logits.to_local().shape[-1] == VOCAB // WORLD,
        "names_match": sorted(grads) == sorted(ref_grads),
        "tied": any(model.lm_head.weight is w for w in embeddings),
        "grad_err": _rel_errors(grads, ref_grads),
        "pending_grads": int(pending),
        "settled_err": max(_rel_errors(settled, grads).values()),
        "settled_layouts": all(p.grad.placements == p.placements for p in model.parameters()),
        # What the trainer clips by and logs: the norm over all (sharded) gradients.
        "grad_norm_tp": float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)),
        "grad_norm_ref": float(torch.nn.utils.clip_grad_norm_(ref.parameters(), math.inf)),
    }
    for n, p in ref.named_parameters():
        p.grad = grads[n].clone()
    control = None
    if name == "gpt_learned" and not sp:
        # Negative control: shard-local norms must visibly break the comparison.
        unaware = copy.deepcopy(model)
        for p, q in zip(unaware.parameters(), model.parameters(), strict=True):
            p.grad = q.grad.clone()
        control = _lamb_step(unaware, norm_fn=_local_norms)
    want = _lamb_step(ref)
    result["param_err"] = _rel_errors(_lamb_step(model), want)
    if control is not None:
        result["local_norm_param_err"] = _rel_errors(control, want)
    return result


def _run_checks(mesh) -> dict:
    """Errors that apply_tensor_parallel must raise, with the field named."""
    from models.build import build_model
    from parallel.tensor_parallel import apply_tensor_parallel

    out = {}
    bad = ModelConfig(**{**_COMMON, "n_head": 1})
    try:
        apply_tensor_parallel(
            build_model(bad, vocab_size=VOCAB), bad, tp_mesh=mesh, sequence_parallel=False
        )
        out["n_head"] = "no error"
    except ValueError as e:
        out["n_head"] = str(e)
    cfg = make_cfg("gpt_learned")
    model = apply_tensor_parallel(
        build_model(cfg, vocab_size=VOCAB), cfg, tp_mesh=mesh, sequence_parallel=True
    )
    try:
        model(torch.zeros(1, T - 1, dtype=torch.long))
        out["odd_length"] = "no error"
    except ValueError as e:
        out["odd_length"] = str(e)
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("tp",))
    results = {}
    for name, sp in CASES:
        try:
            results[f"{name}/sp={sp}"] = _run_case(name, sp, mesh)
        except Exception:
            results[f"{name}/sp={sp}"] = {"error": traceback.format_exc()}
    results["checks"] = _run_checks(mesh)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("tp")
    spawn_ranks(_worker, WORLD, free_port(), str(out))
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize(("name", "sp"), CASES, ids=[f"{n}-sp={s}" for n, s in CASES])
def test_tp_matches_single_process(tp_results, name, sp):
    for rank, results in enumerate(tp_results):
        r = results[f"{name}/sp={sp}"]
        assert "error" not in r, r.get("error")
        assert abs(r["loss_tp"] - r["loss_ref"]) < 1e-5, (rank, r["loss_tp"], r["loss_ref"])
        assert r["plain_loss"]
        assert abs(r["grad_norm_tp"] - r["grad_norm_ref"]) < 1e-5 * r["grad_norm_ref"]
        assert r["logits_sharded"], r["logits_placements"]
        assert r["names_match"]
        # Under sp the norms' gradients leave backward as pending sums; reduced once, they
        # keep their values and take their parameters' layout.
        assert (r["pending_grads"] > 0) == sp, r["pending_grads"]
        assert r["settled_layouts"] and r["settled_err"] == 0.0, r["settled_err"]
        assert r["tied"] == make_cfg(name).tie_embeddings
        if "local_norm_param_err" in r:
            # Shard-local norms in the trust ratio fail the parameter check below.
            control = r["local_norm_param_err"]
            assert control["blocks.0.attn.qkv.weight"] > 1e-5, control
            assert control["blocks.0.ln1.weight"] == 0.0  # replicated: the shard is the whole
        worst = max(r["grad_err"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-5, (rank, "grad", worst)
        # Same gradients on both sides: the step may differ by rounding only (~1 ulp).
        worst = max(r["param_err"].items(), key=lambda kv: kv[1])
        assert worst[1] < 1e-6, (rank, "param", worst)


def test_tp_refuses_bad_layouts(tp_results):
    for results in tp_results:
        checks = results["checks"]
        assert "model.n_head=1" in checks["n_head"] and "parallel.tp=2" in checks["n_head"]
        assert "parallel.tp=2" in checks["odd_length"] and "input_ids" in checks["odd_length"]


# ---------------------------------------------------------------------------------------
# Single-process checks of the plans themselves.


def _matches(path: str, key: str) -> bool:
    parts, pattern = path.split("."), key.split(".")
    return len(parts) == len(pattern) and all(
        fnmatch(p, k) for p, k in zip(parts, pattern, strict=True)
    )


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("sp", [False, True])
def test_plan_covers_every_parameter_and_resolves(name, sp):
    """Every module that owns parameters gets a style, and every plan key names a module."""
    from models.build import build_model

    cfg = make_cfg(name)
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=VOCAB)
    plan = TP_PLANS[cfg.family](cfg, sp)
    paths = [n for n, _ in model.named_modules() if n]
    for key in plan:
        assert any(_matches(p, key) for p in paths), f"plan key {key!r} matches no module"
    owners = {n for n, m in model.named_modules() if any(True for _ in m.parameters(False))}
    for owner in owners:
        assert any(_matches(owner, key) for key in plan), f"{owner} has no style in the plan"


def test_divisibility_errors_name_the_field():
    cfg = ModelConfig(n_layer=2, d_model=64, n_head=4, d_ff=130)
    with pytest.raises(ValueError, match=r"model\.d_ff=130 .*parallel\.tp=4"):
        check_tp_divisibility(cfg, vocab_rows=128, tp=4)
    cfg = ModelConfig(n_layer=2, d_model=64, n_head=4)
    with pytest.raises(ValueError, match=r"vocab rows 366 .*parallel\.tp=4"):
        check_tp_divisibility(cfg, vocab_rows=366, tp=4)
    with pytest.raises(ValueError, match=r"model\.n_head=4 .*parallel\.tp=8"):
        check_tp_divisibility(cfg, vocab_rows=128, tp=8)
    check_tp_divisibility(cfg, vocab_rows=128, tp=2)
