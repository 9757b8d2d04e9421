"""ELECTRA: the electra objective (masks, sampling noise, RTD labels), inverse-CDF sampling,
the model's generator -> samples -> discriminator step, its loss in trainer/loss.py, the
config rules, the FLOP count and the dry run."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.errors import ConfigError
from data_pipeline.config import DataConfig, MlmConfig
from data_pipeline.objectives import IGNORE_INDEX, build_objective, sample_rng
from data_pipeline.objectives.electra import (
    ReplacedTokenDetection,
    electra_masking,
    masked_slots,
)
from data_pipeline.objectives.mlm import MaskedLM
from data_pipeline.tokenizers import ByteTokenizer
from models import build_model, param_counts
from models.build import check_pipeline_split
from models.config import ModelConfig
from models.electra import sample_inverse_cdf
from models.flops import electra_flops, flops_per_token
from tests.unit.test_config import compose_job
from tests.unit.test_mlm import text_rows
from trainer.config import check_runnable, validate_job
from trainer.loss import summed_losses, task_weight, with_chunked_labels

TOK = ByteTokenizer()
SP = TOK.special_tokens
MASK = SP["[MASK]"]
VOCAB = 60


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy machine oversubscribed
    threads slow these tests down by an order of magnitude."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def electra_objective(*, seq_len: int = 128, seed: int = 0, **mlm) -> ReplacedTokenDetection:
    cfg = DataConfig(mlm=dataclasses.replace(MlmConfig(), **mlm))
    return ReplacedTokenDetection("electra", cfg=cfg, tokenizer=TOK, seq_len=seq_len, seed=seed)


def within_4_sigma(count: float, n: int, p: float) -> bool:
    return abs(count - n * p) <= 4 * (n * p * (1 - p)) ** 0.5


# ---- the electra objective -------------------------------------------------------------


def test_masks_are_mlms_with_every_chosen_token_a_mask():
    """The paper's generator input: the positions mlm chooses, each one [MASK] (no random or
    kept tokens); each row predicts a rounded 15% of its content tokens, and every content
    position is chosen as often as the others (binomial, within 4 sigma)."""
    seq_len, rows = 128, 400
    batch = text_rows(rows, seq_len)
    out = electra_objective(seq_len=seq_len)(batch)
    all_mask = DataConfig(mlm=MlmConfig(replace_with_mask=1.0, replace_with_random=0.0))
    ref = MaskedLM("mlm", cfg=all_mask, tokenizer=TOK, seq_len=seq_len, seed=0)(batch)
    for key in ("input_ids", "labels", "attention_mask", "token_type_ids"):
        assert torch.equal(out[key], ref[key]), key
    chosen = out["labels"] != IGNORE_INDEX
    content = seq_len - 2  # [CLS] row [SEP]
    budget = round(0.15 * content)
    assert (chosen.sum(1) == budget).all()
    assert (out["input_ids"][chosen] == MASK).all()
    original = torch.where(chosen, out["labels"], out["input_ids"])
    assert torch.equal(out["input_ids"][~chosen], original[~chosen])
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    per_position = chosen[:, 1:-1].sum(0)
    assert all(within_4_sigma(int(c), rows, budget / content) for c in per_position)


def test_masked_positions_fill_a_fixed_number_of_slots():
    """Each row's masked positions in order in K = round(0.15 x (T - 2)) slots: the most a
    row masks (a full row masks exactly that many; the padding, 0, is tested by hand below)."""
    seq_len = 64
    batch = text_rows(50, seq_len)
    out = electra_objective(seq_len=seq_len)(batch)
    slots = round(0.15 * (seq_len - 2))
    assert out["masked_positions"].shape == (50, slots)
    assert out["masked_positions"].dtype == torch.int64
    for row, positions in zip(out["labels"], out["masked_positions"], strict=True):
        chosen = torch.nonzero(row != IGNORE_INDEX).flatten().tolist()
        assert positions.tolist() == chosen + [0] * (slots - len(chosen))


def test_masked_slots_by_hand_and_a_row_that_does_not_fit():
    labels = np.full((2, 6), IGNORE_INDEX)
    labels[0, [4, 2]] = 7
    labels[1, 5] = 9
    assert masked_slots(labels, 3).tolist() == [[2, 4, 0], [5, 0, 0]]
    with pytest.raises(ValueError, match="row 0 masks 2 positions, more than its 1 slots"):
        masked_slots(labels, 1)


def test_a_small_row_by_hand():
    """seq_len 8: [CLS] + the row's first 6 bytes + [SEP]; a budget of round(0.15 x 6) = 1
    masked byte; the uniforms are the sample's own stream (salt 7), drawn as float32."""
    row = torch.tensor([list(b"abcdefghi")])
    batch = {"tokens": row, "sample_ids": torch.tensor([11])}
    out = electra_objective(seq_len=8, seed=3)(batch)
    original = torch.where(out["labels"] != IGNORE_INDEX, out["labels"], out["input_ids"])
    assert original.tolist() == [[SP["[CLS]"], *b"abcdef", SP["[SEP]"]]]
    chosen = (out["labels"] != IGNORE_INDEX).nonzero().tolist()
    assert len(chosen) == 1 and 1 <= chosen[0][1] <= 6
    assert out["input_ids"][0, chosen[0][1]] == MASK
    expected = sample_rng(3, 11, salt=7).random(8, dtype=np.float32)
    assert out["sample_uniforms"].dtype == torch.float32
    assert np.array_equal(out["sample_uniforms"][0].numpy(), expected)
    assert out["rtd_labels"].tolist() == [[0] * 8]  # every token scored, none padding


