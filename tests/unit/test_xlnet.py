"""XLNet model (family xlnet): recipes, what each stream may see, segment memory, the causal
(Transformer-XL) path, document masks, the chunked loss, autocast, config refusals and the
FLOP count against torch's FLOP counter. Logits against Hugging Face's XLNet are in
test_hf_xlnet.py."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from common.errors import ConfigError
from models.build import build_model, check_pipeline_split, param_counts
from models.config import ModelConfig
from models.flops import flops_per_token, xlnet_flops
from models.xlnet import XLNet, relative_sinusoids
from tests.unit.helpers import one_thread, recipe  # noqa: F401 (one_thread: a fixture)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "model"
VOCAB = 96


def load_cfg(name: str = "xlnet_debug", **overrides) -> ModelConfig:
    return recipe(name, **overrides)


def debug_xlnet(name: str = "xlnet_debug", **overrides) -> XLNet:
    torch.manual_seed(0)
    cfg = load_cfg(name, vocab_size=VOCAB, **overrides)
    return build_model(cfg, vocab_size=cfg.padded_vocab_size()).eval()


def ids(b: int, t: int, *, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def factorisation(b: int, t: int, *, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rank (B, T) of each position in a random order, perm_mask (B, T, T)): position i
    may see the content of j only if j comes earlier in the order."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.stack([torch.randperm(t, generator=gen) for _ in range(b)])
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(t).expand(b, t))
    return rank, rank[:, None, :] >= rank[:, :, None]


# ---- recipes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "layers", "d_model", "heads", "d_ff", "total"),
    [
        ("xlnet_base", 12, 768, 12, 3072, 116_750_336),
        ("xlnet_large", 24, 1024, 16, 4096, 360_300_800),
    ],
)
def test_release_shapes_and_counts(name, layers, d_model, heads, d_ff, total):
    """Yang et al. 2019: heads of 64, GeLU, 32000 pieces; the counts are
    XLNetLMHeadModel's (test_hf_xlnet.py), the output bias included."""
    cfg = load_cfg(name)
    cfg.validate()
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.ffn_size, cfg.head_dim) == (
        layers,
        d_model,
        heads,
        d_ff,
        64,
    )
    assert (cfg.objective, cfg.activation, cfg.pre_ln, cfg.layer_norm_eps) == (
        "plm",
        "gelu",
        False,
        1e-12,
    )
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=cfg.padded_vocab_size())
    assert param_counts(model)["total"] == total
    assert model.lm_head.weight is model.wte.weight


def test_debug_recipes_build():
    plm = load_cfg()
    assert (plm.n_layer, plm.d_model, plm.objective, plm.mem_len) == (2, 128, "plm", 16)
    xl = load_cfg("transformer_xl_debug")
    assert (xl.family, xl.objective, xl.mem_len) == ("xlnet", "clm", 32)
    assert len(debug_xlnet("transformer_xl_debug").blocks) == 2


def test_relative_sinusoids_are_sines_then_cosines_of_the_clamped_distance():
    d_R = torch.tensor([5, 1, 0, -2])
    table = relative_sinusoids(d_R, 8, clamp_len=3)
    freq = 10000.0 ** -(torch.arange(0, 8, 2) / 8)
    clamped = torch.tensor([3.0, 1.0, 0.0, -2.0])[:, None] * freq
    torch.testing.assert_close(table, torch.cat([clamped.sin(), clamped.cos()], dim=-1))


# ---- what each stream sees ---------------------------------------------------------------


def test_query_stream_sees_only_earlier_positions_of_the_order_never_its_own():
    """Every position is predicted (the first of the order has no key at all). Changing the
    token at j changes the prediction at p exactly when j comes before p in the order: not
    through the query stream's own content, and not through a content stream that saw it
    (two layers, so a leak through the first layer's content would show)."""
    model = debug_xlnet()
    t = 8
    rank, perm = factorisation(1, t, seed=3)
    targets = torch.arange(t)[None]
    x = ids(1, t, seed=1)
    base = model(x, perm_mask=perm, target_positions=targets)
    for j in range(t):
        changed = x.clone()
        changed[0, j] = (changed[0, j] + 1) % VOCAB
        moved = (model(changed, perm_mask=perm, target_positions=targets) - base).abs()
        moved = moved.amax(-1)[0]
        for p in range(t):
            if rank[0, j] < rank[0, p]:
                assert moved[p] > 1e-4, (j, p)
            else:
                assert moved[p] == 0, (j, p)


