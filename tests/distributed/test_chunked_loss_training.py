"""`trainer.loss_chunk_tokens`: the loss scored a slice of the sequence at a time inside the
model matches the whole-logits loss of one process, on one process and under every layout
family (ZeRO-3 on FSDP2 and on DeepSpeed, TP with sequence parallelism and a pipeline, TP
alone for T5, DP with BERT's second task): losses per step within 1e-5, final weights."""

from __future__ import annotations

import pytest

from tests.conftest import assert_same_losses, assert_same_weights
from tests.distributed.test_pp_training import TINY

# 2 rows x 64 tokens per micro-batch: three slices of 48 tokens (two under SP's halves).
CHUNK = "trainer.loss_chunk_tokens=48"


@pytest.mark.parametrize(
    ("model", "layout", "nproc"),
    [
        ("gpt_debug", [], 1),
        ("gpt_debug", ["parallel.zero=3"], 2),
        ("gpt_debug", ["parallel.engine=deepspeed", "parallel.zero=3"], 2),
        ("gpt_debug", ["parallel.tp=2", "parallel.pp=2", "parallel.sp=true"], 4),
        ("bert_debug", ["parallel.zero=1"], 2),
        ("t5_debug", ["parallel.tp=2"], 2),
    ],
)
def test_chunked_loss_matches_whole_logits(train_cli, one_process, tmp_path, model, layout, nproc):
    common = [f"+model={model}", *TINY, "trainer.max_steps=6"]
    whole = one_process(*common)
    out = tmp_path / "chunked"
    train_cli(*common, CHUNK, *layout, f"trainer.out_dir={out}", nproc=nproc)
    assert_same_losses(whole, out)
    assert_same_weights(whole, out)