def test_uniforms_are_uniform_and_a_pure_function_of_seed_and_sample_id():
    batch = text_rows(200, 64)
    out = electra_objective(seq_len=64)(batch)
    u = out["sample_uniforms"].double()
    n = u.numel()
    assert ((u >= 0) & (u < 1)).all()
    assert abs(u.mean().item() - 0.5) <= 4 * (1 / 12 / n) ** 0.5
    for q in (0.1, 0.5, 0.9):
        assert within_4_sigma(int((u < q).sum()), n, q), q
    again = pickle.loads(pickle.dumps(electra_objective(seq_len=64)))(batch)  # a worker's
    assert all(torch.equal(out[k], again[k]) for k in out)
    assert not torch.equal(u[0], u[1])  # each sample id its own draws
    other_seed = electra_objective(seq_len=64, seed=1)(batch)["sample_uniforms"]
    assert not torch.equal(other_seed, out["sample_uniforms"])
    built = build_objective("electra", cfg=DataConfig(), tokenizer=TOK, seq_len=64, seed=0)
    assert torch.equal(built(batch)["sample_uniforms"], out["sample_uniforms"])


def test_an_explicit_replacement_split_is_kept():
    """0.85 / 0 (the released code's split): 85% [MASK], 15% kept, within binomial bounds."""
    assert electra_masking(MlmConfig()).replace_with_mask == 1.0
    assert electra_masking(MlmConfig(replace_with_mask=0.85, replace_with_random=0.0)) == (
        MlmConfig(replace_with_mask=0.85, replace_with_random=0.0)
    )
    out = electra_objective(seq_len=128, replace_with_mask=0.85, replace_with_random=0.0)(
        text_rows(300, 128)
    )
    chosen = out["labels"] != IGNORE_INDEX
    inputs, labels = out["input_ids"][chosen], out["labels"][chosen]
    n = len(labels)
    assert int(((inputs != MASK) & (inputs != labels)).sum()) == 0
    assert within_4_sigma(int((inputs == MASK).sum()), n, 0.85)


def test_objective_config_is_checked_by_name():
    with pytest.raises(ConfigError, match="data.document_attention=true"):
        DataConfig(document_attention=True).check_objective("electra")
    with pytest.raises(ConfigError, match="data.seq_len=2"):
        DataConfig().check_objective("electra", seq_len=2)
    with pytest.raises(ConfigError, match="data.mlm.mask_prob"):
        electra_objective(mask_prob=0.0)


