"""Optimizers: LAMB (with seams for sharded trust-ratio norms and for ZeRO's flat
partitions), parameter groups, and the builder that turns an `OptimConfig` into a torch
optimizer.

The learning rate given here is the peak; the scheduler overwrites `group["lr"]` every
step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from models.moe import Experts
from parallel.flat_layout import FlatLayout

if TYPE_CHECKING:
    from trainer.config import OptimConfig

NormFn = Callable[[list[Tensor]], list[Tensor]]
"""Maps a list of (possibly sharded) local tensors to the L2 norms of the full tensors."""


ReduceFn = Callable[[Tensor, FlatLayout], Tensor]
"""Sums a float64 tensor over the ranks of `layout.group`; returns the sum (it may be a new
tensor, on another device). Every rank calls it once per flat tensor per step."""


def local_norms(tensors: list[Tensor], *, foreach: bool = True) -> list[Tensor]:
    """L2 norm of each tensor as it is held locally (no communication)."""
    if not tensors:
        return []
    if foreach:
        return list(torch._foreach_norm(tensors, 2))
    return [torch.linalg.vector_norm(t) for t in tensors]


class Lamb(torch.optim.Optimizer):
    """LAMB, Algorithm 2 of You et al. 2019, "Large Batch Optimization for Deep Learning".

    For each tensor w with gradient g at step t::

        m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
        m_hat = m / (1 - b1^t)           v_hat = v / (1 - b2^t)     (if bias_correction)
        u = m_hat / (sqrt(v_hat) + eps) + weight_decay * w
        r = ||w|| / ||u||  (1 when either norm is 0)
        w = w - lr * r * u

    Weight decay is decoupled and read from each param group, so biases and norm weights
    can sit in a group with weight_decay 0. Params whose grad is None are skipped.

    Two implementations give bitwise-identical results on CPU: a per-tensor loop and a
    multi-tensor path built on `torch._foreach_*`. `foreach=None` picks the multi-tensor
    path when every param with a grad is on CUDA, where it saves kernel launches, and the
    loop elsewhere: on CPU the loop is faster, since each tensor stays in cache across
    its ops (see bench/lamb_foreach.py). Either path holds one group's updates
    at once, because the update norms are taken in one batch. Sparse grads raise
    RuntimeError.

    Sharding seam: when a tensor is sharded across ranks (ZeRO-3, tensor parallel) the
    trust ratio must use the norm of the full tensor, not of the local shard. All norms
    go through `norm_fn`, which receives a list of local tensors and returns one 0-dim
    tensor per entry holding the norm of the corresponding full tensor. Each step calls
    it exactly twice per param group that has at least one grad, with all of the group's
    tensors at once: first with the weights, then with the updates `u` (the i-th update
    belongs to the i-th weight). A distributed wrapper can therefore sum squared local
    norms across ranks in a single collective per call; it must see the same tensors, in
    the same order, on every rank. The default computes local norms.

    Flat partitions: ZeRO engines hand the optimizer one flat tensor per group holding this
    rank's slice of many concatenated tensors. `set_flat_layouts` says which pieces of each
    flat tensor belong to which original tensor; the moments and updates stay elementwise
    on the whole flat tensor, while norms and the trust-ratio apply go per piece, so each
    original tensor still gets its own trust ratio. Tensors cut by a partition boundary get
    their full norms from squared piece norms summed by `reduce_fn` (one call per flat
    tensor per step, a float64 buffer, so an unsplit tensor's norm is bit for bit the one
    Lamb computes on the tensor itself).

    Skipping on the device: with `found_inf` set (a 0-dim float tensor on the params'
    device, 1.0 when fp16 gradients overflowed, as torch's fused Adam reads it) a step
    leaves weights, moments and step counts exactly as they were when it is 1.0, and is an
    ordinary step when it is 0.0, without the host reading it. Those steps keep their step
    counts on the device and take the bias corrections there (`_skippable_updates`), so
    they round slightly differently from the two paths above.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
        bias_correction: bool = True,
        *,
        foreach: bool | None = None,
        norm_fn: NormFn | None = None,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Lamb: lr={lr} must be >= 0")
        if eps < 0.0:
            raise ValueError(f"Lamb: eps={eps} must be >= 0")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Lamb: betas[{i}]={beta} must be in [0, 1)")
        if weight_decay < 0.0:
            raise ValueError(f"Lamb: weight_decay={weight_decay} must be >= 0")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            bias_correction=bias_correction,
            foreach=foreach,
        )
        super().__init__(params, defaults)
        # Kept off the param groups: a callable there would not survive state_dict()
        # loading with torch.load(weights_only=True).
        self.norm_fn = norm_fn
        self.flat_layouts: dict[Tensor, FlatLayout] = {}
        self.reduce_fn: ReduceFn | None = None
        self.found_inf: Tensor | None = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("norm_fn", None)
        self.__dict__.setdefault("flat_layouts", {})
        self.__dict__.setdefault("reduce_fn", None)
        self.__dict__.setdefault("found_inf", None)
        for group in self.param_groups:
            group.setdefault("bias_correction", True)
            group.setdefault("foreach", None)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skippable = self.found_inf is not None
        for group in self.param_groups:
            params, grads, exp_avgs, exp_avg_sqs, steps = self._gather(group, skippable)
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                # Multi-tensor kernels save launches on CUDA; on CPU the per-tensor loop is
                # faster (each tensor stays in cache; bench/lamb_foreach.py).
                foreach = all(p.device.type == "cuda" for p in params)
            hyper = {key: group[key] for key in _UPDATE_KEYS}
            lr: float | Tensor = group["lr"]
            if not skippable:
                update_fn = _foreach_updates if foreach else _loop_updates
                updates = update_fn(params, grads, exp_avgs, exp_avg_sqs, steps, **hyper)
            else:
                keep = 1.0 - self.found_inf  # 0.0: the step changes nothing
                updates = _skippable_updates(
                    params, grads, exp_avgs, exp_avg_sqs, steps, keep=keep, **hyper
                )
                lr = keep * lr  # w - 0 x r x u: the weights stay as they were
            if group.get("expert_rows"):
                _expert_rows_apply(params, updates, lr=lr)
                continue
            if self.flat_layouts:
                self._flat_apply(params, updates, lr=lr, foreach=foreach)
                continue
            w_norms = self._norms(params, foreach=foreach)
            u_norms = self._norms(updates, foreach=foreach)
            apply_fn = _foreach_apply if foreach else _loop_apply
            apply_fn(params, updates, w_norms, u_norms, lr=lr)
        return loss

    def _gather(self, group: dict[str, Any], steps_on_device: bool) -> tuple[list[Tensor], ...]:
        """The group's params that have grads, with their grads and (lazily made) state;
        `steps_on_device` moves step counts to their params' devices (the skippable path
        counts there; a loaded checkpoint brings them back on the CPU)."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Lamb does not support sparse gradients")
            state = self._init_state(p)
            if steps_on_device and state["step"].device != p.device:
                state["step"] = state["step"].to(p.device)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, exp_avgs, exp_avg_sqs, steps

    def set_flat_layouts(
        self,
        layouts: Mapping[Tensor, FlatLayout],
        *,
        reduce_fn: ReduceFn | None = None,
        init_state: bool = True,
    ) -> None:
        """Treat each key of `layouts` (a flat 1-D param of this optimizer) as a partition.

        Once set, every param that has a grad at `step` must have a layout. `reduce_fn`
        sums the squared piece norms over `layout.group` (None: no other rank holds pieces).
        `init_state` creates the moments now rather than lazily at the first step, so an
        engine that links state to its own bookkeeping after the first step finds it, and
        a checkpoint can be loaded before any step.
        """
        if self.norm_fn is not None:
            raise ValueError("Lamb: flat layouts and norm_fn are exclusive; construct without one")
        # Empty while an engine assigns its partitions only during step (DeepSpeed ZeRO-3).
        known = {id(p) for group in self.param_groups for p in group["params"]}
        for flat, layout in layouts.items():
            if flat.dim() != 1:
                raise ValueError(f"Lamb: flat layout tensors must be 1-D, not {tuple(flat.shape)}")
            layout.check(flat.numel())
            if known and id(flat) not in known:
                raise ValueError(
                    f"Lamb: a flat tensor of {flat.numel()} elements is not one of its params"
                )
        self.flat_layouts = dict(layouts)
        self.reduce_fn = reduce_fn
        if init_state:
            for flat in self.flat_layouts:
                self._init_state(flat)

    def _init_state(self, p: Tensor) -> dict[str, Tensor]:
        state = self.state[p]
        if not state:
            # step lives on the CPU as float32, like torch.optim.Adam, so reading it for
            # the bias correction never syncs a GPU and state_dict round-trips.
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _flat_apply(
        self, params: list[Tensor], updates: list[Tensor], *, lr: float | Tensor, foreach: bool
    ) -> None:
        """w -= lr * r * u piece by piece, r taken per original tensor across all ranks."""
        for p, u in zip(params, updates, strict=True):
            layout = self.flat_layouts.get(p)
            if layout is None:
                raise RuntimeError(
                    f"Lamb: a param of shape {tuple(p.shape)} has a grad but no flat layout; "
                    "pass every partition to set_flat_layouts()"
                )
            w_pieces, u_pieces = layout.pieces(p), layout.pieces(u)
            w_norms, u_norms = self._full_norms(w_pieces, u_pieces, layout, p, foreach=foreach)
            if not w_pieces:
                continue  # this rank holds only padding of this flat tensor
            # Elementwise on the (num_tensors,) vectors: rounds as _foreach_apply does.
            scales_vec = _trust_ratio(w_norms, u_norms).mul_(-lr)
            ids = layout.ids_on(scales_vec.device)
            scales = list(scales_vec.index_select(0, ids).to(u.dtype).unbind(0))
            if foreach:
                torch._foreach_addcmul_(w_pieces, u_pieces, scales)
            else:
                for w, v, scale in zip(w_pieces, u_pieces, scales, strict=True):
                    w.addcmul_(v, scale)

    def _full_norms(
        self,
        w_pieces: list[Tensor],
        u_pieces: list[Tensor],
        layout: FlatLayout,
        flat: Tensor,
        *,
        foreach: bool,
    ) -> tuple[Tensor, Tensor]:
        """Norms of every original tensor of `layout` (weights, updates), as (num_tensors,)."""
        # A tensor's squared norm is the sum of its pieces' squared norms. fp32 norms
        # square exactly in float64, so a tensor held whole gets its own norm back.
        sq = torch.zeros(2, layout.num_tensors, dtype=torch.float64, device=flat.device)
        if w_pieces:
            ids = layout.ids_on(flat.device)
            w = torch.stack(local_norms(w_pieces, foreach=foreach)).double()
            u = torch.stack(local_norms(u_pieces, foreach=foreach)).double()
            sq[0].index_add_(0, ids, w * w)
            sq[1].index_add_(0, ids, u * u)
        if self.reduce_fn is not None:
            sq = self.reduce_fn(sq, layout)
        norms = sq.to(flat.device).sqrt_().to(flat.dtype)
        return norms[0], norms[1]

    def _norms(self, tensors: list[Tensor], *, foreach: bool) -> list[Tensor]:
        if self.norm_fn is None:
            return local_norms(tensors, foreach=foreach)
        norms = list(self.norm_fn(tensors))
        if len(norms) != len(tensors):
            raise RuntimeError(
                f"Lamb: norm_fn returned {len(norms)} norms for {len(tensors)} tensors"
            )
        return norms


_UPDATE_KEYS = ("betas", "eps", "weight_decay", "bias_correction")


def _bias_factors(steps: list[Tensor], betas: tuple[float, float]) -> tuple[list, list]:
    """Per tensor, eps * sqrt(c2) and sqrt(c2) / c1, with c_i = 1 - beta_i^t.

    m_hat / (sqrt(v_hat) + eps) equals (sqrt(c2) / c1) * m / (sqrt(v) + eps * sqrt(c2)),
    which saves two full passes over each tensor per step.
    """
    beta1, beta2 = betas
    # Steps may differ within a group (a param whose grad was None for a while).
    c1 = [1.0 - beta1 ** s.item() for s in steps]
    c2 = [1.0 - beta2 ** s.item() for s in steps]
    return [math.sqrt(b) for b in c2], [math.sqrt(b) / a for a, b in zip(c1, c2, strict=True)]


def _loop_updates(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    bias_correction: bool,
) -> list[Tensor]:
    """Advance the moments one tensor at a time and return the updates u."""
    beta1, beta2 = betas
    updates = []
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        step.add_(1.0)
        m.lerp_(g, 1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        (sqrt_c2,), (ratio,) = _bias_factors([step], betas) if bias_correction else ([1.0], [1.0])
        denom = v.sqrt().add_(eps * sqrt_c2)
        if weight_decay != 0.0:
            u = p.mul(weight_decay).addcdiv_(m, denom, value=ratio)
        else:
            u = m.div(denom).mul_(ratio)
        updates.append(u)
    return updates


def _foreach_updates(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    bias_correction: bool,
) -> list[Tensor]:
    """Same arithmetic as `_loop_updates`, op for op, with multi-tensor kernels."""
    beta1, beta2 = betas
    torch._foreach_add_(steps, 1.0)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    n = len(params)
    sqrt_c2, ratios = _bias_factors(steps, betas) if bias_correction else ([1.0] * n, [1.0] * n)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denoms, [eps * s for s in sqrt_c2])
    if weight_decay != 0.0:
        updates = torch._foreach_mul(params, weight_decay)
        torch._foreach_addcdiv_(updates, exp_avgs, denoms, ratios)
    else:
        updates = torch._foreach_div(exp_avgs, denoms)
        torch._foreach_mul_(updates, ratios)
    return list(updates)


def _skippable_updates(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    steps: list[Tensor],
    *,
    keep: Tensor,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    bias_correction: bool,
) -> list[Tensor]:
    """The moments and step counts advanced by `keep` (1.0: one step; 0.0: exactly none)
    and the updates u, with every factor a device tensor. Gradients are zeroed where not
    finite (in place: the engine drops them after the step), so a skipped step's update
    is finite and adds nothing once scaled by keep x lr."""
    beta1, beta2 = betas
    w1, w2 = keep * (1.0 - beta1), keep * (1.0 - beta2)
    updates = []
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps, strict=True):
        g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        step.add_(keep)
        m.lerp_(g, w1)  # m + w1 (g - m): m itself when w1 is 0
        v.lerp_(g * g, w2)
        denom = v.sqrt()
        if bias_correction:  # a count still 0 (every step skipped so far) corrects as 1
            t = step.clamp(min=1.0)
            sqrt_c2 = (1.0 - torch.pow(beta2, t)).sqrt()
            denom.add_(eps * sqrt_c2).mul_((1.0 - torch.pow(beta1, t)) / sqrt_c2)
        else:
            denom.add_(eps)
        u = m.div(denom)
        if weight_decay != 0.0:
            u.add_(p, alpha=weight_decay)
        updates.append(u)
    return updates


def _trust_ratio(w_norm: Tensor, u_norm: Tensor) -> Tensor:
    # A zero-initialised weight or a zero update would give 0 or inf; LAMB uses 1 there.
    ok = (w_norm > 0) & (u_norm > 0)
    return torch.where(ok, w_norm / u_norm, torch.ones_like(w_norm))


def _loop_apply(
    params: list[Tensor],
    updates: list[Tensor],
    w_norms: list[Tensor],
    u_norms: list[Tensor],
    *,
    lr: float | Tensor,
) -> None:
    for p, u, w_norm, u_norm in zip(params, updates, w_norms, u_norms, strict=True):
        # Scaling by a tensor rather than a Python float avoids a device sync per tensor.
        scale = _trust_ratio(w_norm, u_norm).mul_(-lr).to(u.dtype)
        p.addcmul_(u, scale)


def _foreach_apply(
    params: list[Tensor],
    updates: list[Tensor],
    w_norms: list[Tensor],
    u_norms: list[Tensor],
    *,
    lr: float | Tensor,
) -> None:
    # Elementwise ops on the stacked norms round exactly as the 0-dim ops in _loop_apply.
    if len({n.device for n in w_norms + u_norms}) == 1:
        scales_vec = _trust_ratio(torch.stack(w_norms), torch.stack(u_norms)).mul_(-lr)
        scales = list(scales_vec.unbind(0))
    else:
        scales = [_trust_ratio(w, u).mul_(-lr) for w, u in zip(w_norms, u_norms, strict=True)]
    scales = [s.to(u.dtype) for s, u in zip(scales, updates, strict=True)]
    torch._foreach_addcmul_(params, updates, scales)


def _expert_rows_apply(params: list[Tensor], updates: list[Tensor], *, lr: float | Tensor) -> None:
    """w -= lr * r * u with one trust ratio per row: a stacked expert weight holds one matrix
    (or bias) per expert, and each gets the ratio of its own norms. On a DTensor sharded by
    rows (expert parallelism, FSDP) the row norms are the full rows' norms."""
    for p, u in zip(params, updates, strict=True):
        w_norms = torch.linalg.vector_norm(p.flatten(1), dim=1)
        u_norms = torch.linalg.vector_norm(u.flatten(1), dim=1)
        scale = _trust_ratio(w_norms, u_norms).mul_(-lr).to(u.dtype)
        p.addcmul_(u, scale.view(-1, *([1] * (p.dim() - 1))))


