"""Loom's mixture-of-experts layer inside models: the aux-loss gradient it injects, its
independence from how the batch is split, its telemetry, LAMB's per-expert trust ratio,
and its parameter and FLOP counts. (The routing math against Hugging Face, megatron-core
and fairscale is in test_moe_reference.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from models import build_model, flops_per_token, param_counts
from models import moe as moe_module
from models.config import ModelConfig, MoeConfig
from models.moe import Experts, MoE, moe_layers, set_aux_loss_weight
from parallel.activation import apply_activation_checkpointing
from parallel.parallelize import compile_blocks, repeated_blocks
from trainer.optim import Lamb, param_groups

V = 97


def moe_gpt(**moe) -> torch.nn.Module:
    spec = {"num_experts": 4, "z_loss_coef": 1e-3, "jitter_eps": 0.0, **moe}
    cfg = ModelConfig(n_layer=4, d_model=32, n_head=2, max_seq_len=16, moe=MoeConfig(**spec))
    torch.manual_seed(0)
    return build_model(cfg, vocab_size=V)


def batch(rows: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (rows, 16), generator=torch.Generator().manual_seed(seed))


def ce_sum(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


def test_injected_gradient_is_the_weighted_aux_and_z_loss(monkeypatch):
    """Backward of the task loss alone, with the layers' losses attached at weight w, equals
    backward of task + w x share x (aux_coef x aux + z_coef x z) written out by hand."""
    model, ids, w = moe_gpt(), batch(), 0.37
    set_aux_loss_weight(model, w)
    ce_sum(model, ids).backward()
    injected = grads(model)

    seen = []
    monkeypatch.setattr(MoE, "_attach_losses", lambda self, y, aux, z: seen.append((aux, z)) or y)
    layers = [layer for _, layer in moe_layers(model)]
    total = ce_sum(model, ids)
    for layer, (aux, z) in zip(layers, seen, strict=True):
        cfg = layer.cfg
        total = total + w * layer.loss_share * (cfg.aux_loss_coef * aux + cfg.z_loss_coef * z)
    total.backward()
    explicit = grads(model)
    assert len(seen) == 2 and explicit.keys() == injected.keys()
    for name in explicit:
        torch.testing.assert_close(injected[name], explicit[name], rtol=1e-5, atol=1e-7)
    router = "blocks.1.mlp.router.weight"
    assert injected[router].abs().sum() > 0  # the router learns from the losses


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_gradients_do_not_depend_on_the_micro_batch_split(capacity_factor):
    """Routing groups are rows, so two micro-batches of two rows give the gradients (losses
    and layer losses included) of one batch of four, dropping or dropless."""
    model, ids = moe_gpt(capacity_factor=capacity_factor), batch()
    set_aux_loss_weight(model, 0.25)
    (ce_sum(model, ids) * 0.25).backward()
    whole = grads(model)
    for part in ids.split(2):
        (ce_sum(model, part) * 0.25).backward()
    split = grads(model)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-7)


def telemetry(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    model.train()
    ce_sum(model, ids).backward()
    return [layer.stats.take() for _, layer in moe_layers(model)]


@pytest.mark.parametrize(
    "mode, compiled, pad",
    [
        ("full", False, True),
        ("selective", False, True),
        ("full", True, True),
        ("selective", True, True),
        ("full", True, False),
    ],
    ids=["full", "selective", "full-compiled", "selective-compiled", "full-compiled-sorted"],
)
def test_telemetry_counts_each_forward_once_under_checkpointing(mode, compiled, pad):
    ids = batch(rows=4)
    plain = telemetry(moe_gpt(capacity_factor=1.0, pad_to_capacity=pad), ids)
    model = moe_gpt(capacity_factor=1.0, pad_to_capacity=pad)
    blocks = repeated_blocks(model)
    apply_activation_checkpointing(blocks, mode)
    counters.clear()
    if compiled:  # checkpointing inside the compiled block, as parallelize orders them
        torch._dynamo.reset()
        compile_blocks(blocks)
    checkpointed = telemetry(model, ids)
    # The padded layer's telemetry is a forward side effect that a compiled recomputation
    # leaves out, so the checkpointed block compiles whole (the sorted one reads counts).
    assert pad == (not counters["graph_break"]), dict(counters["graph_break"])
    torch._dynamo.reset()
    for (name, layer), stats, expected in zip(moe_layers(model), checkpointed, plain, strict=True):
        aux, z, rows, choices, dropped = stats[:5].tolist()
        load = stats[5:]
        assert rows == 4 and choices == 4 * 16, name  # not 8 rows: recomputation not counted
        assert load.sum() + dropped == choices and aux > 0 and z > 0
        torch.testing.assert_close(stats, expected, rtol=1e-5, atol=0)
        assert layer.stats.take().abs().sum() == 0  # taken: the window starts again
    model.eval()
    with torch.no_grad():
        model(ids)
    assert all(layer.stats.take().abs().sum() == 0 for _, layer in moe_layers(model))


def test_lamb_takes_one_trust_ratio_per_expert():
    """A LAMB step on the stacked expert weights equals LAMB on each expert as its own
    tensor, and differs from one trust ratio over the whole stack."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 6, 5) * torch.tensor([1.0, 3.0, 0.2, 1.0])[:, None, None])
    g = torch.randn(4, 6, 5)
    stacked = w.detach().clone().requires_grad_()
    stacked.grad = g.clone()
    Lamb([{"params": [stacked], "expert_rows": True}], lr=0.1, weight_decay=0.01).step()
    rows = [torch.nn.Parameter(w[e].detach().clone()) for e in range(4)]
    for e, p in enumerate(rows):
        p.grad = g[e].clone()
    Lamb(rows, lr=0.1, weight_decay=0.01).step()
    torch.testing.assert_close(stacked.detach(), torch.stack([p.detach() for p in rows]))
    whole = w.detach().clone().requires_grad_()
    whole.grad = g.clone()
    Lamb([whole], lr=0.1, weight_decay=0.01).step()
    assert not torch.allclose(whole, stacked)


