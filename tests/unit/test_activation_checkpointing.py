from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from models import build_model
from models.config import ModelConfig, MoeConfig
from models.moe import moe_layers
from parallel.activation import apply_activation_checkpointing
from parallel.expert_parallel import apply_expert_parallel
from parallel.parallelize import compile_blocks, repeated_blocks


def grads_after_step(mode: str, family_cfg: ModelConfig):
    torch.manual_seed(0)
    model = build_model(family_cfg, vocab_size=300)
    names_before = [n for n, _ in model.named_parameters()]
    apply_activation_checkpointing(repeated_blocks(model), mode)
    assert [n for n, _ in model.named_parameters()] == names_before  # checkpoints unchanged
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # same dropout stream in every mode
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_checkpointing_leaves_loss_and_grads_unchanged(mode, dropout):
    cfg = ModelConfig(n_layer=2, d_model=64, n_head=2, max_seq_len=32, dropout=dropout)
    ref_loss, ref = grads_after_step("none", cfg)
    loss, grads = grads_after_step(mode, cfg)
    assert torch.equal(loss, ref_loss)
    for name in ref:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-6, atol=1e-7, msg=name)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="parallel.activation_checkpointing"):
        apply_activation_checkpointing([], "sometimes")


_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class _CountOps(TorchDispatchMode):
    """Counts the matmuls and GELU forwards (not their backward kernels) that run."""

    def __init__(self):
        super().__init__()
        self.matmuls = self.gelus = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.matmuls += func in _MATMULS
        self.gelus += func is torch.ops.aten.gelu.default
        return func(*args, **(kwargs or {}))


def backward_work(mode: str) -> tuple[int, int, int]:
    """(block forwards run again in backward, matmuls and GELUs executed by backward)."""
    torch.manual_seed(0)
    model = build_model(
        ModelConfig(n_layer=2, d_model=64, n_head=2, max_seq_len=32), vocab_size=300
    )
    blocks = repeated_blocks(model)
    apply_activation_checkpointing(blocks, mode)
    calls = [0]
    for block in blocks:  # count calls of a submodule's forward, which recomputation repeats
        inner = block.mlp.forward

        def counted(*args, inner=inner, **kwargs):
            calls[0] += 1
            return inner(*args, **kwargs)

        block.mlp.forward = counted
    loss = model(torch.randint(0, 300, (2, 32))).logsumexp(-1).mean()
    forwards = calls[0]
    with _CountOps() as ops:
        loss.backward()
    return calls[0] - forwards, ops.matmuls, ops.gelus


def test_checkpointing_recomputes_what_its_mode_says():
    """Full recomputes every block (matmuls included) in backward; selective recomputes the
    blocks' elementwise work but keeps their matmul outputs; none recomputes nothing."""
    none, full, selective = (backward_work(m) for m in ("none", "full", "selective"))
    assert none == (0, none[1], 0)
    assert full[0] == selective[0] == 2  # each of the two blocks ran forward again
    assert full[1] > none[1] and full[2] == 2  # matmuls and GELUs recomputed
    assert selective[1] == none[1] and selective[2] == 2  # matmul outputs were kept


@pytest.fixture
def one_rank_mesh(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1, 1), mesh_dim_names=("edp", "ep"))
    dist.destroy_process_group()


def compiled_against_eager(cfg: ModelConfig, prepare) -> None:
    """One step of `cfg`'s model laid out by `prepare(model, compiled)`, eager and with
    checkpointed compiled blocks: loss and gradients agree (inductor told to draw random
    numbers as eager does, so a random op's draws compare)."""
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))

    def step(compiled: bool):
        torch.manual_seed(0)
        model = build_model(cfg, vocab_size=97)
        torch._dynamo.reset()
        prepare(model, compiled)
        torch.manual_seed(2)
        loss = F.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        return loss.detach(), {
            n: g.full_tensor() if isinstance(g, DTensor) else g for n, g in grads.items()
        }

    with torch._inductor.config.patch(fallback_random=True):
        eager_loss, eager = step(compiled=False)
        loss, grads = step(compiled=True)
    torch._dynamo.reset()
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
    for name in eager:
        torch.testing.assert_close(grads[name], eager[name], rtol=1e-5, atol=1e-7, msg=name)


def checkpointed_experts(model, mesh, mode: str, compiled: bool) -> list:
    """Expert parallelism over `mesh`, then checkpointing and compilation of each block, in
    the order the training layout applies them."""
    apply_expert_parallel(model, mesh)
    blocks = repeated_blocks(model)
    apply_activation_checkpointing(blocks, mode)
    if compiled:
        compile_blocks(blocks)
    return blocks


# Router jitter is the block's one random op: where a block draws from two (with dropout),
# inductor before torch 2.13 may order their draws differently from eager.
_MOE_DEBUG = ModelConfig(
    n_layer=2,
    d_model=32,
    n_head=2,
    max_seq_len=16,
    dropout=0.0,
    moe=MoeConfig(num_experts=4, jitter_eps=1e-2),
)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_compiled_checkpointing_beside_dtensor_parameters_matches_eager(one_rank_mesh, mode):
    """Expert weights as DTensors (expert parallelism over one rank), router jitter drawing
    random numbers, each block checkpointed and compiled on the CPU."""

    def prepare(model, compiled):
        checkpointed_experts(model, one_rank_mesh["ep"], mode, compiled)

    compiled_against_eager(_MOE_DEBUG, prepare)


def test_compiled_full_checkpointing_of_blocks_holding_fsdp_units_matches_eager(one_rank_mesh):
    """The expert-parallel ZeRO-3 layout (experts and blocks as FSDP2 units) with full
    checkpointing, compiled: torch runs such a block's checkpointed region eagerly, where it
    must recompute as eager checkpointing does (a saving policy there fails in backward: a
    tensor it kept was changed in place before backward)."""

    def prepare(model, compiled):
        blocks = checkpointed_experts(model, one_rank_mesh["ep"], "full", compiled)
        for _, layer in moe_layers(model):
            fully_shard(layer.experts, mesh=one_rank_mesh["edp"])
        for block in blocks:
            fully_shard(block, mesh=one_rank_mesh["edp"])
        fully_shard(model, mesh=one_rank_mesh["edp"])

    compiled_against_eager(_MOE_DEBUG, prepare)