# ---- sampling ----------------------------------------------------------------------------


def test_inverse_cdf_by_hand():
    """P = (0.1, 0.2, 0.7): u below 0.1 gives 0, below 0.3 gives 1, the rest 2; u at the
    rounded total (1.0) would pass the last id and is clamped to it."""
    logits = torch.tensor([0.1, 0.2, 0.7]).log().expand(7, 3)
    u = torch.tensor([0.0, 0.05, 0.0999, 0.15, 0.31, 0.99, 1.0])
    assert sample_inverse_cdf(logits, u).tolist() == [0, 0, 0, 1, 2, 2, 2]


def test_inverse_cdf_draws_follow_the_softmax():
    probs = torch.tensor([0.05, 0.15, 0.3, 0.1, 0.4])
    n = 40_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    draws = sample_inverse_cdf((probs.log() + 3.0).expand(n, 5), u)
    counts = torch.bincount(draws, minlength=5)
    assert all(within_4_sigma(int(c), n, float(p)) for c, p in zip(counts, probs, strict=True))


def test_inverse_cdf_matches_float64_sums_over_a_large_vocabulary():
    """The integer sums draw what float64 cumulative sums of the softmax draw, over 30,522
    ids (BERT's vocabulary) with a peaked distribution."""
    gen = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(500, 30522, generator=gen)
    u = torch.rand(500, generator=gen)
    cdf = torch.softmax(logits, dim=-1).double().cumsum(-1)
    expected = torch.searchsorted(cdf, u.double()[:, None], right=True).squeeze(-1)
    assert torch.equal(sample_inverse_cdf(logits, u), expected.clamp(max=30521))


# ---- the model ---------------------------------------------------------------------------


def tiny_cfg(**over) -> ModelConfig:
    fields = dict(
        name="electra_tiny",
        family="electra",
        objective="electra",
        n_layer=2,
        d_model=32,
        n_head=4,
        d_ff=64,
        embedding_size=12,
        generator_size=0.5,
        max_seq_len=16,
        pre_ln=False,
        activation="gelu",
        type_vocab_size=2,
    )
    return ModelConfig(**(fields | over))


def tiny_model(seed: int = 0, **over) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(tiny_cfg(**over), vocab_size=VOCAB).double()


def tiny_batch(seed: int = 1, *, b: int = 3, t: int = 12) -> dict[str, torch.Tensor]:
    """Random tokens with about a third of them masked ([MASK] = id 4 here)."""
    gen = torch.Generator().manual_seed(seed)
    original = torch.randint(5, VOCAB, (b, t), generator=gen)
    chosen = torch.rand(b, t, generator=gen) < 0.35
    chosen[:, 0] = True  # at least one per row
    return {
        "input_ids": torch.where(chosen, 4, original),
        "labels": torch.where(chosen, original, IGNORE_INDEX),
        "sample_uniforms": torch.rand(b, t, generator=gen),
        "token_type_ids": torch.randint(0, 2, (b, t), generator=gen),
    }


