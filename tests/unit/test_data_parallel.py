"""ZeRO-1 ownership and gradient buckets (the collectives are tested in tests/distributed)."""

from __future__ import annotations

import torch
from torch import nn

from parallel import data_parallel
from parallel.data_parallel import _buckets, owners_by_size


def test_owners_balance_whole_tensors_by_size():
    sizes = [100, 10, 60, 40, 1, 50]
    params = [nn.Parameter(torch.zeros(n)) for n in sizes]
    owner = owners_by_size(params, 2)
    load = [sum(n for n, o in zip(sizes, owner, strict=True) if o == r) for r in range(2)]
    # Largest first, each to the lighter rank: 100 | 60 50 -> 100 40 | 60 50 10 1.
    assert load == [140, 121]
    assert owner == owners_by_size(params, 2)  # the same map on every call (every rank)
    assert owners_by_size(params, 1) == [0] * len(sizes)
    # More ranks than tensors: some ranks own nothing, none owns twice before all own one.
    assert sorted(owners_by_size(params[:2], 4)) == [0, 1]


def test_buckets_keep_order_split_by_dtype_and_size(monkeypatch):
    monkeypatch.setattr(data_parallel, "BUCKET_NUMEL", 10)
    a, b, c = torch.zeros(6), torch.zeros(6), torch.zeros(3)
    h = torch.zeros(4, dtype=torch.bfloat16)
    buckets = _buckets([a, h, b, c])
    assert [[id(t) for t in run] for run in buckets] == [[id(a)], [id(b), id(c)], [id(h)]]
