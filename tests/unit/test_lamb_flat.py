"""Lamb on flat partitions (ZeRO's view of the params): identical to Lamb on the tensors
themselves, in one process and split over two thread-ranks, and strict about layouts."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import Tensor

from trainer.optim import FlatLayout, Lamb, param_groups

HYPER = dict(lr=2e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)
PAD = 3  # padding elements after every tensor, filled with garbage


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Embedding(13, 7),
        torch.nn.Linear(7, 11),
        torch.nn.LayerNorm(11),
        torch.nn.Linear(11, 5),
    )


def random_grads(shapes: list[torch.Size], gen: torch.Generator) -> list[Tensor]:
    return [torch.randn(s, generator=gen) for s in shapes]


def pack(tensors: list[Tensor], *, pad: int) -> tuple[Tensor, FlatLayout]:
    """One flat tensor holding `tensors` back to back, `pad` NaNs after each."""
    numels = tuple(t.numel() for t in tensors)
    flat = torch.full((sum(numels) + pad * len(tensors),), float("nan"))
    starts, offset = [], 0
    for t in tensors:
        flat[offset : offset + t.numel()] = t.detach().flatten()
        starts.append(offset)
        offset += t.numel() + pad
    layout = FlatLayout(
        starts=tuple(starts),
        lengths=numels,
        tensor_ids=tuple(range(len(tensors))),
        offsets=(0,) * len(tensors),
        numels=numels,
    )
    return flat, layout


@pytest.mark.parametrize("foreach", [True, False])
def test_flat_layouts_with_garbage_padding_equal_plain_lamb_bitwise(foreach):
    model = make_model()
    groups = param_groups(model, weight_decay=HYPER["weight_decay"])
    plain = Lamb(groups, foreach=foreach, **HYPER)
    flats, layouts, flat_groups = [], {}, []
    for g in groups:
        flat, layout = pack(g["params"], pad=PAD)
        flats.append(flat)
        layouts[flat] = layout
        flat_groups.append({"params": [flat], "weight_decay": g["weight_decay"]})
    opt = Lamb(flat_groups, foreach=foreach, **HYPER)
    opt.set_flat_layouts(layouts)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        for g, flat in zip(groups, flats, strict=True):
            grads = random_grads([p.shape for p in g["params"]], gen)
            for p, grad in zip(g["params"], grads, strict=True):
                p.grad = grad
            flat.grad = torch.full_like(flat, 1e30)  # garbage in the padding, too
            for piece, grad in zip(layouts[flat].pieces(flat.grad), grads, strict=True):
                piece.copy_(grad.flatten())
        plain.step()
        opt.step()
    for g, flat in zip(groups, flats, strict=True):
        layout = layouts[flat]
        for p, w, m in zip(
            g["params"], layout.pieces(flat), layout.pieces(opt.state[flat]["exp_avg"]), strict=True
        ):
            assert torch.equal(p.detach().flatten(), w)
            assert torch.equal(plain.state[p]["exp_avg"].flatten(), m)
        assert torch.isnan(flat).sum() == PAD * len(g["params"])  # padding never written


class ThreadAllReduce:
    """Sums a tensor over `world` threads standing in for ranks; counts the calls."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=10)
        self.parts: dict[int, Tensor] = {}
        self.calls = 0
        self.lock = threading.Lock()

    def for_rank(self, rank: int):
        def reduce(tensor: Tensor, layout: FlatLayout) -> Tensor:
            assert layout.group == "dp"
            with self.lock:
                self.calls += 1
            self.parts[rank] = tensor.clone()
            self.barrier.wait()
            total = sum(self.parts[r] for r in sorted(self.parts))
            self.barrier.wait()
            return total

        return reduce


def split_layout(numels: list[int], rank: int, size: int) -> FlatLayout:
    """ZeRO-1/2 style: rank r holds elements [r * size, (r + 1) * size) of the concatenation."""
    lo, hi = rank * size, (rank + 1) * size
    starts, lengths, ids, offsets, begin = [], [], [], [], 0
    for tid, n in enumerate(numels):
        a, b = max(begin, lo), min(begin + n, hi)
        if a < b:
            starts.append(a - lo)
            lengths.append(b - a)
            ids.append(tid)
            offsets.append(a - begin)
        begin += n
    return FlatLayout(
        starts=tuple(starts),
        lengths=tuple(lengths),
        tensor_ids=tuple(ids),
        offsets=tuple(offsets),
        numels=tuple(numels),
        group="dp",
    )


