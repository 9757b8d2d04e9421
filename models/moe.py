"""Switch-style mixture-of-experts layer: a drop-in for the dense MLP of every family.

Switch Transformer (Fedus et al. 2021) routes each token to one expert MLP (top-1, the gate
is the router probability), GShard (Lepikhin et al. 2020) to two (top-2, gates renormalised
to sum to 1). Routing follows the Switch recipe:

* the router is Linear(d_model, E, bias=False), run in float32 with autocast off (the paper's
  "selective precision"), its input multiplied in training by U[1 - eps, 1 + eps] noise;
* each group of tokens (one sequence: a row of the batch) gives every expert
  capacity = max(min_capacity, ceil(capacity_factor x T x top_k / E)) slots; a token
  choice past it gets no expert output and the token passes on the residual. `position`
  keeps earlier tokens first (every first choice before any second choice), `probs` the
  highest gates. With capacity_factor None nothing is dropped;
* the load-balancing loss of a group is E x sum_i f_i P_i, f_i the fraction of its token
  choices that picked expert i (before capacity), P_i its mean router probability; the
  router z-loss (ST-MoE, Zoph et al. 2022) the mean of logsumexp(logits)^2.

Groups of one row make every statistic independent of how the batch is split into
micro-batches or over data-parallel ranks, and they match Hugging Face's
`load_balancing_loss_func` and `router_z_loss_func`, which also take a row as the group.

The losses never pass through the trainer's loss function: the layer attaches their
gradient to its output (`_AttachAuxLoss`), scaled by `aux_weight`, which the trainer sets
before each step to what one row's loss weighs in the objective (so pipeline stages never
pass it on), and by fp16's loss scale (`loss_scale`, a device tensor) as the loss is.
Telemetry (losses, dropped choices, tokens per expert) accumulates in `stats` during
training forwards, never during the recomputation of activation checkpointing, until the
trainer reads it.

Experts keep their weights stacked, row e of every weight being global expert e, so a
checkpoint names experts by global id whatever layout saved it. With a capacity (and
`pad_to_capacity`, the default) `Experts.forward` takes an (E, B x capacity, D) buffer, each
expert's slots padded with zeros, as Switch's and GShard's dispatch tensors do: every shape
follows from the config, so a step never waits for the device to count tokens. Dropless
(or unpadded) it takes the kept choices sorted by expert and the count per expert, which
the host reads. Expert parallelism (parallel/) replaces exactly this call with an
all-to-all dispatch over the local experts.

Shape legend (suffixes of tensor names):
    B  rows (routing groups)        T  tokens per row        D  d_model
    E  experts                      K  choices per token (top_k)
    F  expert inner size            N  token choices sent to experts (after capacity)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import MoeConfig

__all__ = [
    "MoE",
    "Experts",
    "Routing",
    "load_balancing_loss",
    "moe_layers",
    "route",
    "router_z_loss",
    "set_aux_loss_weight",
]

_ACTIVATIONS = {
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "gated_gelu": lambda: nn.GELU(approximate="tanh"),
    "gelu": nn.GELU,
    "relu": nn.ReLU,
}


@dataclass(frozen=True)
class Routing:
    """Where each token choice goes: `experts_BTK` (expert ids), `gates_BTK` (weights of the
    expert outputs), `kept_BTK` (False past capacity) and, with a capacity, `place_BTK`
    (0-based place in its expert's queue of the row; below capacity where kept)."""

    experts_BTK: torch.Tensor
    gates_BTK: torch.Tensor
    kept_BTK: torch.Tensor
    place_BTK: torch.Tensor | None = None


def route(
    probs_BTE: torch.Tensor, *, top_k: int, capacity: int | None, drop_policy: str = "position"
) -> Routing:
    """Top-k choices of every token, each row a group with `capacity` slots per expert."""
    gates_BTK, experts_BTK = probs_BTE.topk(top_k, dim=-1)
    if top_k > 1:  # GShard: the chosen gates renormalised
        gates_BTK = gates_BTK / gates_BTK.sum(-1, keepdim=True)
    if capacity is None:
        return Routing(experts_BTK, gates_BTK, torch.ones_like(experts_BTK, dtype=torch.bool))
    b, t, k = experts_BTK.shape
    e = probs_BTE.shape[-1]
    # Choice-major order: all first choices of the row, then all second choices.
    experts_BC = experts_BTK.transpose(1, 2).reshape(b, k * t)
    onehot_BCE = one_hot(experts_BC, e)
    if drop_policy == "position":
        rank_BCE = onehot_BCE.cumsum(dim=1)  # 1-based place in its expert's queue
    elif drop_policy == "probs":
        score_BC = gates_BTK.transpose(1, 2).reshape(b, k * t)
        # Rank each choice among its expert's choices by descending gate (ties: position).
        order_BC = score_BC.argsort(dim=1, descending=True, stable=True)
        sorted_BCE = onehot_BCE.gather(1, order_BC[..., None].expand(-1, -1, e))
        rank_BCE = torch.empty_like(sorted_BCE).scatter_(
            1, order_BC[..., None].expand(-1, -1, e), sorted_BCE.cumsum(dim=1)
        )
    else:
        raise ValueError(f"model.moe.drop_policy={drop_policy!r} is unknown")
    place_BC = (rank_BCE * onehot_BCE).sum(-1) - 1
    place_BTK = place_BC.view(b, k, t).transpose(1, 2)
    return Routing(experts_BTK, gates_BTK, place_BTK < capacity, place_BTK)


def load_balancing_loss(probs_BTE: torch.Tensor, experts_BTK: torch.Tensor) -> torch.Tensor:
    """Per row, E x sum_i f_i P_i (f from the choices before capacity); summed over rows."""
    e = probs_BTE.shape[-1]
    chosen_BE = one_hot(experts_BTK, e).sum(dim=2).sum(dim=1).to(probs_BTE.dtype)
    f_BE = chosen_BE / experts_BTK[0].numel()
    p_BE = probs_BTE.mean(dim=1)
    return e * (f_BE * p_BE).sum()


def router_z_loss(logits_BTE: torch.Tensor) -> torch.Tensor:
    """Per row, mean over its tokens of logsumexp(logits)^2; summed over rows."""
    return torch.logsumexp(logits_BTE, dim=-1).square().mean(dim=1).sum()


class _AttachAuxLoss(torch.autograd.Function):
    """Identity on `x`; in backward, d(loss)/d(losses[i]) = `weights[i]` (the aux losses'
    weights in the objective, host numbers) times `scale` (fp16's loss scale, a device
    tensor, or None), so their gradient enters at the layer without passing through the
    loss."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        losses: torch.Tensor,
        weights: tuple[float, ...],
        scale: torch.Tensor | None,
    ):
        ctx.weights, ctx.dtype, ctx.device = weights, losses.dtype, losses.device
        ctx.save_for_backward(scale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_x: torch.Tensor):
        # Filled on the device: a tensor made from the host numbers would be a copy to it.
        full = [torch.full((), w, dtype=ctx.dtype, device=ctx.device) for w in ctx.weights]
        grad = torch.stack(full)
        (scale,) = ctx.saved_tensors
        if scale is not None:
            grad = grad * scale.to(ctx.dtype)
        return grad_x, grad, None, None


class _BatchedLinear(torch.autograd.Function):
    """x_EMI times each expert's (out, in) weight transposed, plus its bias: F.linear per
    expert, batched. The weight's gradient is made as (E, out, in), the weight's own layout,
    so autograd stores it without the transposing copy a bmm on the weight's transpose
    costs. Operands are cast to `dtype` first, as autocast casts F.linear's; autograd casts
    the gradients back to the inputs' dtypes."""

    @staticmethod
    def forward(ctx, x_EMI, w_EOI, b_EO, dtype):
        x_EMI, w_EOI = x_EMI.to(dtype), w_EOI.to(dtype)
        ctx.save_for_backward(x_EMI, w_EOI)
        ctx.bias = b_EO is not None
        with torch.autocast(x_EMI.device.type, enabled=False):
            if b_EO is None:
                return torch.bmm(x_EMI, w_EOI.transpose(1, 2))
            return torch.baddbmm(b_EO.to(dtype).unsqueeze(1), x_EMI, w_EOI.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_EMO):
        x_EMI, w_EOI = ctx.saved_tensors
        grad_EMO = grad_EMO.to(x_EMI.dtype)
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        grad_x = torch.bmm(grad_EMO, w_EOI) if need_x else None
        grad_w = torch.bmm(grad_EMO.transpose(1, 2), x_EMI) if need_w else None
        grad_b = grad_EMO.sum(1) if ctx.bias and need_b else None
        return grad_x, grad_w, grad_b, None


def one_hot(index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """F.one_hot(index, num_classes) without its range check, which reads the indices on
    the host on a CPU (here they come from topk, so they are in range)."""
    out = torch.zeros(*index.shape, num_classes, dtype=torch.int64, device=index.device)
    return out.scatter_(-1, index.unsqueeze(-1), 1)


class Experts(nn.Module):
    """E expert MLPs with stacked weights (row e of each is global expert e).

    `forward(x_ND, counts_E)`: tokens sorted by expert, `counts_E[e]` of them for expert e;
    `forward(x_EMD)`: M slots per expert (padded to capacity), expert e on x_EMD[e].
    Weights follow nn.Linear's (out, in) layout, one matrix per expert. Expert parallelism
    replaces `forward` with an all-to-all dispatch and `weights` with this rank's rows.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        ffn_size: int,
        *,
        activation: str,
        bias: bool,
        dropout: float = 0.0,
        init_scale: float = 0.1,
    ):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} has no expert MLP")
        self.num_experts = num_experts
        self.init_scale = init_scale
        self.gated = activation == "gated_gelu"
        self.act = _ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout)
        self.grouped: bool | None = None  # None: grouped GEMM where grouped_mm_runs says
        e, d, f = num_experts, d_model, ffn_size
        self.w_in = nn.Parameter(torch.empty(e, f, d))
        self.w_gate = nn.Parameter(torch.empty(e, f, d)) if self.gated else None
        self.w_out = nn.Parameter(torch.empty(e, d, f))
        self.b_in = nn.Parameter(torch.empty(e, f)) if bias else None
        self.b_gate = nn.Parameter(torch.empty(e, f)) if bias and self.gated else None
        self.b_out = nn.Parameter(torch.empty(e, d)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Truncated normal (at 2 std) with std sqrt(init_scale / fan_in), biases 0."""
        for w in (self.w_in, self.w_gate, self.w_out):
            if w is not None:
                std = math.sqrt(self.init_scale / w.shape[-1])
                nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
        for b in (self.b_in, self.b_gate, self.b_out):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, x: torch.Tensor, counts_E: torch.Tensor | None = None) -> torch.Tensor:
        if counts_E is None:
            return self.compute_padded(x, self.weights())
        return self.compute(x, counts_E, self.weights())

    def weights(self) -> dict[str, torch.Tensor | None]:
        """The weights `compute` uses: this module's own (expert parallelism substitutes the
        local rows of its sharded ones)."""
        names = ("w_in", "w_gate", "w_out", "b_in", "b_gate", "b_out")
        return {name: getattr(self, name) for name in names}

    def compute(
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, w: dict[str, torch.Tensor | None]
    ) -> torch.Tensor:
        """Expert e of `w`'s rows on its counts_E[e] consecutive tokens of x_ND.

        One grouped GEMM per weight where `grouped_mm_runs` says the build and device have
        it (`grouped`: None decides so, True/False force it), else one GEMM per expert. An
        expert without tokens still runs on its empty slice: the output stays joined to
        every weight and to the input, so each backward reaches the same collectives on
        every rank (expert parallelism) and every weight gets a gradient.
        """
        grouped = self.grouped if self.grouped is not None else grouped_mm_runs(x_ND, w)
        if grouped:
            return self._compute_grouped(x_ND, counts_E, w)
        return self._compute_loop(x_ND, counts_E, w)

    def compute_padded(
        self, x_EMD: torch.Tensor, w: dict[str, torch.Tensor | None]
    ) -> torch.Tensor:
        """Expert e of `w`'s rows on x_EMD[e], all experts in one batched GEMM per weight,
        in the autocast dtype when autocast is on (as F.linear would run)."""
        device = x_EMD.device
        dtype = x_EMD.dtype
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)

        def linear(name: str, bias: str, x: torch.Tensor) -> torch.Tensor:
            return _BatchedLinear.apply(x, w[name], w[bias], dtype)

        return self._mlp(linear, x_EMD)

    # Eager inside a compiled block: its shapes are the step's token counts per expert, and
    # a compiled loop would meet a new graph whenever an expert gets 0 or 1 tokens (sizes
    # the compiler specialises on), step after step.
    @torch.compiler.disable
    def _compute_loop(
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, w: dict[str, torch.Tensor | None]
    ) -> torch.Tensor:
        # split and unbind: their backward joins the pieces' gradients once, where slicing
        # or indexing would add a zero-filled tensor of the whole input or weight per expert.
        per_expert = {k: None if v is None else v.unbind(0) for k, v in w.items()}
        x_split = x_ND.split(counts_E.tolist())
        return torch.cat([self._expert(per_expert, e, x) for e, x in enumerate(x_split)])

    def _expert(self, w: dict, e: int, x_nD: torch.Tensor) -> torch.Tensor:
        def linear(name: str, bias: str, x: torch.Tensor) -> torch.Tensor:
            return F.linear(x, w[name][e], None if w[bias] is None else w[bias][e])

        return self._mlp(linear, x_nD)

    def _compute_grouped(
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, w: dict[str, torch.Tensor | None]
    ) -> torch.Tensor:
        """All experts at once: row block e of x_ND times expert e's weight, per weight.

        The operands are cast to the autocast dtype when autocast is on, as F.linear would
        be; biases are gathered per row (grouped_mm's own bias is one for every group).
        """
        device = x_ND.device
        dtype = x_ND.dtype
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        counts = counts_E.to(device=device, dtype=torch.int64)
        offs_E = counts.cumsum(0).to(torch.int32)
        expert_N = torch.repeat_interleave(
            torch.arange(len(counts), device=device), counts, output_size=x_ND.shape[0]
        )

        def linear(name: str, bias: str, x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, enabled=False):
                # (out, in) weights seen as (in, out): the column-major operand the kernels take
                y = _GROUPED_MM(x.to(dtype), w[name].to(dtype).transpose(-2, -1), offs=offs_E)
                return y if w[bias] is None else y + w[bias].to(dtype)[expert_N]

        return self._mlp(linear, x_ND)

    def _mlp(self, linear, x: torch.Tensor) -> torch.Tensor:
        """The expert MLP with `linear(weight name, bias name, input)` doing the products."""
        h = linear("w_in", "b_in", x)
        gate = linear("w_gate", "b_gate", x) if self.gated else h
        h = self.act(gate) * h if self.gated else self.act(h)
        return linear("w_out", "b_out", self.drop(h))