def test_forward_is_generator_then_samples_then_discriminator():
    """Against the parts run by hand: the generator's MLM loss at the masked positions, the
    inverse-CDF samples of its logits, the discriminator on the originals with the samples in
    place, and the RTD target = (its input != the original)."""
    model = tiny_model().eval()
    batch = tiny_batch()
    chosen = batch["labels"] != IGNORE_INDEX
    original = torch.where(chosen, batch["labels"], batch["input_ids"])
    types = batch["token_type_ids"]
    with torch.no_grad():
        out = model(**batch)
        logits = model.generator_logits(batch["input_ids"], token_type_ids=types)
        losses = F.cross_entropy(
            logits.transpose(1, 2), batch["labels"], reduction="none", ignore_index=IGNORE_INDEX
        )
        samples = sample_inverse_cdf(logits[chosen], batch["sample_uniforms"][chosen])
        replaced = original.clone()
        replaced[chosen] = samples
        rtd = model.discriminator_logits(replaced, token_type_ids=types)
    torch.testing.assert_close(out["row_losses"], losses.sum(1).float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(out["rtd_targets"], (replaced != original).double())
    assert out["rtd_targets"][~chosen].eq(0).all()
    assert out["rtd_targets"][chosen].sum() > 0  # an untrained generator replaces most
    torch.testing.assert_close(out["rtd_logits"], rtd, rtol=1e-12, atol=1e-12)


def test_a_sample_equal_to_the_original_is_labelled_original():
    model = tiny_model().eval()
    batch = tiny_batch()
    chosen = batch["labels"] != IGNORE_INDEX
    batch["labels"] = torch.where(chosen, 9, IGNORE_INDEX)  # every masked original is id 9
    with torch.no_grad():
        model.generator.lm_head.bias[9] = 1e4  # the generator is sure of it
        out = model(**batch)
    assert out["rtd_targets"].eq(0).all()


def test_no_gradient_flows_through_the_samples():
    """The RTD loss trains the discriminator and the shared tables, never the generator's
    own weights; the MLM loss trains the generator and the tables, never the discriminator's
    blocks or head."""
    model = tiny_model()
    out = model(**tiny_batch())
    rtd = F.binary_cross_entropy_with_logits(out["rtd_logits"], out["rtd_targets"])
    rtd.backward(retain_graph=True)
    grads = {n: p.grad for n, p in model.named_parameters()}
    generator_own = [n for n in grads if n.startswith("generator.")]  # its decoder is wte
    assert generator_own and all(grads[n] is None for n in generator_own)
    assert grads["discriminator.wte.weight"].abs().sum() > 0
    model.zero_grad(set_to_none=True)
    out["row_losses"].sum().backward()
    discriminator_own = [n for n in grads if n.startswith(("discriminator.blocks", "rtd_"))]
    assert all(p.grad is None for n, p in model.named_parameters() if n in discriminator_own)
    assert model.generator.blocks["0"].attn.qkv.weight.grad.abs().sum() > 0


def test_chunked_generator_head_matches_the_whole():
    batch = tiny_batch(b=4)
    whole, chunked = tiny_model(), tiny_model()
    chunked.loss_chunk_tokens = 3
    results = []
    for model in (whole, chunked):
        out = model(**batch)
        (out["row_losses"].sum() + out["rtd_logits"].sum()).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-12)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-10, atol=1e-12)


def first_unmasked_padding(labels: torch.Tensor, slots: int) -> torch.Tensor:
    """(B, slots): each row's masked positions, padded with its first unmasked position."""
    rows = []
    for row in labels:
        chosen = torch.nonzero(row != IGNORE_INDEX).flatten().tolist()
        pad = int(torch.nonzero(row == IGNORE_INDEX)[0])
        rows.append(chosen + [pad] * (slots - len(chosen)))
    return torch.tensor(rows)