def test_expert_params_form_their_own_groups():
    model = moe_gpt(num_experts=4)
    groups = param_groups(model, weight_decay=0.1)
    assert [len(g["params"]) for g in groups][2:] == [4, 4]  # w_in, w_out; b_in, b_out x 2
    assert [g.get("expert_rows", False) for g in groups] == [False, False, True, True]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1, 0.0]
    dense = dataclasses.replace(model.cfg, moe=MoeConfig())
    assert len(param_groups(build_model(dense, vocab_size=V), weight_decay=0.1)) == 2


def test_counts_and_flops_use_active_parameters():
    dense_cfg = ModelConfig(n_layer=4, d_model=32, n_head=2, max_seq_len=16)
    moe_cfg = dataclasses.replace(dense_cfg, moe=MoeConfig(num_experts=4, top_k=1))
    dense = param_counts(build_model(dense_cfg, vocab_size=V))
    moe = param_counts(build_model(moe_cfg, vocab_size=V))
    mlp = 2 * 32 * 128 + 128 + 32  # one expert: two matrices and two biases
    assert moe["expert"] == 2 * 4 * mlp  # 2 MoE layers x 4 experts
    assert moe["total"] == dense["total"] + 2 * (3 * mlp + 32 * 4)  # 3 more experts + router
    assert moe["active"] == dense["total"] + 2 * 32 * 4  # one expert per token, plus routers
    f_dense = flops_per_token(dense_cfg, vocab_size=V, seq_len=16)
    assert flops_per_token(moe_cfg, vocab_size=V, seq_len=16) == f_dense + 6 * 2 * 32 * 4
    top2 = dataclasses.replace(dense_cfg, moe=MoeConfig(num_experts=4, top_k=2))
    extra = 6 * 2 * (2 * 32 * 128 + 32 * 4)  # a second expert's matmuls, and the routers
    assert flops_per_token(top2, vocab_size=V, seq_len=16) == f_dense + extra


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("num_experts", 1, "num_experts=1"),
        ("top_k", 5, "top_k=5"),
        ("layers", [7], r"layers=\[7\]"),
        ("capacity_factor", 0.0, "capacity_factor=0.0"),
        ("drop_policy", "random", "drop_policy='random'"),
        ("aux_loss_reduce", "max", "aux_loss_reduce='max'"),
        ("jitter_eps", 1.5, "jitter_eps=1.5"),
        ("expert_dropout", 1.0, "expert_dropout=1.0"),
        ("min_capacity", 0, "min_capacity=0"),
    ],
)
def test_bad_moe_fields_are_named(field, value, match):
    moe = dataclasses.replace(MoeConfig(num_experts=4), **{field: value})
    with pytest.raises(ValueError, match=rf"model\.moe\.{match}"):
        ModelConfig(moe=moe).validate()


def test_causal_families_refuse_the_probs_policy():
    moe = MoeConfig(num_experts=4, drop_policy="probs")
    with pytest.raises(ValueError, match="drop_policy=probs with model.family=gpt"):
        ModelConfig(moe=moe).validate()
    ModelConfig(family="bert", position="learned", moe=moe).validate()


def _expert_run(experts, x, counts, grad):
    x = x.clone().requires_grad_(True)
    y = experts(x, counts)
    y.backward(grad)
    out = {"y": y.detach(), "x": x.grad}
    out.update({n: p.grad.clone() for n, p in experts.named_parameters()})
    experts.zero_grad(set_to_none=True)
    return out