def test_target_order_and_duplicates_follow_target_positions():
    model = debug_xlnet()
    _, perm = factorisation(2, 10, seed=2)
    x = ids(2, 10, seed=4)
    targets = torch.tensor([[7, 2, 5], [0, 9, 4]])
    logits = model(x, perm_mask=perm, target_positions=targets)
    swapped = model(x, perm_mask=perm, target_positions=targets[:, [2, 0, 1]])
    torch.testing.assert_close(swapped, logits[:, [2, 0, 1]])
    single = model(x[:1], perm_mask=perm[:1], target_positions=targets[:1, 1:2])
    torch.testing.assert_close(single[0, 0], logits[0, 1])


def test_content_stream_follows_perm_mask_but_always_sees_itself():
    """Without target positions only the content stream runs; a position hidden from all
    (perm_mask column True) still reaches its own output."""
    model = debug_xlnet()
    t = 6
    perm = torch.zeros(1, t, t, dtype=torch.bool)
    perm[0, :, 4] = True  # nobody may see position 4, except itself
    x = ids(1, t, seed=1)
    changed = x.clone()
    changed[0, 4] = (changed[0, 4] + 1) % VOCAB
    a, b = model(x, perm_mask=perm), model(changed, perm_mask=perm)
    torch.testing.assert_close(a[:, [0, 1, 2, 3, 5]], b[:, [0, 1, 2, 3, 5]])
    assert not torch.allclose(a[:, 4], b[:, 4])


def test_without_perm_mask_the_content_stream_is_causal():
    model = debug_xlnet("transformer_xl_debug")
    x = ids(2, 12, seed=1)
    changed = x.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB
    a, b = model(x), model(changed)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert (a[:, 7:] - b[:, 7:]).abs().amax(-1).min() > 1e-4


def test_padded_keys_get_no_weight_and_segments_change_the_scores():
    model = debug_xlnet()
    _, perm = factorisation(2, 10, seed=5)
    x, targets = ids(2, 10, seed=6), torch.tensor([[1, 3], [2, 6]])
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 7:] = False
    other = x.clone()
    other[:, 7:] = (other[:, 7:] + 5) % VOCAB
    kw = {"perm_mask": perm, "target_positions": targets, "attention_mask": mask}
    torch.testing.assert_close(model(x, **kw), model(other, **kw))
    segments = (torch.arange(10) >= 5).long().expand(2, 10)
    assert not torch.allclose(model(x, **kw), model(x, token_type_ids=segments, **kw))
    # Only equality of segment ids matters.
    torch.testing.assert_close(
        model(x, token_type_ids=segments, **kw), model(x, token_type_ids=7 - 4 * segments, **kw)
    )


def test_plm_objective_batches_feed_the_query_stream():
    """The plm objective's keys are the forward's arguments; no target's prediction depends
    on its own token (its perm_mask row hides it, and every position that sees it comes
    later in the order)."""
    from data_pipeline.config import DataConfig
    from data_pipeline.objectives import build_objective, split_batch
    from data_pipeline.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    plm = build_objective("plm", cfg=DataConfig(objective="plm"), tokenizer=tok, seq_len=32, seed=0)
    rows = {
        "tokens": torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1)),
        "sample_ids": torch.tensor([3, 4]),
        "doc_start": torch.zeros(2, 33, dtype=torch.bool),
    }
    inputs, labels = split_batch(plm(rows))
    torch.manual_seed(0)
    cfg = load_cfg(vocab_size=tok.vocab_size)
    model = XLNet(cfg, vocab_size=cfg.padded_vocab_size()).eval()
    logits = model(**inputs)
    want = F.cross_entropy(logits.flatten(0, 1), labels["labels"].flatten(), reduction="none")
    got = model(**inputs, labels=labels["labels"])["row_losses"]
    torch.testing.assert_close(got, want.view(labels["labels"].shape).sum(1))
    targets = inputs["target_positions"]
    for k in range(targets.shape[1]):
        changed = inputs["input_ids"].clone()
        changed.scatter_(1, targets[:, k : k + 1], 7)
        moved = model(**{**inputs, "input_ids": changed})
        torch.testing.assert_close(moved[:, k], logits[:, k])


