"""Loom's mixture-of-experts math against implementations written outside this project.

References: Hugging Face's Switch Transformers (z-loss, load-balancing loss, top-1 router,
sparse MLP), Megatron-Core's MoE utilities (z-loss, load-balancing loss, capacity) and
fairscale's GShard top-2 gate. Each of those tests skips when its package is absent; the
last group checks invariants of Loom's layer on its own.

Shape legend: B rows, T tokens per row, N tokens of one group, D d_model, E experts,
K choices per token, C capacity slots.
"""

from __future__ import annotations

import itertools
import math
import warnings
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from models.config import MoeConfig
from models.moe import MoE, load_balancing_loss, route, router_z_loss
from tests.unit.helpers import one_thread  # noqa: F401 (one_thread: a fixture)

# float64 inputs: the references and Loom then agree to rounding, far inside this.
RTOL64 = 1e-12
# float32 layers: the same products summed in another order (a batched matmul against a
# per-token one) differ by a few ulps; 1e-6 relative is about 8 ulps.
RTOL32, ATOL32 = 1e-6, 1e-6


def _hf_switch():
    return pytest.importorskip(
        "transformers.models.switch_transformers.modeling_switch_transformers"
    )


def _megatron_moe_utils():
    # Without Transformer Engine or Apex, Megatron warns at import; irrelevant here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("megatron.core.transformer.moe.moe_utils")


