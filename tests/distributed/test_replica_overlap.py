"""ReplicaSync overlaps its gradient all-reduce with backward: each bucket starts as soon as
its parameters' last accumulation of the step lands, in the same order on every rank, and
the averaged gradients equal those of the reduction after backward, to the bit."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.conftest import free_port


def _worker(rank: int, port: int, queue) -> None:
    import parallel.data_parallel as dp

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dp.BUCKET_NUMEL = 300  # several buckets for this small model
    results = {}
    for overlap in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Linear(16, 4))
        sync = dp.ReplicaSync(
            list(model.parameters()), group=dist.group.WORLD, reduce=True, zero1=False
        )
        if overlap:
            sync.begin_step(2)
        torch.manual_seed(1 + rank)  # each rank its own data
        for _ in range(2):  # two micro-batches
            model(torch.randn(5, 8)).square().sum().backward()
        launched = sync._next
        sync.reduce_gradients()
        results[overlap] = ([p.grad.clone() for p in model.parameters()], launched, len(sync._plan))
    grads_sync, _, _ = results[False]
    grads_overlap, launched, planned = results[True]
    same = all(torch.equal(a, b) for a, b in zip(grads_sync, grads_overlap, strict=True))
    queue.put((rank, same, launched, planned))
    dist.destroy_process_group()


def test_buckets_start_during_backward_and_average_like_after_it():
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(free_port(), queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    for rank, same, launched, planned in results:
        assert same, rank
        assert planned >= 3 and launched == planned, (launched, planned)  # all before the step