# F.grouped_mm (torch >= 2.10), else the older private name, else None (no grouped path).
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_runs(x_ND: torch.Tensor, w: dict[str, torch.Tensor | None]) -> bool:
    """Whether the experts should take the grouped GEMM: the build has it, the tokens are on
    a CUDA device of compute capability 8.0 or later, the product runs in bfloat16 (bf16
    autocast or bf16 tokens), and every matrix dimension is a multiple of 8 (16-byte rows,
    which the kernels need). Elsewhere (CPU included) the per-expert loop runs."""
    if _GROUPED_MM is None or not x_ND.is_cuda or x_ND.shape[0] == 0:
        return False
    dtype = x_ND.dtype
    if torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
    if dtype != torch.bfloat16 or torch.cuda.get_device_capability(x_ND.device) < (8, 0):
        return False
    return all(d % 8 == 0 for d in w["w_in"].shape[1:])


class MoEStats:
    """Training telemetry of one layer, summed over forwards until `take()`: the aux and z
    losses (per-row sums), rows, token choices and dropped choices, tokens per expert."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.reset()

    def reset(self) -> None:
        self.values: torch.Tensor | None = None  # [aux, z, rows, choices, dropped, load_E...]
        self.skip = 0  # forwards to leave out: a pipeline schedule's shape-inference pass

    def add(self, values: torch.Tensor) -> None:
        if self.skip:
            self.skip -= 1
            return
        values = values.detach().double()
        self.values = values if self.values is None else self.values + values

    def take(self) -> torch.Tensor:
        """The sums since the last call, as float64 [5 + E] on the CPU (zeros if none)."""
        values = self.values
        self.reset()
        if values is None:
            return torch.zeros(5 + self.num_experts, dtype=torch.float64)
        return values.cpu()


class MoE(nn.Module):
    """Router and experts in place of a dense MLP: `forward(x_BTD) -> y_BTD`.

    `output_dropout` is the dropout a dense MLP of the family applies to its output (GPT,
    BERT and GLM; T5's blocks drop the branch themselves).
    """

    def __init__(
        self,
        cfg: MoeConfig,
        *,
        d_model: int,
        ffn_size: int,
        activation: str,
        bias: bool,
        output_dropout: float = 0.0,
        aux_loss_layers: int = 1,
    ):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.router = nn.Linear(d_model, cfg.num_experts, bias=False)
        self.experts = Experts(
            cfg.num_experts,
            d_model,
            ffn_size,
            activation=activation,
            bias=bias,
            dropout=cfg.expert_dropout,
            init_scale=cfg.init_scale,
        )
        self.drop = nn.Dropout(output_dropout)
        # The aux and z losses of all MoE layers are averaged (mean) or summed.
        self.loss_share = 1.0 / aux_loss_layers if cfg.aux_loss_reduce == "mean" else 1.0
        self.aux_weight = 0.0  # the weight of one row's loss in the objective (set per step)
        self.loss_scale: torch.Tensor | None = None  # fp16's loss scale (set per step)
        # Capacity factors of training (True) and evaluation (False) as exact fractions.
        self.capacity_ratios = {mode: cfg.capacity_ratio(training=mode) for mode in (True, False)}
        self.stats = MoEStats(cfg.num_experts)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, mean=0.0, std=0.02)
        self.experts.reset_parameters()

    def router_logits(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """float32 logits, autocast off, the input jittered in training."""
        with torch.autocast(x_BTD.device.type, enabled=False):
            x = x_BTD.float()
            eps = self.cfg.jitter_eps
            if self.training and eps > 0:
                x = x * torch.empty_like(x).uniform_(1.0 - eps, 1.0 + eps)
            return F.linear(x, self.router.weight.float())

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        b, t, d = x_BTD.shape
        cfg = self.cfg
        logits_BTE = self.router_logits(x_BTD)
        probs_BTE = logits_BTE.softmax(dim=-1)
        capacity = cfg.slots(self.capacity_ratios[self.training], t)
        routing = route(probs_BTE, top_k=cfg.top_k, capacity=capacity, drop_policy=cfg.drop_policy)
        if capacity is not None and cfg.pad_to_capacity:
            y_BTD = self._dispatch_padded(x_BTD, routing, capacity)
        else:
            y_BTD = self._dispatch(x_BTD, routing)
        if self.training:
            aux = load_balancing_loss(probs_BTE, routing.experts_BTK)
            z = router_z_loss(logits_BTE)
            self._record(aux, z, routing, rows=b)
            y_BTD = self._attach_losses(y_BTD, aux, z)
        return self.drop(y_BTD)

    def _dispatch(self, x_BTD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Kept choices sorted by expert, through the experts, back weighted by their gates."""
        b, t, d = x_BTD.shape
        k = routing.experts_BTK.shape[-1]
        experts_A = routing.experts_BTK.reshape(-1)
        kept_A = routing.kept_BTK.reshape(-1)
        # Choice a belongs to token a // k; stable sort keeps token order within an expert.
        chosen = kept_A.nonzero().squeeze(1)
        order = experts_A[chosen].argsort(stable=True)
        choice_N = chosen[order]
        token_N = choice_N // k
        counts_E = torch.bincount(experts_A[choice_N], minlength=self.num_experts)
        x_ND = x_BTD.reshape(b * t, d)[token_N]
        y_ND = self.experts(x_ND, counts_E)
        gates_N = routing.gates_BTK.reshape(-1)[choice_N]
        weighted_ND = (y_ND.float() * gates_N[:, None]).to(y_ND.dtype)
        out = x_BTD.new_zeros(b * t, d, dtype=y_ND.dtype)
        out.index_add_(0, token_N, weighted_ND)
        return out.view(b, t, d).to(x_BTD.dtype)

    def _dispatch_padded(
        self, x_BTD: torch.Tensor, routing: Routing, capacity: int
    ) -> torch.Tensor:
        """Every expert's input padded to its capacity, through the experts, back weighted
        by the gates; shapes follow from the batch's and the config's, so nothing is read
        on the host.

        Slot (e, r, p) of the (E, B x C) buffer holds the choice of row r placed p-th in
        expert e's queue; an empty slot holds zeros (its output is never read). Dropped
        choices point at an extra slot past the buffer, which reads zeros back."""
        b, t, d = x_BTD.shape
        e, k = self.num_experts, routing.experts_BTK.shape[-1]
        slots = e * b * capacity
        row_BTK = torch.arange(b, device=x_BTD.device).view(b, 1, 1)
        slot_BTK = (routing.experts_BTK * b + row_BTK) * capacity + routing.place_BTK
        slot_BTK = torch.where(routing.kept_BTK, slot_BTK, slots)
        token_BTK = torch.arange(b * t, device=x_BTD.device).view(b, t, 1).expand(b, t, k)
        # Which token fills each slot: b x t (a zero row) unless a kept choice lands there.
        token_S = torch.full((slots + 1,), b * t, dtype=torch.int64, device=x_BTD.device)
        token_S.scatter_(0, slot_BTK.reshape(-1), token_BTK.reshape(-1))
        x_padded = torch.cat([x_BTD.reshape(b * t, d), x_BTD.new_zeros(1, d)])
        x_EMD = x_padded[token_S[:slots]].view(e, b * capacity, d)
        y_EMD = self.experts(x_EMD)
        y_SD = torch.cat([y_EMD.reshape(slots, d), y_EMD.new_zeros(1, d)])
        y_BTKD = y_SD[slot_BTK]
        weighted = (y_BTKD.float() * routing.gates_BTK[..., None]).to(y_BTKD.dtype)
        return weighted.sum(2).to(x_BTD.dtype)

    def _attach_losses(self, y_BTD: torch.Tensor, aux: torch.Tensor, z: torch.Tensor):
        share = self.loss_share * self.aux_weight
        weights = (self.cfg.aux_loss_coef * share, self.cfg.z_loss_coef * share)
        if not any(weights):
            return y_BTD
        return _AttachAuxLoss.apply(y_BTD, torch.stack([aux, z]), weights, self.loss_scale)

    def _record(self, aux: torch.Tensor, z: torch.Tensor, routing: Routing, *, rows: int):
        if _recomputing():
            return
        kept = routing.kept_BTK
        # Kept choices per expert, counted without selecting them (a selection's size
        # would be read on the host); host numbers enter as fills, not copies.
        load_E = aux.new_zeros(self.num_experts).scatter_add_(
            0, routing.experts_BTK.reshape(-1), kept.reshape(-1).to(aux.dtype)
        )
        head = torch.stack(
            [
                aux.detach(),
                z.detach(),
                torch.full((), float(rows), dtype=aux.dtype, device=aux.device),
                torch.full((), float(kept.numel()), dtype=aux.dtype, device=aux.device),
                (~kept).sum().to(aux.dtype),
            ]
        )
        self.stats.add(torch.cat([head, load_E]))


def _recomputing() -> bool:
    """Whether autograd is re-running this forward in backward (activation checkpointing).
    A compiled graph never is: its recomputation is part of its own backward graph, and an
    eagerly checkpointed region re-runs its Python, where the check is made."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """(name, layer) of every MoE layer of `model`, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def set_aux_loss_weight(
    model: nn.Module, weight: float, *, scale: torch.Tensor | None = None
) -> None:
    """The weight one row's aux and z losses carry in the objective, for the next steps, and
    the loss scale (a device tensor) their gradients carry like the loss's under fp16."""
    for _, layer in moe_layers(model):
        layer.aux_weight = weight
        layer.loss_scale = scale