def _logits(*shape: int, seed: int, bias: list[float] | None = None, dtype=torch.float64):
    """Random router logits, optionally pushed towards the first experts so capacity bites."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, generator=g, dtype=dtype)
    if bias is not None:
        logits = logits + torch.tensor(bias, dtype=dtype)
    return logits


def _layer(*, e: int = 4, d: int = 16, f: int = 32, seed: int = 0, **moe) -> MoE:
    """A float32 MoE layer in eval mode with router jitter off."""
    torch.manual_seed(seed)
    cfg = MoeConfig(num_experts=e, jitter_eps=0.0, **moe)
    layer = MoE(cfg, d_model=d, ffn_size=f, activation="relu", bias=False)
    with torch.no_grad():  # a router far from uniform, so some experts overflow
        layer.router.weight.mul_(50.0)
    return layer.eval()


def _x(b: int, t: int, d: int = 16, *, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(seed))


def _routing_of(layer: MoE, x_BTD: torch.Tensor):
    probs_BTE = layer.router_logits(x_BTD).softmax(dim=-1)
    capacity = layer.cfg.capacity(x_BTD.shape[1], training=layer.training)
    return route(
        probs_BTE, top_k=layer.cfg.top_k, capacity=capacity, drop_policy=layer.cfg.drop_policy
    )


def _output_by_hand(layer: MoE, x_BTD: torch.Tensor, routing) -> torch.Tensor:
    """Sum over the kept choices of a token of gate x expert(token), one token at a time,
    expert e a ReLU MLP without biases read from row e of the stacked weights."""
    w_in_EFD, w_out_EDF = layer.experts.w_in, layer.experts.w_out
    y_BTD = torch.zeros_like(x_BTD)
    b, t, k = routing.experts_BTK.shape
    for i, j, c in itertools.product(range(b), range(t), range(k)):
        if routing.kept_BTK[i, j, c]:
            e = int(routing.experts_BTK[i, j, c])
            expert_D = w_out_EDF[e] @ torch.relu(w_in_EFD[e] @ x_BTD[i, j])
            y_BTD[i, j] += routing.gates_BTK[i, j, c] * expert_D
    return y_BTD


# ---------------------------------------------------------------- router z-loss


def test_router_z_loss_matches_hf():
    hf = _hf_switch()
    logits_BTE = _logits(3, 8, 4, seed=0) * 3
    # Loom sums the per-row means over rows; HF means over all tokens of all rows.
    ours = router_z_loss(logits_BTE) / logits_BTE.shape[0]
    torch.testing.assert_close(ours, hf.router_z_loss_func(logits_BTE), rtol=RTOL64, atol=0)


def test_router_z_loss_matches_megatron():
    mu = _megatron_moe_utils()
    b, t, e = 3, 8, 4
    logits_BTE = _logits(b, t, e, seed=1) * 3
    coeff = 1e-3
    # Megatron returns coeff x the mean of logsumexp^2 over the flattened tokens.
    theirs = mu.z_loss_func(logits_BTE.reshape(b * t, e), z_loss_coeff=coeff) / coeff
    torch.testing.assert_close(router_z_loss(logits_BTE) / b, theirs, rtol=RTOL64, atol=0)


# ---------------------------------------------------------------- load-balancing loss


def test_load_balancing_loss_top1_matches_hf():
    hf = _hf_switch()
    # T = 8 keeps HF's float32 fractions of tokens (count / 8) exact.
    probs_BTE = _logits(3, 8, 4, seed=2, bias=[1.0, 0.5, 0.0, 0.0]).softmax(dim=-1)
    experts_BTK = probs_BTE.topk(1, dim=-1).indices
    # HF: E^2 x mean over rows and experts of f x P = E x sum_i f_i P_i averaged over rows.
    theirs = hf.load_balancing_loss_func(probs_BTE, experts_BTK[..., 0])
    ours = load_balancing_loss(probs_BTE, experts_BTK) / probs_BTE.shape[0]
    torch.testing.assert_close(ours, theirs, rtol=RTOL64, atol=0)


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_loss_per_row_matches_megatron(top_k):
    mu = _megatron_moe_utils()
    b, t, e = 3, 10, 4
    probs_BTE = _logits(b, t, e, seed=3, bias=[1.0, 0.5, 0.0, 0.0]).softmax(dim=-1)
    experts_BTK = probs_BTE.topk(top_k, dim=-1).indices
    total = 0.0
    for i in range(b):
        # Megatron's f_i counts every choice (before capacity) over topk x T.
        tokens_per_expert_E = torch.bincount(experts_BTK[i].reshape(-1), minlength=e)
        theirs = mu.switch_load_balancing_loss_func(
            probs_BTE[i],
            tokens_per_expert_E,
            total_num_tokens=t,
            topk=top_k,
            num_experts=e,
            moe_aux_loss_coeff=1.0,
        )
        ours = load_balancing_loss(probs_BTE[i : i + 1], experts_BTK[i : i + 1])
        torch.testing.assert_close(ours, theirs, rtol=RTOL64, atol=0)
        total = total + theirs
    torch.testing.assert_close(
        load_balancing_loss(probs_BTE, experts_BTK), total, rtol=RTOL64, atol=0
    )


# ---------------------------------------------------------------- capacity


@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_matches_megatron(top_k):
    mu = _megatron_moe_utils()
    # Megatron rounds twice, (T x K / E) x factor; Loom computes factor x T x K / E. Where the
    # exact value is an integer the two can differ by one slot: Megatron's is one over for
    # 1.75 with E = 7 (see test_capacity_is_exact), either can be for 1.1. The grid holds
    # common factors, where they agree.
    grid = itertools.product(
        (2, 4, 8, 64), (0.1, 0.25, 0.5, 1.0, 1.2, 1.25, 1.5, 2.0, 4.0), (0, 1, 4), (1, 7, 64, 1000)
    )
    for e, factor, min_capacity, t in grid:
        cfg = MoeConfig(
            num_experts=e,
            capacity_factor=factor,
            eval_capacity_factor=2 * factor,
            min_capacity=min_capacity,
            top_k=top_k,
        )
        case = (e, factor, min_capacity, t)
        train = mu.get_capacity(
            num_tokens=t * top_k, num_experts=e, capacity_factor=factor, min_capacity=min_capacity
        )
        evaluate = mu.get_capacity(
            num_tokens=t * top_k,
            num_experts=e,
            capacity_factor=2 * factor,
            min_capacity=min_capacity,
        )
        assert cfg.capacity(t, training=True) == train, case
        assert cfg.capacity(t, training=False) == evaluate, case


def test_capacity_none_is_dropless():
    cfg = MoeConfig(num_experts=4, capacity_factor=None, eval_capacity_factor=None, top_k=2)
    assert cfg.capacity(64, training=True) is None
    assert cfg.capacity(64, training=False) is None
    # Each mode reads only its own factor.
    assert MoeConfig(num_experts=4, capacity_factor=None).capacity(64, training=False) == 32
    assert MoeConfig(num_experts=4, eval_capacity_factor=None).capacity(64, training=True) == 20


def test_capacity_is_exact():
    """For factors exact in binary, Loom's capacity is the exact ceiling. Megatron's two
    roundings give 30 for E=7, T=116, factor 1.75 (exactly 29), hence its grid above."""
    assert (
        MoeConfig(num_experts=7, capacity_factor=1.75, min_capacity=0).capacity(116, training=True)
        == 29
    )
    for e, factor, k, t in itertools.product(
        (3, 7, 12), (0.75, 1.25, 1.75, 2.5), (1, 2), range(1, 300)
    ):
        cfg = MoeConfig(num_experts=e, capacity_factor=factor, min_capacity=0, top_k=k)
        assert cfg.capacity(t, training=True) == math.ceil(Fraction(factor) * t * k / e)


# ---------------------------------------------------------------- routing


def test_top1_routing_matches_hf_router():
    hf = _hf_switch()
    b, t, d, e, capacity = 3, 12, 16, 4, 2
    config = hf.SwitchTransformersConfig(
        num_experts=e,
        expert_capacity=capacity,
        d_model=d,
        d_ff=32,
        router_bias=False,
        router_jitter_noise=0.0,
        router_dtype="float32",
    )
    theirs = hf.SwitchTransformersTop1Router(config).eval()
    layer = _layer(e=e, d=d, top_k=1)
    with torch.no_grad():
        theirs.classifier.weight.copy_(layer.router.weight)
    x_BTD = _x(b, t, d)
    with torch.no_grad():
        expert_index_BTE, router_probs_BT1, router_logits_BTE = theirs(x_BTD)
        logits_BTE = layer.router_logits(x_BTD)
    torch.testing.assert_close(logits_BTE, router_logits_BTE, rtol=RTOL32, atol=ATOL32)

    routing = route(logits_BTE.softmax(-1), top_k=1, capacity=capacity, drop_policy="position")
    kept_BTE = F.one_hot(routing.experts_BTK[..., 0], e) * routing.kept_BTK
    assert torch.equal(kept_BTE, expert_index_BTE)
    assert 0 < routing.kept_BTK.sum() < b * t  # capacity dropped some tokens, kept some
    # The Switch gate: the top probability, not renormalised, for dropped tokens too.
    torch.testing.assert_close(routing.gates_BTK, router_probs_BT1, rtol=RTOL32, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top2_routing_matches_fairscale(monkeypatch, seed):
    top2gate = pytest.importorskip("fairscale.nn.moe.top2gate")
    # fairscale picks the second expert by argmax of logits + Gumbel noise; without the
    # noise that is the second-highest probability, GShard's and Loom's second choice.
    monkeypatch.setattr(
        top2gate, "gumbel_rsample", lambda shape, device: torch.zeros(shape, device=device)
    )
    n, e = 32, 4
    logits_NE = _logits(n, e, seed=seed, bias=[2.0, 1.0, 0.0, 0.0], dtype=torch.float32)
    _, combine_NEC, dispatch_NEC = top2gate.top2gating(logits_NE)
    # fairscale groups all N tokens with 2N // E slots per expert: one Loom row, factor 1.
    capacity = combine_NEC.shape[-1]
    cfg = MoeConfig(num_experts=e, top_k=2, capacity_factor=1.0, min_capacity=0)
    assert capacity == 2 * n // e == cfg.capacity(n, training=True)

    probs_1NE = logits_NE.softmax(dim=-1)[None]
    routing = route(probs_1NE, top_k=2, capacity=capacity, drop_policy="position")
    experts_NK, gates_NK, kept_NK = (
        routing.experts_BTK[0],
        routing.gates_BTK[0],
        routing.kept_BTK[0],
    )
    onehot_NKE = F.one_hot(experts_NK, e) * kept_NK[..., None]
    # Same kept (token, expert) pairs: first choices queue by position before any second.
    assert torch.equal(onehot_NKE.sum(1).bool(), dispatch_NEC.any(-1))

    theirs_NE = combine_NEC.sum(-1)
    ours_NE = (onehot_NKE * gates_NK[..., None]).sum(1)
    both = kept_NK.all(-1)
    one = kept_NK.sum(-1) == 1
    assert both.any() and one.any()
    # Both choices kept: the two gates renormalised to sum to 1, in both.
    torch.testing.assert_close(ours_NE[both], theirs_NE[both], rtol=RTOL32, atol=0)
    # One choice dropped: Loom normalises the two gates before capacity, as GShard's
    # pseudo-code (Lepikhin et al. 2020, Algorithm 1) does, so the survivor keeps
    # g / (g1 + g2); fairscale divides by the sum of the kept gates only, giving it 1.
    # Renormalising Loom's kept gates over the kept choices gives fairscale's weights.
    renormalised_NE = ours_NE[one] / ours_NE[one].sum(-1, keepdim=True)
    torch.testing.assert_close(renormalised_NE, theirs_NE[one], rtol=RTOL32, atol=0)
    assert (ours_NE[one].sum(-1) < 1).all()


def test_fairscale_aux_loss_counts_first_choices_only(monkeypatch):
    top2gate = pytest.importorskip("fairscale.nn.moe.top2gate")
    monkeypatch.setattr(
        top2gate, "gumbel_rsample", lambda shape, device: torch.zeros(shape, device=device)
    )
    n, e = 32, 4
    logits_NE = _logits(n, e, seed=4, bias=[2.0, 1.0, 0.0, 0.0], dtype=torch.float32)
    l_aux, _, _ = top2gate.top2gating(logits_NE)
    probs_1NE = logits_NE.softmax(dim=-1)[None]
    experts_1NK = probs_1NE.topk(2, dim=-1).indices
    # fairscale: mean over experts of f_i P_i with f from first choices = Loom's top-1 loss
    # / E^2. Loom's top-2 loss counts both choices (as Megatron's), so it differs.
    ours_top1 = load_balancing_loss(probs_1NE, experts_1NK[..., :1])
    torch.testing.assert_close(ours_top1 / e**2, l_aux, rtol=RTOL32, atol=0)
    assert not torch.isclose(load_balancing_loss(probs_1NE, experts_1NK) / e**2, l_aux)


# ---------------------------------------------------------------- the layer


@pytest.mark.parametrize(
    ("dropless", "pad"),
    [(True, False), (False, True), (False, False)],
    ids=["dropless", "padded", "sorted"],
)
def test_layer_matches_hf_sparse_mlp(dropless, pad):
    hf = _hf_switch()
    b, t, d, f, e = 2, 8, 16, 32, 4
    config = hf.SwitchTransformersConfig(
        num_experts=e,
        expert_capacity=t if dropless else 2,
        d_model=d,
        d_ff=f,
        router_bias=False,
        router_jitter_noise=0.0,
        router_dtype="float32",
        dense_act_fn="relu",
        dropout_rate=0.0,
    )
    theirs = hf.SwitchTransformersSparseMLP(config).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    # Capacity ceil(1.0 x 8 / 4) = 2, HF's expert_capacity; None: nothing dropped.
    layer = _layer(
        e=e,
        d=d,
        f=f,
        top_k=1,
        eval_capacity_factor=None if dropless else 1.0,
        min_capacity=1,
        pad_to_capacity=pad,
    )
    assert layer.cfg.capacity(t, training=False) == (None if dropless else 2)
    with torch.no_grad():
        layer.router.weight.copy_(theirs.router.classifier.weight)
        for i in range(e):
            expert = theirs.experts[f"expert_{i}"]
            layer.experts.w_in[i].copy_(expert.wi.weight)
            layer.experts.w_out[i].copy_(expert.wo.weight)

    x_BTD = _x(b, t, d, seed=6)
    with torch.no_grad():
        expected = theirs(x_BTD)
        kept_BT = theirs.router(x_BTD)[0].any(-1)
        got = layer(x_BTD)
    # transformers 4.x returns (states, router outputs) and, for dropped tokens, the input
    # scaled by its gate; 5.x returns the states alone, zero for dropped tokens.
    if isinstance(expected, tuple):
        expected = expected[0]
    assert kept_BT.all() if dropless else 0 < kept_BT.sum() < b * t
    torch.testing.assert_close(got[kept_BT], expected[kept_BT], rtol=RTOL32, atol=ATOL32)
    assert not got[~kept_BT].any()  # a dropped token adds nothing to the residual


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropped_tokens_get_zero_and_kept_ones_gate_times_expert(top_k):
    # Capacity max(1, ceil(0.25 x 16 x K / 4)) = K slots per expert and row.
    layer = _layer(top_k=top_k, eval_capacity_factor=0.25, min_capacity=1)
    x_BTD = _x(2, 16)
    with torch.no_grad():
        routing = _routing_of(layer, x_BTD)
        got = layer(x_BTD)
        expected = _output_by_hand(layer, x_BTD, routing)
    none_kept_BT = ~routing.kept_BTK.any(-1)
    assert none_kept_BT.any() and not none_kept_BT.all()
    assert torch.equal(got[none_kept_BT], torch.zeros_like(got[none_kept_BT]))
    torch.testing.assert_close(got, expected, rtol=RTOL32, atol=ATOL32)


@pytest.mark.parametrize("top_k", [1, 2])
def test_position_policy_keeps_earliest_and_first_choices_first(top_k):
    b, t, e, capacity = 3, 24, 4, 5
    probs_BTE = _logits(b, t, e, seed=7, bias=[2.0, 1.0, 0.0, 0.0]).softmax(dim=-1)
    routing = route(probs_BTE, top_k=top_k, capacity=capacity, drop_policy="position")
    assert not routing.kept_BTK.all()
    for i, x in itertools.product(range(b), range(e)):
        picked_TK = routing.experts_BTK[i] == x
        kept_TK = routing.kept_BTK[i] & picked_TK
        assert kept_TK.sum() == min(capacity, int(picked_TK.sum())), (i, x)
        for c in range(top_k):
            # Among the tokens whose choice c is expert x, the kept ones come first.
            kept_in_order = kept_TK[picked_TK[:, c], c]
            assert torch.equal(kept_in_order, kept_in_order.sort(descending=True).values)
        if top_k == 2 and kept_TK[:, 1].any():
            # A second choice kept only once every first choice of the expert is.
            assert torch.equal(kept_TK[:, 0], picked_TK[:, 0])


@pytest.mark.parametrize("top_k", [1, 2])
def test_probs_policy_keeps_highest_gates(top_k):
    b, t, e, capacity = 3, 24, 4, 5
    probs_BTE = _logits(b, t, e, seed=8, bias=[2.0, 1.0, 0.0, 0.0]).softmax(dim=-1)
    routing = route(probs_BTE, top_k=top_k, capacity=capacity, drop_policy="probs")
    assert not routing.kept_BTK.all()
    for i, x in itertools.product(range(b), range(e)):
        picked_TK = routing.experts_BTK[i] == x
        kept_TK = routing.kept_BTK[i] & picked_TK
        assert kept_TK.sum() == min(capacity, int(picked_TK.sum())), (i, x)
        dropped_TK = picked_TK & ~kept_TK
        if dropped_TK.any():
            gates_TK = routing.gates_BTK[i]
            assert gates_TK[kept_TK].min() >= gates_TK[dropped_TK].max(), (i, x)


@pytest.mark.parametrize("top_k", [1, 2])
def test_dropless_keeps_every_choice(top_k):
    # Every token prefers expert 0: any finite capacity would drop most of them.
    probs_BTE = _logits(2, 16, 4, seed=9, bias=[8.0, 1.0, 0.0, 0.0]).softmax(dim=-1)
    routing = route(probs_BTE, top_k=top_k, capacity=None)
    assert (routing.experts_BTK[..., 0] == 0).all() and routing.kept_BTK.all()

    layer = _layer(top_k=top_k, capacity_factor=None, eval_capacity_factor=None)
    x_BTD = _x(2, 16)
    with torch.no_grad():
        routing = _routing_of(layer, x_BTD)
        got = layer(x_BTD)
        expected = _output_by_hand(layer, x_BTD, routing)
    assert routing.kept_BTK.all()
    torch.testing.assert_close(got, expected, rtol=RTOL32, atol=ATOL32)


@pytest.mark.parametrize("top_k", [1, 2])
def test_routing_is_per_row(top_k):
    layer = _layer(top_k=top_k, eval_capacity_factor=0.5, min_capacity=1)
    x_BTD = _x(4, 16)
    with torch.no_grad():
        whole = layer(x_BTD)
        assert not _routing_of(layer, x_BTD).kept_BTK.all()  # capacity is in play
        for i in range(4):
            torch.testing.assert_close(
                layer(x_BTD[i : i + 1])[0], whole[i], rtol=RTOL32, atol=ATOL32
            )
        torch.testing.assert_close(layer(x_BTD[1:3]), whole[1:3], rtol=RTOL32, atol=ATOL32)


@pytest.mark.parametrize("top_k", [1, 2])
def test_losses_and_stats_add_over_rows(top_k):
    logits_BTE = _logits(4, 16, 4, seed=10, bias=[1.0, 0.5, 0.0, 0.0])
    probs_BTE = logits_BTE.softmax(dim=-1)
    experts_BTK = probs_BTE.topk(top_k, dim=-1).indices
    parts = (slice(0, 2), slice(2, 4))
    aux = sum(load_balancing_loss(probs_BTE[s], experts_BTK[s]) for s in parts)
    z = sum(router_z_loss(logits_BTE[s]) for s in parts)
    torch.testing.assert_close(
        aux, load_balancing_loss(probs_BTE, experts_BTK), rtol=RTOL64, atol=0
    )
    torch.testing.assert_close(z, router_z_loss(logits_BTE), rtol=RTOL64, atol=0)

    # The layer's training telemetry (losses, rows, choices, dropped, load) adds the same way.
    layer = _layer(top_k=top_k, capacity_factor=0.5, min_capacity=1).train()
    x_BTD = _x(4, 16)
    with torch.no_grad():
        for s in parts:
            layer(x_BTD[s])
        split = layer.stats.take()
        layer(x_BTD)
        whole = layer.stats.take()
    assert whole[4] > 0  # some choices were dropped
    torch.testing.assert_close(split, whole, rtol=RTOL32, atol=0)
