from __future__ import annotations

import dataclasses
import gc
import json

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from models import build_model
from models.config import MoeConfig
from models.moe import set_aux_loss_weight
from parallel.activation import apply_activation_checkpointing
from parallel.parallelize import repeated_blocks
from tests.unit.helpers import recipe
from tests.unit.test_config import compose_job
from trainer.dry_run import dry_run, layer_bytes, memory_estimate, moe_layer_bytes, resolve_vocab


def test_dry_run_reports_gpt2_small_without_allocating(tmp_path):
    job = compose_job("+model=gpt2_small", "trainer.dry_run=true", f"trainer.out_dir={tmp_path}")
    report = dry_run(job, world_size=1)
    assert report["params_total"] == 124_439_808
    assert report["params_non_embedding"] == 124_439_808 - (50257 + 1024) * 768
    saved = json.loads((tmp_path / "dry_run.json").read_text())
    assert saved["params_total"] == report["params_total"]
    assert saved["flops_per_token"] == pytest.approx(report["flops_per_token"])


def test_memory_estimate_follows_the_layout():
    base = compose_job("+model=gpt2_small")
    one = memory_estimate(base, params=100_000_000, vocab=50257, world_size=1)
    assert one["weights_gib"] + one["grads_gib"] + one["optimizer_gib"] == pytest.approx(
        16 * 100_000_000 / 1024**3
    )
    zero1 = memory_estimate(
        compose_job("+model=gpt2_small", "parallel.zero=1"),
        params=100_000_000,
        vocab=50257,
        world_size=4,
    )
    assert zero1["optimizer_gib"] == pytest.approx(one["optimizer_gib"] / 4)
    assert zero1["grads_gib"] == pytest.approx(one["grads_gib"])
    zero3 = memory_estimate(
        compose_job("+model=gpt2_small", "parallel.zero=3"),
        params=100_000_000,
        vocab=50257,
        world_size=4,
    )
    assert zero3["weights_gib"] == pytest.approx(one["weights_gib"] / 4)
    tp2 = memory_estimate(
        compose_job("+model=gpt2_small", "parallel.tp=2"),
        params=100_000_000,
        vocab=50257,
        world_size=2,
    )
    assert tp2["weights_gib"] == pytest.approx(one["weights_gib"] / 2)
    # Norms, their inputs and the dropout masks stay whole under TP unless SP splits them.
    assert one["activations_gib"] / 2 < tp2["activations_gib"] < one["activations_gib"]
    tp2_sp = memory_estimate(
        compose_job("+model=gpt2_small", "parallel.tp=2", "parallel.sp=true"),
        params=100_000_000,
        vocab=50257,
        world_size=2,
    )
    assert tp2_sp["activations_gib"] == pytest.approx(one["activations_gib"] / 2)
    by_mode = [
        memory_estimate(
            compose_job(
                "+model=gpt2_small",
                "precision=bf16",
                f"parallel.activation_checkpointing={mode}",
            ),
            params=100_000_000,
            vocab=50257,
            world_size=1,
        )
        for mode in ("none", "selective", "full")
    ]
    assert [e["activations_gib"] for e in by_mode] == sorted(
        (e["activations_gib"] for e in by_mode), reverse=True
    )
    # bf16 weight copies are held for backward only without recomputation (the output
    # layer's always).
    assert by_mode[0]["weight_copies_gib"] == pytest.approx(2 * 100_000_000 / 1024**3)
    assert by_mode[2]["weight_copies_gib"] == pytest.approx(2 * 50257 * 768 / 1024**3)
    # 8 rows x 1024 tokens scored 1024 tokens at a time: an eighth of the logits.
    chunked = memory_estimate(
        compose_job("+model=gpt2_small", "trainer.loss_chunk_tokens=1024"),
        params=100_000_000,
        vocab=50257,
        world_size=1,
    )
    assert one["logits_gib"] == pytest.approx(2 * 4 * 8 * 1024 * 50257 / 1024**3)
    assert chunked["logits_gib"] == pytest.approx(one["logits_gib"] / 8)


def test_vocab_resolution():
    assert resolve_vocab(compose_job()) == 366  # byte tokenizer, nothing prepared
    with pytest.raises(ValueError, match="model.vocab_size"):
        resolve_vocab(compose_job("data.tokenizer=bpe:1000"))
    assert (
        resolve_vocab(compose_job("model.vocab_size=1000", "model.make_vocab_size_divisible_by=64"))
        == 1024
    )


def test_explicit_attention_scores_count_in_the_total():
    """NEZHA's relative attention keeps its scores: the estimate's total includes them."""
    fused = memory_estimate(
        compose_job("+model=bert_base"), params=10**8, vocab=21128, world_size=1
    )
    nezha = memory_estimate(
        compose_job("+model=nezha_base"), params=10**8, vocab=21128, world_size=1
    )
    assert fused["total_gib"] == pytest.approx(
        fused["total_with_scores_gib"] - fused["attention_scores_gib"]
    )
    assert nezha["total_gib"] == pytest.approx(nezha["total_with_scores_gib"])


