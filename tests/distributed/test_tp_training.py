"""launch/train.py with tensor (+ sequence) parallelism matches one process."""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_losses

TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=4",
    "model.max_seq_len=64",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=4",
    "trainer.log_every=1",
    "trainer.eval_every=4",
    "trainer.eval_samples=6",
    "optim=lamb",
    "optim.warmup_steps=2",
    "optim.decay_steps=6",
    "trainer.save_every=4",
]


@pytest.mark.parametrize(
    ("model", "extra", "nproc"),
    [
        ("gpt_debug", ["parallel.tp=2"], 2),
        ("gpt_debug", ["parallel.tp=2", "parallel.sp=true"], 2),
        ("bert_debug", ["parallel.tp=2"], 2),
        # NEZHA's relative terms are per head, so TP splits them with the heads.
        ("nezha_debug", ["parallel.tp=2"], 2),
        ("nezha_debug", ["parallel.zero=3"], 2),
        ("roberta_debug", ["parallel.tp=2"], 2),
        # SpanBERT's span boundary head runs replicated, before the vocabulary-sharded decoder.
        ("spanbert_debug", ["parallel.tp=2"], 2),
        ("gpt_debug", ["parallel.tp=2", "parallel.zero=3"], 4),
        # tp 2 x dp 2: StructBERT's 3-way pair head, ERNIE's knowledge masking and UniLM's
        # per-sample attention masks and six token types, each row's masks drawn alike on
        # whichever replica reads it.
        ("structbert_debug", ["parallel.tp=2"], 4),
        ("ernie_debug data.mlm.unit=knowledge", ["parallel.tp=2"], 4),
        ("unilm_debug", ["parallel.tp=2"], 4),
    ],
)
def test_tensor_parallel_training_matches_one_process(
    train_cli, one_process, tmp_path, model, extra, nproc
):
    name, *objective = model.split()
    common = [f"+model={name}", *objective, *TINY, "trainer.max_steps=6"]
    one = one_process(*common)
    train_cli(*common, *extra, f"trainer.out_dir={tmp_path / 'tp'}", nproc=nproc)
    assert_same_losses(one, tmp_path / "tp")


def test_checkpoint_saved_under_tp_resumes_on_one_process(train_cli, one_process, tmp_path):
    common = ["+model=gpt_debug", *TINY]
    whole = one_process(*common, "trainer.max_steps=6")
    split = tmp_path / "split"
    train_cli(*common, "trainer.max_steps=4", "parallel.tp=2", f"trainer.out_dir={split}", nproc=2)
    proc = train_cli(*common, "trainer.max_steps=6", f"trainer.out_dir={split}")
    assert "resumed from" in proc.stdout
    assert_same_losses(whole, split)