# ---- memory --------------------------------------------------------------------------------


def test_memory_continues_the_segment_exactly():
    """Transformer-XL: a causal segment B attending to the memory of segment A gives the
    logits of A + B run at once (the same distances, the same earlier layer inputs)."""
    model = debug_xlnet("transformer_xl_debug")
    a, b = ids(2, 9, seed=1), ids(2, 7, seed=2)
    _, mems = model(a, return_mems=True)
    assert [tuple(m.shape) for m in mems] == [(2, 9, 128)] * 2
    torch.testing.assert_close(model(b, mems=mems), model(torch.cat([a, b], 1))[:, 9:])


def test_memory_keeps_the_last_mem_len_positions_and_takes_no_gradient():
    model = debug_xlnet("transformer_xl_debug", mem_len=10).train()
    mems = [torch.randn(2, 6, 128, requires_grad=True) for _ in range(2)]
    logits, new = model(ids(2, 8, seed=1), mems=mems, return_mems=True)
    logits.float().square().mean().backward()
    assert all(m.grad is None for m in mems)
    assert all(not m.requires_grad and m.shape == (2, 10, 128) for m in new)
    torch.testing.assert_close(new[0][:, :2], mems[0][:, 4:].detach())  # 6 + 8 - 10 dropped
    assert model.blocks["0"].attn.k.weight.grad is not None


def test_two_stream_attention_reads_the_memory():
    model = debug_xlnet(mem_len=4)
    _, perm = factorisation(1, 6, seed=1)
    x, targets = ids(1, 6, seed=2), torch.tensor([[2, 5]])
    _, mems = model(ids(1, 5, seed=3), return_mems=True)
    assert mems[0].shape == (1, 4, 128)
    with_memory = model(x, perm_mask=perm, target_positions=targets, mems=mems)
    assert not torch.allclose(with_memory, model(x, perm_mask=perm, target_positions=targets))


# ---- the clm objective's document mask ------------------------------------------------------


def test_document_mask_keeps_documents_apart_and_ignores_position_ids():
    from data_pipeline.objectives.clm import document_mask, document_positions

    model = debug_xlnet("transformer_xl_debug")
    x = ids(1, 11, seed=1)
    starts = torch.zeros(1, 11, dtype=torch.bool)
    starts[0, [0, 4]] = True
    got = model(x, attn_mask=document_mask(starts), position_ids=document_positions(starts))
    torch.testing.assert_close(got[:, :4], model(x[:, :4]))
    torch.testing.assert_close(got[:, 4:], model(x[:, 4:]))
    with pytest.raises(ValueError, match="position_ids are only accepted with"):
        model(x, position_ids=document_positions(starts))


# ---- loss, precision, dropout ---------------------------------------------------------------


@pytest.mark.parametrize("two_stream", [True, False])
def test_chunked_loss_equals_the_logits_loss(two_stream):
    model = debug_xlnet()
    x = ids(2, 12, seed=1)
    kw = {}
    if two_stream:
        kw = {"perm_mask": factorisation(2, 12, seed=2)[1]}
        kw["target_positions"] = torch.tensor([[0, 5, 9, 11], [3, 4, 1, 8]])
    labels = ids(2, 4 if two_stream else 12, seed=3)
    labels[0, :2] = -100
    logits = model(x, **kw)
    want = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    model.loss_chunk_tokens = 3
    got = model(x, labels=labels, **kw)["row_losses"]
    torch.testing.assert_close(got, want.view(labels.shape).sum(1))
    with pytest.raises(ValueError, match="labels has shape"):
        model(x, labels=labels[:, :3], **kw)