@pytest.mark.parametrize(
    ("model", "total", "target"),
    [
        ("bart_large", 406_287_360, 512),  # the decoder restores the whole window
        ("mass_base", 123_468_288, 512),
        ("xlnet_base", 116_750_336, 85),  # round(510 / 6) predicted positions
        ("distilbert_base", 66_985_530, None),
    ],
)
def test_dry_run_of_the_other_pretraining_systems(tmp_path, model, total, target):
    """Sizes and FLOPs from the meta device; an encoder-decoder's or XLNet's FLOPs follow
    the objective's target length, and XLNet's logits are its predicted positions only."""
    from models.flops import flops_per_token

    job = compose_job(f"+model={model}", "data.seq_len=512", f"trainer.out_dir={tmp_path}")
    report = dry_run(job, world_size=1)
    assert report["params_total"] == total
    want = flops_per_token(
        job.model, vocab_size=report["vocab_rows"], seq_len=512, target_len=target
    )
    assert report["flops_per_token"] == pytest.approx(want)
    logits = report["memory_per_rank"]["logits_gib"] * 1024**3
    rows = job.trainer.micro_batch_size * (target if model == "xlnet_base" else 512)
    assert logits == pytest.approx(8 * rows * report["vocab_rows"])


class HeldAfterForward(TorchDispatchMode):
    """Bytes of the tensors a forward pass made that are still alive after it (what it
    keeps for backward), with autocast's copies of parameters apart."""

    def __init__(self, params: set[int]):
        super().__init__()
        self.params = params
        self.made: dict[int, tuple[StorageWeakRef, int, bool]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        copy = func is torch.ops.aten._to_copy.default and args[0].data_ptr() in self.params
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            known = self.made.get(st.data_ptr())
            fresh = known is None or known[0].expired()  # not a view of a live tensor
            if st.data_ptr() not in self.params and fresh:
                self.made[st.data_ptr()] = (StorageWeakRef(st), st.nbytes(), copy)
        return out

    def held(self) -> tuple[int, int]:
        alive = [(n, copy) for ref, n, copy in self.made.values() if not ref.expired()]
        return sum(n for n, c in alive if not c), sum(n for n, c in alive if c)


def held_per_layer(
    name: str, mode: str, dtype: str, moe: MoeConfig | None = None
) -> tuple[float, float]:
    """(activation bytes per token, weight-copy bytes) one more block keeps, measured on
    the CPU: the difference between 4 and 2 blocks, halved. With `moe`, every block's MLP
    is an MoE layer (training: its aux losses attached, as the trainer does)."""
    runs = []
    for layers in (2, 4):
        torch.manual_seed(0)
        cfg = dataclasses.replace(
            recipe(name), n_layer=layers, d_model=256, n_head=4, d_ff=1024, dropout=0.0
        )
        if moe is not None:
            cfg = dataclasses.replace(cfg, moe=dataclasses.replace(moe, layers=list(range(layers))))
        model = build_model(cfg, vocab_size=512)
        set_aux_loss_weight(model, 0.25)
        apply_activation_checkpointing(repeated_blocks(model), mode)
        params = {p.data_ptr() for p in model.parameters()}
        watch = HeldAfterForward(params)
        with watch, torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(torch.randint(5, 512, (4, 128)))
            logits = out if isinstance(out, torch.Tensor) else out["logits"]
            loss = logits.float().logsumexp(-1).mean()
        gc.collect()
        runs.append(watch.held())
        del loss
    (act2, copies2), (act4, copies4) = runs
    return (act4 - act2) / 2 / (4 * 128), (copies4 - copies2) / 2


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize("name", ["gpt_debug", "bert_debug", "glm_debug"])
def test_layer_bytes_are_what_a_forward_pass_keeps(name, dtype, mode):
    """The estimate's bytes per token and block against the tensors a forward pass on the
    CPU keeps alive (no dropout: the CPU's attention with dropout is not the fused kernel
    a GPU runs, which keeps no mask), and the 16-bit weight copies against the block's
    parameters."""
    activations, copies = held_per_layer(name, mode, dtype)
    act = 2 if dtype == "bf16" else 4
    expected = layer_bytes(256, 1024, mode=mode, act=act, residual=4, dropout=False)
    assert activations == pytest.approx(expected, rel=0.01), (activations, expected)
    block_params = 12 * 256 * 256  # qkv, output, two feed-forward matrices
    held_copies = dtype == "bf16" and mode == "none"
    assert copies == pytest.approx(2 * block_params if held_copies else 0, rel=0.01)


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
@pytest.mark.parametrize(
    "moe",
    [
        MoeConfig(num_experts=4),  # Switch: top-1, capacity factor 1.25, jitter
        MoeConfig(num_experts=8, top_k=2, capacity_factor=1.0, jitter_eps=0.0),  # GShard
        MoeConfig(num_experts=4, capacity_factor=2.0),
    ],
    ids=["switch", "top2", "cf2"],
)
def test_moe_layer_bytes_are_what_a_forward_pass_keeps(moe, dtype, mode):
    """A GPT block whose MLP is an MoE layer (padded to capacity: 128 tokens a row) keeps
    the dense block's bytes plus moe_layer_bytes, against the CPU forward pass; autocast's
    weight copies are those of every expert."""
    activations, copies = held_per_layer("gpt_debug", mode, dtype, moe)
    act = 2 if dtype == "bf16" else 4
    dense = layer_bytes(256, 1024, mode=mode, act=act, residual=4, dropout=False)
    expected = dense + moe_layer_bytes(256, 1024, moe, seq_len=128, mode=mode, act=act)
    assert activations == pytest.approx(expected, rel=0.01), (activations, expected)
    # Attention's four matrices and every expert's two (the router runs in fp32).
    block_params = 4 * 256 * 256 + moe.num_experts * 2 * 256 * 1024
    held_copies = dtype == "bf16" and mode == "none"
    assert copies == pytest.approx(2 * block_params if held_copies else 0, rel=0.01)