def run_split(*, reduce: bool, steps: int = 4) -> tuple[list[Tensor], list[Tensor], int]:
    """Plain Lamb on whole tensors vs two thread-ranks each holding half of their
    concatenation (boundaries cut tensors in the middle); returns both final weights."""
    gen = torch.Generator().manual_seed(5)
    full = [torch.randn(s, generator=gen).requires_grad_() for s in [(6, 5), (9,), (4, 7)]]
    numels = [p.numel() for p in full]
    size = (sum(numels) + 1) // 2  # odd total: the last rank gets one padding element
    concat = torch.cat([p.detach().flatten() for p in full] + [torch.zeros(1)])
    flats = [concat[r * size : (r + 1) * size].clone() for r in range(2)]
    layouts = [split_layout(numels, r, size) for r in range(2)]
    reducer = ThreadAllReduce(world=2)
    opts = []
    for r in range(2):
        opt = Lamb([flats[r]], **HYPER)
        opt.set_flat_layouts(
            {flats[r]: layouts[r]}, reduce_fn=reducer.for_rank(r) if reduce else None
        )
        opts.append(opt)
    plain = Lamb(full, **HYPER)
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(steps):
            grads = random_grads([p.shape for p in full], gen)
            for p, g in zip(full, grads, strict=True):
                p.grad = g
            flat_grad = torch.cat([g.flatten() for g in grads] + [torch.zeros(1)])
            for r in range(2):
                flats[r].grad = flat_grad[r * size : (r + 1) * size].clone()
            plain.step()
            list(pool.map(lambda o: o.step(), opts))
    joined = torch.cat(flats)[: sum(numels)].split(numels)
    return (
        [p.detach() for p in full],
        [j.view(p.shape) for j, p in zip(joined, full, strict=True)],
        reducer.calls,
    )


def test_tensors_split_across_ranks_get_full_tensor_trust_ratios():
    want, got, calls = run_split(reduce=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert calls == 2 * 4  # one reduction per flat tensor per step, on each rank
    # The check has teeth: norms of the local pieces alone give visibly different weights.
    want, got, _ = run_split(reduce=False)
    assert not all(
        torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(got, want, strict=True)
    )


def layout_of(**kwargs) -> FlatLayout:
    base = dict(starts=(0, 4), lengths=(4, 2), tensor_ids=(0, 1), offsets=(0, 0), numels=(4, 2))
    return FlatLayout(**{**base, **kwargs}, names=("a", "b"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(starts=(0, 3)), "overlaps"),
        (dict(starts=(0, 5)), "exceeds 6"),
        (dict(offsets=(1, 0)), "exceeds the tensor's 4"),
        (dict(tensor_ids=(0, 2)), "tensor id 2"),
        (dict(lengths=(4,)), "differ in length"),
    ],
)
def test_bad_layouts_are_refused(kwargs, match):
    flat = torch.zeros(6)
    opt = Lamb([flat], **HYPER)
    with pytest.raises(ValueError, match=match):
        opt.set_flat_layouts({flat: layout_of(**kwargs)})


def test_layouts_must_name_the_optimizers_own_1d_params():
    flat, other = torch.zeros(6), torch.zeros(6)
    with pytest.raises(ValueError, match="not one of its params"):
        Lamb([flat], **HYPER).set_flat_layouts({other: layout_of()})
    square = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="1-D"):
        Lamb([square], **HYPER).set_flat_layouts({square: layout_of()})
    with pytest.raises(ValueError, match="norm_fn"):
        Lamb([flat], norm_fn=lambda ts: ts, **HYPER).set_flat_layouts({flat: layout_of()})


def test_a_param_without_layout_fails_at_step():
    flat, loose = torch.zeros(6), torch.ones(3)
    opt = Lamb([flat, loose], **HYPER)
    opt.set_flat_layouts({flat: layout_of()})
    assert set(opt.state[flat]) == {"step", "exp_avg", "exp_avg_sq"}  # made eagerly
    flat.grad, loose.grad = torch.ones(6), torch.ones(3)
    with pytest.raises(RuntimeError, match=r"shape \(3,\) has a grad but no flat layout"):
        opt.step()
