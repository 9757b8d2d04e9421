from __future__ import annotations

import json

import pytest

from tests.unit.test_config import compose_job
from trainer.dry_run import dry_run, memory_estimate, resolve_vocab


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
    assert tp2["activations_gib"] == pytest.approx(one["activations_gib"] / 2)
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