def test_autocast_bf16_forward_is_finite():
    model = debug_xlnet(mem_len=4)
    _, perm = factorisation(2, 12, seed=1)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, 8:] = False
    kw = {
        "perm_mask": perm,
        "target_positions": torch.tensor([[0, 3], [5, 9]]),
        "token_type_ids": (torch.arange(12) >= 6).long().expand(2, 12),
        "attention_mask": mask,
        "mems": [torch.randn(2, 4, 128) for _ in range(2)],
    }
    x = ids(2, 12, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x, **kw)
    full = model(x, **kw)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - full).abs().max() < 0.1 * full.abs().max()


def test_dropout_only_in_training():
    model = debug_xlnet(dropout=0.1)
    x = ids(2, 8, seed=1)
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_overfits_one_batch_through_the_query_stream():
    model = debug_xlnet().train()
    x = ids(4, 16, seed=1)
    _, perm = factorisation(4, 16, seed=2)
    targets = torch.tensor([[1, 5, 9, 13]] * 4)
    labels = x.gather(1, targets)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        logits = model(x, perm_mask=perm, target_positions=targets)
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.8 * math.log(VOCAB)
    assert losses[-1] < 0.1


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_the_gradients(mode):
    """The trainer wraps every block found by repeated_blocks; the streams' masks travel
    as keyword arguments through the checkpoint."""
    from parallel.activation import apply_activation_checkpointing
    from parallel.parallelize import repeated_blocks

    x, targets = ids(2, 10, seed=1), torch.tensor([[1, 4], [7, 2]])
    kw = {"perm_mask": factorisation(2, 10, seed=2)[1], "target_positions": targets}
    grads = []
    for checkpointed in (False, True):
        model = debug_xlnet(mem_len=4).train()
        if checkpointed:
            blocks = repeated_blocks(model)
            assert blocks == list(model.blocks.values())
            apply_activation_checkpointing(blocks, mode)
        mems = [torch.randn(2, 4, 128, generator=torch.Generator().manual_seed(3))] * 2
        model(x, mems=mems, **kw).float().square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, msg=name)


# ---- tying, initialisation and checks -------------------------------------------------------


def test_tied_after_to_empty_and_initialised_as_xlnet():
    cfg = load_cfg(vocab_size=VOCAB)
    with torch.device("meta"):
        model = XLNet(cfg, vocab_size=VOCAB)
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.wte.weight
    attn = model.blocks["1"].attn
    for p in (attn.r.weight, attn.r_w_bias, attn.seg_embed, model.mask_emb):
        assert p.std().item() == pytest.approx(0.02, rel=0.3)
    assert not model.lm_head.bias.any()
    untied = debug_xlnet(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.wte.weight


def test_inputs_are_checked():
    model = debug_xlnet(mem_len=0)
    x = ids(2, 8, seed=1)
    with pytest.raises(ValueError, match="perm_mask has shape"):
        model(x, perm_mask=torch.zeros(2, 8, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="target_positions must be"):
        model(x, target_positions=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="mems holds 1 tensors"):
        model(x, mems=[torch.zeros(2, 3, 128)])
    with pytest.raises(ValueError, match="return_mems=True needs model.mem_len > 0"):
        model(x, return_mems=True)
    with pytest.raises(ValueError, match="model.max_seq_len=128"):
        model(ids(1, 129, seed=1))


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"pre_ln": True}, "model.pre_ln"),
        ({"position": "learned"}, "model.position"),
        ({"activation": "gated_gelu"}, "model.activation"),
        ({"type_vocab_size": 2}, "model.type_vocab_size"),
        ({"bias": False}, "model.bias"),
        ({"mem_len": -1}, "model.mem_len=-1 must be >= 0"),
        ({"clamp_len": 0}, "model.clamp_len=0 must be >= 1"),
        ({"objective": "mlm"}, "objective mlm with model.family=xlnet"),
    ],
)
def test_unsupported_settings_name_the_field(override, field):
    cfg = load_cfg(vocab_size=VOCAB, **override)
    with pytest.raises(ConfigError, match=field):
        XLNet(cfg, vocab_size=VOCAB)