@pytest.mark.skipif(moe_module._GROUPED_MM is None, reason="this torch has no grouped_mm")
@pytest.mark.parametrize(("activation", "bias"), [("gelu", True), ("gated_gelu", False)])
def test_grouped_gemm_path_equals_the_per_expert_loop(activation, bias):
    """The grouped GEMM (CUDA's fast path; this torch runs it on CPU too) gives the loop's
    output and gradients, empty experts included, in fp32 and under bf16 autocast."""
    torch.manual_seed(0)
    experts = Experts(6, 16, 24, activation=activation, bias=bias)
    counts = torch.tensor([5, 0, 9, 1, 0, 7])
    x = torch.randn(int(counts.sum()), 16)
    grad = torch.randn(len(x), 16)
    assert not moe_module.grouped_mm_runs(x, experts.weights())  # CPU: the loop by default
    runs = {}
    for grouped in (False, True):
        experts.grouped = grouped
        runs[grouped] = _expert_run(experts, x, counts, grad)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs[grouped, "bf16"] = _expert_run(experts, x, counts, grad)
    for key, value in runs[False].items():
        torch.testing.assert_close(runs[True][key], value, rtol=1e-5, atol=1e-6, msg=key)
        bf16 = runs[True, "bf16"][key].float(), runs[False, "bf16"][key].float()
        torch.testing.assert_close(*bf16, rtol=2e-2, atol=2e-2, msg=key)
    assert runs[True, "bf16"]["y"].dtype == torch.bfloat16


def _layer_run(layer: MoE, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    out = {"y": y.detach(), "x": x.grad}
    out.update({n: p.grad.clone() for n, p in layer.named_parameters()})
    layer.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize(
    ("top_k", "policy", "activation", "bias"),
    [
        (1, "position", "gelu", True),
        (2, "position", "gated_gelu", False),
        (2, "probs", "relu", True),
    ],
)
def test_capacity_padded_dispatch_equals_the_sorted_one(top_k, policy, activation, bias):
    """Experts on buffers padded to capacity (one batched GEMM, no count read) give the
    sorted dispatch's output and gradients (router, experts, input), drops included: in
    float64 to rounding, and under bf16 autocast to bf16 precision."""
    cfg = MoeConfig(
        num_experts=4,
        top_k=top_k,
        capacity_factor=0.5,
        min_capacity=1,
        drop_policy=policy,
        z_loss_coef=1e-3,
        jitter_eps=0.0,
    )
    torch.manual_seed(0)
    layer = MoE(cfg, d_model=16, ffn_size=24, activation=activation, bias=bias)
    with torch.no_grad():  # a router far from uniform: some experts overflow, some idle
        layer.router.weight.mul_(20.0)
    set_aux_loss_weight(layer, 0.5)
    g = torch.Generator().manual_seed(3)
    x, grad = torch.randn(3, 16, 16, generator=g), torch.randn(3, 16, 16, generator=g)
    runs = {}
    for pad in (True, False):
        layer.cfg = dataclasses.replace(cfg, pad_to_capacity=pad)
        runs[pad] = _layer_run(layer.double(), x.double(), grad.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            runs[pad, "bf16"] = _layer_run(layer.float(), x, grad)
    dropped = layer.stats.take()[4]
    assert dropped > 0  # capacity drops choices, so the padded slots and the trash are used
    assert runs[True].keys() == runs[False].keys()
    for key, value in runs[False].items():
        torch.testing.assert_close(runs[True][key], value, rtol=1e-12, atol=1e-12, msg=key)
        bf16 = runs[True, "bf16"][key].float(), runs[False, "bf16"][key].float()
        torch.testing.assert_close(*bf16, rtol=2e-2, atol=2e-2, msg=key)


def test_padded_dispatch_shapes_follow_the_config(monkeypatch):
    """Each expert receives rows x capacity slots whatever the routing, the empty ones zero."""
    cfg = MoeConfig(num_experts=4, capacity_factor=1.0, min_capacity=1, jitter_eps=0.0)
    torch.manual_seed(0)
    layer = MoE(cfg, d_model=8, ffn_size=16, activation="relu", bias=True)
    seen = []
    compute = Experts.compute_padded
    monkeypatch.setattr(
        Experts, "compute_padded", lambda self, x, w: seen.append(x) or compute(self, x, w)
    )
    for bias in ([0.0] * 4, [9.0, 0.0, 0.0, 0.0]):  # balanced, then all on expert 0
        with torch.no_grad():
            layer.router.weight.zero_().add_(torch.tensor(bias)[:, None])
        layer(torch.rand(2, 12, 8) + 0.5)
    assert [tuple(x.shape) for x in seen] == [(4, 2 * 3, 8)] * 2  # capacity 12 / 4 = 3
    skewed = seen[1]
    assert skewed[0].abs().sum(-1).gt(0).all() and not skewed[1:].any()