@pytest.mark.parametrize("chunk", [0, 3])
def test_the_head_on_gathered_slots_matches_the_selected_positions(chunk):
    """The same losses, samples, RTD logits and gradients with masked_positions (a fixed
    number of slots a row, the padding repeated) as with the positions the labels select."""
    batch = tiny_batch(b=4)
    slots = int((batch["labels"] != IGNORE_INDEX).sum(1).max()) + 2  # two pads at least
    results = []
    for extra in ({}, {"masked_positions": first_unmasked_padding(batch["labels"], slots)}):
        model = tiny_model()
        model.loss_chunk_tokens = chunk
        out = model(**batch, **extra)
        (out["row_losses"].sum() + out["rtd_logits"].sum()).backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters()}))
    (a, grads_a), (b, grads_b) = results
    assert torch.equal(a["rtd_targets"], b["rtd_targets"])
    # The losses are float32 (the head's cross-entropy), summed over T or over K positions.
    torch.testing.assert_close(a["row_losses"], b["row_losses"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a["rtd_logits"], b["rtd_logits"], rtol=1e-12, atol=1e-12)
    for name, grad in grads_a.items():
        torch.testing.assert_close(grad, grads_b[name], rtol=1e-10, atol=1e-12)


def test_masked_positions_of_the_wrong_shape_are_refused():
    batch = tiny_batch(b=3)
    with pytest.raises(
        ValueError, match=r"masked_positions has shape \(2, 4\), expected \(3, slots\)"
    ):
        tiny_model()(**batch, masked_positions=torch.zeros(2, 4, dtype=torch.int64))


def test_the_networks_share_the_tables_and_tie_the_decoder():
    model = tiny_model()
    gen, disc = model.generator, model.discriminator
    assert gen.wte is None and gen.wpe is None and gen.tte is None and gen.emb_ln is None
    assert disc.lm_head is None and disc.mlm_dense is None
    assert gen.lm_head.weight is disc.wte.weight
    # Each network projects the 12-wide embeddings to its own width (32, and 32 x 0.5).
    assert disc.emb_proj.weight.shape == (32, 12) and gen.emb_proj.weight.shape == (16, 12)
    with torch.device("meta"):
        meta = build_model(tiny_cfg(), vocab_size=VOCAB)
    meta.to_empty(device="cpu")
    assert meta.generator.lm_head.weight is meta.discriminator.wte.weight
    names = [n for n, _ in model.named_parameters()]  # the tied decoder is listed once
    assert "generator.lm_head.weight" not in names
    counts = param_counts(model)
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_pre_ln_networks_run():
    model = tiny_model(pre_ln=True)
    assert model.generator.ln_f is not None and model.discriminator.ln_f is not None
    out = model(**tiny_batch())
    assert out["rtd_logits"].shape == (3, 12) and torch.isfinite(out["row_losses"]).all()


# ---- the loss ----------------------------------------------------------------------------


def test_rtd_loss_is_the_binary_cross_entropy_of_the_labelled_positions():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    rtd_labels = torch.tensor([[0, 0, 0], [0, IGNORE_INDEX, IGNORE_INDEX]])
    outputs = {"row_losses": torch.tensor([1.5, 2.5]), "rtd_logits": logits}
    outputs["rtd_targets"] = targets
    lm_labels = torch.tensor([[5, IGNORE_INDEX, 7], [IGNORE_INDEX] * 3])
    sums = summed_losses(outputs, {"labels": lm_labels, "rtd_labels": rtd_labels})
    scored = [(2.0, 1.0), (-1.0, 0.0), (0.5, 1.0), (0.0, 0.0)]
    expected = sum(np.log1p(np.exp(-x)) if y else np.log1p(np.exp(x)) for x, y in scored)
    assert sums["rtd_labels"].item() == pytest.approx(expected, rel=1e-6)
    assert sums["labels"].item() == pytest.approx(4.0)
    cfg = tiny_cfg()
    assert task_weight("rtd_labels", cfg) == 50.0 and task_weight("labels", cfg) == 1.0
    labels = {"labels": lm_labels, "rtd_labels": rtd_labels}
    assert torch.equal(with_chunked_labels({"x": 1}, labels, 0)["labels"], lm_labels)
    assert "labels" not in with_chunked_labels({"x": 1}, {"labels": lm_labels}, 0)


# ---- configs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (("model.generator_size=0.3",), r"model\.generator_size=0\.3 x model\.d_model=128"),
        (("model.rtd_weight=0",), r"model\.rtd_weight=0\.0 must be > 0"),
        (("model.position=rotary",), r"model\.position='rotary' is not supported by family=e"),
        (("model.pair_head=false",), r"model\.pair_head=False is not supported by family=e"),
        (("model.moe.num_experts=4",), r"model\.moe\.num_experts=4 is not supported"),
        (("data.objective=mlm",), r"objective mlm with model\.family=electra"),
    ],
)
def test_electra_config_rules_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate_job(compose_job("+model=electra_debug", *overrides))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (("+model=bert_debug", "model.generator_size=0.5"), r"generator_size=0\.5 .*family=bert"),
        (("+model=roberta_debug", "data.objective=electra"), r"objective electra with model"),
    ],
)
def test_other_families_refuse_electras_fields(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate_job(compose_job(*overrides))


@pytest.mark.parametrize(
    ("overrides", "world", "match"),
    [
        (("parallel.pp=2",), 2, r"model\.family='electra' cannot be pipelined \(the disc"),
        (("parallel.tp=4",), 4, r"model\.generator_size=0\.25 gives ELECTRA's generator 2 hea"),
    ],
)
def test_layouts_electra_cannot_run_are_refused(overrides, world, match):
    job = compose_job("+model=electra_debug", *overrides)
    validate_job(job, world_size=world)
    with pytest.raises(ConfigError, match=match):
        check_runnable(job, world_size=world)
    with pytest.raises(ConfigError, match="cannot be pipelined"):
        check_pipeline_split(job.model, pp=2, virtual_stages=1)


def test_generator_config_scales_width_mlp_and_heads():
    base = compose_job("+model=electra_base").model
    gen = base.generator_config()
    assert (gen.family, gen.n_layer, gen.d_model, gen.n_head, gen.ffn_size) == (
        "bert",
        12,
        256,
        4,
        1024,
    )
    assert gen.embedding_size == 768 and gen.pair_head is False and gen.head_dim == 64


# ---- FLOPs and the dry run ---------------------------------------------------------------


def direct_flops(L, D, F_, G, F_g, E, V, T, K) -> float:  # noqa: N803 (the paper's letters)
    """6 x matmul weights per token + 12 x L x width x T per stack, written out."""
    disc = L * (4 * D * D + 2 * D * F_) + (E * D if E != D else 0) + D * D + D
    gen = L * (4 * G * G + 2 * G * F_g) + (E * G if E != G else 0) + K / T * (G * E + V * E)
    return 6 * (disc + gen) + 12 * L * D * T + 12 * L * G * T


@pytest.mark.parametrize(
    ("name", "mask_prob", "shape"),
    [
        ("electra_small", 0.15, (12, 256, 1024, 64, 256, 128)),
        ("electra_base", 0.15, (12, 768, 3072, 256, 1024, 768)),
        ("electra_large", 0.25, (24, 1024, 4096, 256, 1024, 1024)),
    ],
)
def test_flops_count_both_networks(name, mask_prob, shape):
    cfg = compose_job(f"+model={name}").model
    t = 128 if name == "electra_small" else 512
    k = round(mask_prob * (t - 2))
    expected = direct_flops(*shape, V=30522, T=t, K=k)
    got = flops_per_token(cfg, vocab_size=30522, seq_len=t, mask_prob=mask_prob)
    assert got == pytest.approx(expected, rel=1e-12)
    assert electra_flops(cfg, vocab_size=30522, seq_len=t, mask_prob=mask_prob) == got


def test_dry_run_counts_both_networks(tmp_path):
    from trainer.dry_run import dry_run, layer_bytes

    job = compose_job(
        "+model=electra_small",
        "data.seq_len=128",
        "data.mlm.mask_prob=0.25",
        "trainer.micro_batch_size=4",
        f"trainer.out_dir={tmp_path}",
    )
    report = dry_run(job, world_size=1)
    assert report["params_total"] == 14_196_219
    k = round(0.25 * 126)
    assert report["flops_per_token"] == pytest.approx(
        direct_flops(12, 256, 1024, 64, 256, 128, V=30522, T=128, K=k)
    )
    mem = report["memory_per_rank"]
    # fp32 logits + gradient, probabilities and int64 sums of the 4 x K masked positions.
    assert mem["logits_gib"] == pytest.approx((8 + 4 + 8) * 4 * k * 30522 / 1024**3)
    # Both stacks' 12 layers (widths 256 and 64, feed-forward 4x), fp32, dropout 0.1.
    per_token = sum(
        layer_bytes(h, 4 * h, mode="none", act=4, residual=4, dropout=True) for h in (256, 64)
    )
    assert mem["activations_gib"] == pytest.approx(128 * 4 * 12 * per_token / 1024**3)