def test_xlnet_fields_and_objective_belong_to_family_xlnet():
    gpt = ModelConfig(family="gpt")
    with pytest.raises(ConfigError, match="objective plm with model.family=gpt"):
        gpt.check_objective("plm")
    with pytest.raises(ConfigError, match="model.mem_len=8 is not supported by family=gpt"):
        dataclasses.replace(gpt, mem_len=8).validate()
    with pytest.raises(ConfigError, match="model.position='relative_xl' is not supported"):
        dataclasses.replace(gpt, position="relative_xl").validate()
    for objective in ("plm", "clm"):
        load_cfg().check_objective(objective)


def test_moe_and_pipelines_are_refused_by_name():
    cfg = load_cfg(vocab_size=VOCAB)
    with pytest.raises(
        ConfigError, match="model.moe.num_experts=4 is not supported by family=xlnet"
    ):
        dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, num_experts=4)).validate()
    with pytest.raises(ConfigError, match="'xlnet' cannot be pipelined"):
        check_pipeline_split(cfg, pp=2, virtual_stages=1)


# ---- FLOPs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("mem_len", "predicted"), [(0, 0), (16, 0), (0, 8), (16, 8)])
def test_flops_match_torch_flop_counter(mem_len, predicted):
    """Every matmul of a training step (forward and backward) counted by torch equals
    xlnet_flops plus the encodings' projection, which runs once per micro-batch."""
    cfg = load_cfg(vocab_size=VOCAB, d_model=64, mem_len=mem_len)
    model = XLNet(cfg, vocab_size=VOCAB)
    b, t = 2, 32
    kw = {}
    if predicted:
        kw["perm_mask"] = factorisation(b, t, seed=1)[1]
        kw["target_positions"] = torch.arange(predicted).expand(b, predicted) * 3
    if mem_len:
        kw["mems"] = [torch.randn(b, mem_len, 64) for _ in range(cfg.n_layer)]
    with FlopCounterMode(display=False) as counter:
        model(ids(b, t, seed=2), **kw).float().square().mean().backward()
    rows = mem_len + (2 * t - 1 if predicted else t)
    projection = 4 * rows * 64 * 64 * cfg.n_layer
    want = xlnet_flops(cfg, vocab_size=VOCAB, seq_len=t, num_predict=predicted)
    assert counter.get_total_flops() == b * t * want + projection


def test_flops_per_token_dispatches_to_xlnet():
    cfg = load_cfg("xlnet_base")
    plm = flops_per_token(cfg, vocab_size=32000, seq_len=512, target_len=85)
    assert plm == xlnet_flops(cfg, vocab_size=32000, seq_len=512, num_predict=85)
    clm = flops_per_token(cfg, vocab_size=32000, seq_len=512)
    assert clm == xlnet_flops(cfg, vocab_size=32000, seq_len=512)
    # About 6 x the 117M parameters a token meets, plus attention over 384 + 512 keys.
    assert 6 * 0.9e8 < plm < clm < 6 * 1.6e8
    no_memory = flops_per_token(dataclasses.replace(cfg, mem_len=0), vocab_size=32000, seq_len=512)
    assert no_memory < clm  # the memory's keys and values are attended to and projected


def test_tensor_and_pipeline_parallelism_are_refused_by_name():
    """No tensor-parallel plan and no pipeline split: both refused before any work starts."""
    from trainer.config import JobConfig, check_runnable

    job = JobConfig(model=load_cfg("xlnet_debug"))
    job.parallel = dataclasses.replace(job.parallel, tp=2)
    with pytest.raises(ConfigError, match="model.family='xlnet': the family has no tensor"):
        check_runnable(job, world_size=2)
    job.parallel = dataclasses.replace(job.parallel, tp=1, pp=2)
    with pytest.raises(ConfigError, match="'xlnet' cannot be pipelined"):
        check_runnable(job, world_size=2)


def test_transformer_xl_base_has_the_papers_size():
    """Dai et al. 2019, WikiText-103 base: 16 x 410, 10 heads, ReLU MLP 2100, 151M."""
    cfg = load_cfg("transformer_xl_base")
    assert (cfg.objective, cfg.activation, cfg.mem_len, cfg.head_dim) == ("clm", "relu", 150, 41)
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=cfg.padded_vocab_size())
    assert param_counts(model)["total"] == 151_138_695
