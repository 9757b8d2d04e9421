"""Expert parallelism: each rank of the `ep` mesh axis holds E / ep of every MoE layer's
experts, and tokens travel to their expert's rank and back by all-to-all.

The `ep` axis is carved out of the data-parallel ranks (mesh pp x dp_replicate x dp_shard x
ep x tp, with "dp" the flattened dp_replicate x dp_shard x ep): the ranks of an ep group
read different data, exchange tokens, and each runs its own experts on the tokens of the
whole group. Dense parameters stay replicated (or FSDP-sharded) over all of "dp"; an
expert's parameters live on one rank of each ep group and are replicated over "edp"
(dp_replicate x dp_shard), the ranks that hold the same experts.

The stacked expert weights become DTensors sharded by rows (global expert ids) over the ep
axis: checkpoints keep global expert ids, whatever ep wrote them; the gradient norm and
LAMB's per-expert trust ratio count each expert once. The layer's routing, capacity and
losses are untouched: routing groups are rows of this rank's batch, so expert parallelism
moves tokens without changing which are kept.

Dispatch of one MoE layer (`Experts.forward`, replaced per module), padded to capacity
(the default with a capacity): the (E, M, D) buffer, E = R x L experts in rank order, goes
to the experts' ranks in one all-to-all of equal splits; each rank runs its L experts on
the R x M slots it received and sends them back the same way. No count is exchanged and
nothing is read on the host: every rank of an ep group routes micro-batches of the same
rows and length (evaluation pads its last batches to the same count), so M is equal.

Sorted by expert (dropless, or pad_to_capacity=false):
  1. the token counts per global expert are exchanged (all_to_all_single of E integers),
     so each rank knows how many rows it receives from each peer for each local expert;
  2. the tokens, sorted by global expert, go to their experts' ranks in one all-to-all
     with uneven splits (gloo and NCCL both run it; its backward is the reverse exchange);
  3. received rows (grouped by source rank, then expert) are regrouped by local expert,
     run through the local experts, put back in arrival order and returned by the reverse
     all-to-all.

Gradients of expert weights are reduced over "edp" and divided by the whole data-parallel
size, as Megatron, DeepSpeed and torchtitan do: each rank's loss already carries the
weight of its share of the global batch, and tokens from every rank of the ep group reach
the expert through the all-to-all.

Shape legend: N tokens sent, M tokens received, D d_model, E global experts, L local
experts (E / ep), R ranks of the ep group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from models.moe import Experts, moe_layers

__all__ = ["apply_expert_parallel", "expert_parameters"]


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> None:
    """Shard every MoE layer's experts of `model` over the 1-D `ep_mesh`, in place."""
    ep = ep_mesh.size()
    for name, layer in moe_layers(model):
        experts = layer.experts
        if experts.num_experts % ep:
            raise ValueError(
                f"{name}: model.moe.num_experts={experts.num_experts} is not divisible by "
                f"parallel.ep={ep}"
            )
        for pname, p in list(experts.named_parameters(recurse=False)):
            # Every rank built the same full model from the same seed; rank 0's rows win.
            rows = distribute_tensor(p.detach(), ep_mesh, [Shard(0)])
            experts.register_parameter(pname, nn.Parameter(rows, requires_grad=p.requires_grad))
        experts.weights = _local_weights(experts)
        experts.forward = _dispatching_forward(experts, ep_mesh)


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The stacked expert weights of every MoE layer (sharded over ep, replicated over edp)."""
    return [p for m in model.modules() if isinstance(m, Experts) for p in m.parameters()]


def _local_weights(experts: Experts):
    plain = Experts.weights.__get__(experts)

    def weights() -> dict[str, torch.Tensor | None]:
        return {k: v.to_local() if isinstance(v, DTensor) else v for k, v in plain().items()}

    return weights


def _dispatching_forward(experts: Experts, ep_mesh: DeviceMesh):
    group = ep_mesh.get_group()
    ep = ep_mesh.size()
    local = experts.num_experts // ep

    def forward(x: torch.Tensor, counts_E: torch.Tensor | None = None) -> torch.Tensor:
        if counts_E is None:
            return padded(x)
        return sorted_by_expert(x, counts_E)

    def padded(x_EMD: torch.Tensor) -> torch.Tensor:
        e, m, d = x_EMD.shape
        # Rank r receives expert block r of every peer: (R sources, L, M, D).
        x_RLMD = all_to_all_single_autograd(x_EMD.contiguous(), None, None, group)
        x_LMD = x_RLMD.view(ep, local, m, d).transpose(0, 1).reshape(local, ep * m, d)
        y_LMD = experts.compute_padded(x_LMD, experts.weights())
        y_RLMD = y_LMD.view(local, ep, m, d).transpose(0, 1).reshape(e, m, d)
        return all_to_all_single_autograd(y_RLMD.contiguous(), None, None, group)

    def sorted_by_expert(x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        counts_RL = counts_E.to(torch.int64).view(ep, local)
        # Step 1: how many rows each peer sends for each of this rank's experts.
        recv_RL = torch.empty_like(counts_RL)
        dist.all_to_all_single(recv_RL, counts_RL.contiguous(), group=group)
        send_R, recv_R = counts_RL.sum(1).tolist(), recv_RL.sum(1).tolist()
        # Step 2: rows to their experts' ranks (sorted by global expert, so by rank).
        x_MD = all_to_all_single_autograd(x_ND.contiguous(), recv_R, send_R, group)
        # Step 3: regroup by local expert (stable: by source rank within an expert).
        expert_M = torch.arange(local, device=x_ND.device).repeat(ep)
        expert_M = expert_M.repeat_interleave(recv_RL.flatten().to(x_ND.device))
        by_expert = expert_M.argsort(stable=True)
        y_sorted = experts.compute(x_MD[by_expert], recv_RL.sum(0), experts.weights())
        y_MD = y_sorted[by_expert.argsort()]
        return all_to_all_single_autograd(y_MD.contiguous(), send_R, recv_R, group)

    return forward
