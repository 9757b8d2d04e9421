"""LAMB against hand-computed steps, its two implementations against each other, the
sharded-norm seam, parameter groups and the optimizer builder."""

from __future__ import annotations

import io
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import Tensor

from trainer.config import OptimConfig
from trainer.optim import Lamb, build_optimizer, local_norms, param_groups

W0 = [[1.0, 2.0], [3.0, 4.0]]
GRADS = [[[0.5, -1.0], [0.25, 2.0]], [[-0.5, 0.75], [1.5, -0.125]]]


def reference_lamb(
    w: list[float],
    grads: list[list[float]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    bias_correction: bool,
) -> list[list[float]]:
    """Algorithm 2 of the LAMB paper in plain float64 Python; the weights after each step."""
    b1, b2 = betas
    m = [0.0] * len(w)
    v = [0.0] * len(w)
    history = []
    for t, g in enumerate(grads, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        c1, c2 = (1 - b1**t, 1 - b2**t) if bias_correction else (1.0, 1.0)
        u = [
            (mi / c1) / (math.sqrt(vi / c2) + eps) + weight_decay * wi
            for mi, vi, wi in zip(m, v, w, strict=True)
        ]
        w_norm = math.sqrt(sum(x * x for x in w))
        u_norm = math.sqrt(sum(x * x for x in u))
        ratio = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
        w = [wi - lr * ratio * ui for wi, ui in zip(w, u, strict=True)]
        history.append(w)
    return history


def flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


@pytest.mark.parametrize("skippable", [False, True], ids=["host", "skippable"])
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize(
    ("weight_decay", "bias_correction"), [(0.0, True), (0.1, True), (0.1, False), (0.0, False)]
)
def test_two_steps_match_hand_computed(foreach, weight_decay, bias_correction, skippable):
    """Both update paths: the host's, and the one that can skip on the device (fp16's,
    here with found_inf = 0: every step taken)."""
    hyper = dict(
        lr=0.1,
        betas=(0.9, 0.999),
        eps=1e-6,
        weight_decay=weight_decay,
        bias_correction=bias_correction,
    )
    expected = reference_lamb(flat(W0), [flat(g) for g in GRADS], **hyper)
    w = torch.tensor(W0, requires_grad=True)
    opt = Lamb([w], foreach=foreach, **hyper)
    if skippable:
        opt.found_inf = torch.tensor(0.0)
    for step, grad in enumerate(GRADS):
        w.grad = torch.tensor(grad)
        opt.step()
        want = torch.tensor(expected[step]).view(2, 2)
        torch.testing.assert_close(w.detach(), want, rtol=1e-6, atol=1e-7)
    assert opt.state[w]["step"].item() == 2.0


def test_first_step_closed_form():
    # At t=1 with bias correction m_hat = g and v_hat = g^2, so u = g/(|g|+eps) + wd*w.
    lr, wd, eps = 0.1, 0.1, 1e-6
    w0, g = flat(W0), flat(GRADS[0])
    u = [gi / (abs(gi) + eps) + wd * wi for gi, wi in zip(g, w0, strict=True)]
    ratio = math.sqrt(sum(x * x for x in w0)) / math.sqrt(sum(x * x for x in u))
    want = torch.tensor([wi - lr * ratio * ui for wi, ui in zip(w0, u, strict=True)]).view(2, 2)
    w = torch.tensor(W0, requires_grad=True)
    w.grad = torch.tensor(GRADS[0])
    Lamb([w], lr=lr, weight_decay=wd, eps=eps).step()
    torch.testing.assert_close(w.detach(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("foreach", [False, True])
def test_trust_ratio_is_one_for_zero_weights(foreach):
    w = torch.zeros(2, 2, requires_grad=True)
    w.grad = torch.tensor(GRADS[0])
    Lamb([w], lr=0.1, eps=1e-6, weight_decay=0.0, foreach=foreach).step()
    g = w.grad
    torch.testing.assert_close(w.detach(), -0.1 * g / (g.abs() + 1e-6))


@pytest.mark.parametrize("foreach", [False, True])
def test_trust_ratio_is_one_for_zero_update(foreach):
    # ||w|| / ||u|| would be inf and inf * 0 = nan; a ratio of 1 leaves w as it is.
    w = torch.tensor(W0, requires_grad=True)
    w.grad = torch.zeros(2, 2)
    Lamb([w], weight_decay=0.0, foreach=foreach).step()
    assert torch.equal(w.detach(), torch.tensor(W0))


def make_mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(11, 8),
        torch.nn.Linear(8, 16),
        torch.nn.LayerNorm(16),
        torch.nn.GELU(),
        torch.nn.Linear(16, 5),
    )


def lamb_groups(model: torch.nn.Module) -> list[dict]:
    """Three groups with different hyper-parameters, to exercise per-group settings."""
    emb, lin1, norm, _, lin2 = model
    return [
        {"params": [emb.weight, lin1.weight], "weight_decay": 0.1},
        {"params": [lin2.weight], "weight_decay": 0.01, "lr": 3e-3, "bias_correction": False},
        {"params": [lin1.bias, norm.weight, norm.bias, lin2.bias], "weight_decay": 0.0},
    ]


def set_random_grads(models: list[torch.nn.Module], gen: torch.Generator, step: int) -> None:
    """The same random grads on every model; the last bias skips every third step."""
    for params in zip(*(m.parameters() for m in models), strict=True):
        grad = torch.randn(params[0].shape, generator=gen)
        for p in params:
            p.grad = grad.clone()
    if step % 3 == 2:
        for m in models:
            m[-1].bias.grad = None


def test_foreach_and_loop_are_bitwise_identical():
    # On CPU the _foreach_* kernels run the same per-tensor ops in the same order as the
    # loop, and the stacked trust-ratio arithmetic rounds exactly like the 0-dim one.
    models = [make_mlp(), make_mlp()]
    opts = [
        Lamb(lamb_groups(m), lr=1e-2, foreach=f) for m, f in zip(models, (True, False), strict=True)
    ]
    gen = torch.Generator().manual_seed(1)
    for step in range(20):
        set_random_grads(models, gen, step)
        for opt in opts:
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(opts[0].state.values(), opts[1].state.values(), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_param_groups_split_decay_and_skip_frozen():
    model = make_mlp()
    frozen = torch.nn.Linear(3, 3)
    frozen.requires_grad_(False)
    model.append(frozen)
    emb, lin1, norm, _, lin2, _ = model
    decay, no_decay = param_groups(model, weight_decay=0.05)
    assert set(decay) == {"params", "weight_decay"} == set(no_decay)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: [id(p) for p in ps]  # noqa: E731
    assert ids(decay["params"]) == ids([emb.weight, lin1.weight, lin2.weight])
    assert ids(no_decay["params"]) == ids([lin1.bias, norm.weight, norm.bias, lin2.bias])


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_resumes_identically(foreach):
    straight, resumed = make_mlp(), make_mlp()
    opt = Lamb(lamb_groups(straight), lr=1e-2, foreach=foreach)
    first = Lamb(lamb_groups(resumed), lr=1e-2, foreach=foreach)
    gen_a, gen_b = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    for step in range(4):
        set_random_grads([straight], gen_a, step)
        opt.step()
        set_random_grads([resumed], gen_b, step)
        first.step()
    buf = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "optim": first.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = make_mlp(seed=123)
    resumed.load_state_dict(ckpt["model"])
    second = Lamb(lamb_groups(resumed), lr=1e-2, foreach=foreach)
    second.load_state_dict(ckpt["optim"])
    assert second.state[resumed[1].weight]["step"].dtype == torch.float32
    for step in range(4, 8):
        set_random_grads([straight], gen_a, step)
        opt.step()
        set_random_grads([resumed], gen_b, step)
        second.step()
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


class FakeAllReduce:
    """Sums squared local norms over `world` threads standing in for ranks."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=10)
        self.parts: list[Tensor | None] = [None] * world
        self.calls = [0] * world

    def norm_fn(self, rank: int) -> Callable[[list[Tensor]], list[Tensor]]:
        def global_norms(tensors: list[Tensor]) -> list[Tensor]:
            self.calls[rank] += 1
            self.parts[rank] = torch.stack(local_norms(tensors)).square()
            self.barrier.wait()
            total = sum(self.parts)
            self.barrier.wait()  # nobody overwrites a part before every rank has read
            return list(total.sqrt().unbind(0))

        return global_norms


def run_full_and_sharded(*, hook: bool, steps: int = 5) -> tuple[list[Tensor], list[Tensor]]:
    """Lamb on full tensors, and on their halves split over two thread-ranks."""
    gen = torch.Generator().manual_seed(3)
    full = [torch.randn(s, generator=gen).requires_grad_() for s in [(8, 6), (8,), (4, 4)]]
    shards = [[p.detach().chunk(2)[r].clone().requires_grad_() for p in full] for r in range(2)]
    reduce = FakeAllReduce(world=2)
    hyper = dict(lr=0.05, weight_decay=0.1)
    full_opt = Lamb(full, **hyper)
    shard_opts = [
        Lamb(shards[r], norm_fn=reduce.norm_fn(r) if hook else None, **hyper) for r in range(2)
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(steps):
            for i, p in enumerate(full):
                p.grad = torch.randn(p.shape, generator=gen)
                for r in range(2):
                    shards[r][i].grad = p.grad.chunk(2)[r].clone()
            full_opt.step()
            for job in [pool.submit(opt.step) for opt in shard_opts]:
                job.result()
    assert reduce.calls == ([2 * steps, 2 * steps] if hook else [0, 0])
    joined = [torch.cat([a, b]).detach() for a, b in zip(*shards, strict=True)]
    return [p.detach() for p in full], joined


def test_norm_fn_gives_sharded_lamb_the_full_tensor_norms():
    full, joined = run_full_and_sharded(hook=True)
    # Not bitwise: the full norm sums in a different order than the sum of shard norms.
    for a, b in zip(joined, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # The check has teeth: with shard-local norms the result is visibly different.
    full, joined = run_full_and_sharded(hook=False)
    assert not torch.allclose(joined[0], full[0], rtol=1e-4, atol=1e-5)


def test_norm_fn_is_called_once_for_weights_and_once_for_updates_per_group():
    seen: list[int] = []

    def counting(tensors: list[Tensor]) -> list[Tensor]:
        seen.append(len(tensors))
        return local_norms(tensors)

    model = make_mlp()
    opt = Lamb(lamb_groups(model), norm_fn=counting)
    set_random_grads([model], torch.Generator().manual_seed(4), step=0)
    opt.step()
    assert seen == [2, 2, 1, 1, 4, 4]


def test_build_optimizer_lamb_and_adamw():
    model = make_mlp()
    cfg = OptimConfig(
        name="lamb",
        lr=2e-3,
        beta1=0.8,
        beta2=0.95,
        eps=1e-7,
        weight_decay=0.1,
        bias_correction=False,
        foreach=False,
    )
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, Lamb)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (2e-3, (0.8, 0.95), 1e-7)
    assert group["bias_correction"] is False and group["foreach"] is False

    opt = build_optimizer(
        model, OptimConfig(name="adamw", lr=5e-4, beta2=0.98, weight_decay=0.2, foreach=True)
    )
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.2, 0.0]
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["foreach"]) == (5e-4, (0.9, 0.98), True)


def test_build_optimizer_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"optim\.name.*'sgd'"):
        build_optimizer(make_mlp(), OptimConfig(name="sgd"))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(lr=-1.0), "lr"),
        (dict(eps=-1e-8), "eps"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\]"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
        (dict(weight_decay=-0.1), "weight_decay"),
    ],
)
def test_invalid_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Lamb([torch.zeros(2, requires_grad=True)], **kwargs)


def test_sparse_grads_are_rejected():
    w = torch.zeros(3, 2, requires_grad=True)
    w.grad = torch.zeros(3, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        Lamb([w]).step()


def test_params_without_grad_are_skipped():
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    a.grad = torch.ones(2)
    opt = Lamb([a, b])
    opt.step()
    assert b not in opt.state and torch.equal(b.detach(), torch.ones(2))
    assert not torch.equal(a.detach(), torch.ones(2))


# -- skipping on the device (fp16 loss scaling) ----------------------------------------------


def _state_copy(opt: torch.optim.Optimizer, model: torch.nn.Module) -> list[Tensor]:
    tensors = [p.detach().clone() for p in model.parameters()]
    for state in opt.state.values():
        tensors += [v.detach().clone() for v in state.values() if isinstance(v, Tensor)]
    return tensors


def _poison(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Overflowed gradients: random, with inf and nan in some tensors."""
    set_random_grads([model], gen, 0)
    grads = [p.grad for p in model.parameters()]
    grads[0].view(-1)[0] = float("inf")
    grads[-1].view(-1)[-1] = float("nan")


def test_lamb_skipped_steps_leave_no_trace():
    """Overflowed steps (found_inf = 1, gradients with inf and nan) leave weights, moments
    and step counts bit for bit as they were, stacked expert rows included: a run with
    skips between its steps ends where the same steps without them end. Clean steps agree
    with the host path to float32 rounding."""
    models = [make_mlp(), make_mlp(), make_mlp()]

    def optimizer(model: torch.nn.Module) -> Lamb:
        groups = lamb_groups(model)
        groups[1]["expert_rows"] = True  # one trust ratio per row of lin2.weight
        return Lamb(groups, lr=1e-2)

    skipping, clean, host = (optimizer(m) for m in models)
    clean.found_inf = torch.tensor(0.0)
    gen, bad = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for step in range(8):
        if step in (0, 3, 4):  # the very first step too: counts still 0
            _poison(models[0], bad)
            before = _state_copy(skipping, models[0])
            skipping.found_inf = torch.tensor(1.0)
            skipping.step()
            after = _state_copy(skipping, models[0])
            if step == 0:  # the state made by this step is all zeros: steps, moments
                params = len(list(models[0].parameters()))
                after, made = after[:params], after[params:]
                assert made and not any(t.any() for t in made)
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True)), step
        set_random_grads(models, gen, step)
        skipping.found_inf = torch.tensor(0.0)
        for opt in (skipping, clean, host):
            opt.step()
    for a, b, c in zip(*(m.parameters() for m in models), strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)
    steps = [s["step"].item() for s in skipping.state.values()]
    assert steps == [s["step"].item() for s in host.state.values()] and max(steps) == 8


def test_adamw_built_to_skip_on_the_device():
    """build_optimizer(skip_on_device=True): torch's fused AdamW, which skips a step whose
    found_inf is 1 and otherwise steps as the foreach AdamW does."""
    cfg = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1)
    models = [make_mlp(), make_mlp()]
    fused = build_optimizer(models[0], cfg, skip_on_device=True)
    plain = build_optimizer(models[1], cfg)
    assert fused.defaults["fused"] and not plain.defaults.get("fused")
    gen, bad = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    for step in range(4):
        if step == 2:
            _poison(models[0], bad)
            before = _state_copy(fused, models[0])
            fused.found_inf = torch.tensor(1.0)
            fused.step()
            assert all(
                torch.equal(a, b)
                for a, b in zip(before, _state_copy(fused, models[0]), strict=True)
            )
        set_random_grads(models, gen, step)
        fused.found_inf = torch.tensor(0.0)
        fused.step()
        plain.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