def param_groups(model: torch.nn.Module, *, weight_decay: float) -> list[dict[str, Any]]:
    """Groups in `named_parameters` order: matrices (linear and embedding weights) with
    `weight_decay`, and everything with ndim < 2 (biases, norm weights) without. The
    stacked weights of mixture-of-experts layers (one matrix or bias per expert) form two
    more groups, flagged `expert_rows`, where LAMB takes one trust ratio per expert.

    Decaying gains and biases only pulls them toward 0 for no regularising benefit.
    Frozen params (requires_grad False) are left out.
    """
    stacked = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    decay, no_decay, expert_decay, expert_no_decay = [], [], [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in stacked:  # a row per expert: its matrices decay, its biases do not
            (expert_decay if p.ndim >= 3 else expert_no_decay).append(p)
        else:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if stacked:
        groups += [
            {"params": expert_decay, "weight_decay": weight_decay, "expert_rows": True},
            {"params": expert_no_decay, "weight_decay": 0.0, "expert_rows": True},
        ]
    return groups


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, *, skip_on_device: bool = False
) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.name`, at the peak learning rate `cfg.lr`.

    `skip_on_device` (fp16 loss scaling): the optimizer must skip a step whose `found_inf`
    says the gradients overflowed without reading it on the host. Loom's LAMB does; AdamW
    is then torch's fused kernel, the one that reads `found_inf` (optim.foreach is moot)."""
    groups = param_groups(model, weight_decay=cfg.weight_decay)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.fused_lamb:
        return _fused_lamb(groups, cfg)
    if cfg.name == "lamb":
        return Lamb(
            groups,
            lr=cfg.lr,
            betas=betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            bias_correction=cfg.bias_correction,
            foreach=cfg.foreach,
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            groups,
            lr=cfg.lr,
            betas=betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            foreach=None if skip_on_device else cfg.foreach,
            fused=skip_on_device or None,
        )
    raise ValueError(f"optim.name={cfg.name!r} is unknown; choose 'adamw' or 'lamb'")


def _fused_lamb(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """DeepSpeed's FusedLamb CUDA kernel (optim.fused_lamb=true, with the DeepSpeed engine).

    Under ZeRO it takes one trust ratio per flat partition and clamps it to [0.01, 10], so
    it does not reproduce Loom's LAMB; it is an opt-in.
    """
    if cfg.name != "lamb":
        raise ValueError(f"optim.fused_lamb=true needs optim.name=lamb, got {cfg.name!r}")
    if not torch.cuda.is_available():
        raise ValueError(
            "optim.fused_lamb=true: DeepSpeed's FusedLamb is a CUDA kernel and no CUDA device "
            "is visible (set optim.fused_lamb=false for Loom's LAMB)"
        )
    from deepspeed.ops.lamb import FusedLamb

    return FusedLamb(
        groups,
        lr=cfg.lr,
        bias_correction=cfg.bias_correction,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=0.0,  # clipping is DeepSpeed's gradient_clipping
    )
