"""Training on a weighted blend of two corpora: 2 gloo processes match 1 process."""

from __future__ import annotations

import pytest

from data_pipeline.prepare import prepare_corpus
from data_pipeline.sample_corpus import sample_documents
from tests.conftest import read_metrics

TINY = [
    "model.n_layer=2",
    "model.d_model=64",
    "model.n_head=2",
    "model.max_seq_len=64",
    "trainer.global_batch_size=8",
    "trainer.micro_batch_size=2",
    "trainer.max_steps=8",
    "trainer.log_every=1",
    "trainer.eval_every=8",
    "trainer.eval_samples=8",
    "trainer.save_every=4",
]


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory):
    docs = sample_documents()
    root = tmp_path_factory.mktemp("blend")
    paths = []
    for name, part in (("prose", docs[::2]), ("reference", docs[1::2])):
        prepare_corpus(part[:60], root / name, tokenizer_spec="byte", seq_len=64)
        paths.append(root / name)
    return paths


def sources(paths) -> str:
    a, b = paths
    return f"data.sources=[{{path:{a},weight:3.0}},{{path:{b},weight:1.0}}]"


def test_two_process_blend_matches_single_process(train_cli, tmp_path, two_corpora):
    one, two = tmp_path / "one", tmp_path / "two"
    train_cli(*TINY, sources(two_corpora), f"trainer.out_dir={one}")
    train_cli(*TINY, sources(two_corpora), f"trainer.out_dir={two}", nproc=2)
    a, b = read_metrics(one), read_metrics(two)
    train_a = [r for r in a if "loss" in r]
    train_b = [r for r in b if "loss" in r]
    assert len(train_a) == len(train_b) == 8
    for x, y in zip(train_a, train_b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x["step"], x["loss"], y["loss"])
        assert x["epochs"] == y["epochs"] and set(x["epochs"]) == {str(p) for p in two_corpora}
    val_a = next(r for r in a if "val_loss" in r)
    val_b = next(r for r in b if "val_loss" in r)
    assert abs(val_a["val_loss"] - val_b["val_loss"]) < 1e-5
    assert {k for k in val_a if k.startswith("val_loss/")} == {
        "val_loss/prose",
        "val_loss/reference",
    }


def test_blend_resumes_at_another_data_parallel_size(train_cli, tmp_path, two_corpora):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = [*TINY, sources(two_corpora), "optim.decay_steps=8", "optim.warmup_steps=2"]
    train_cli(*common, f"trainer.out_dir={whole}")
    train_cli(*common, "trainer.max_steps=4", f"trainer.out_dir={split}", nproc=2)
    train_cli(*common, f"trainer.out_dir={split}")  # resumes on 1 process
    a = [r for r in read_metrics(whole) if "loss" in r]
    b = [r for r in read_metrics(split) if "loss" in r]
    assert [r["consumed_samples"] for r in a] == [r["consumed_samples"] for r in b]
    for x, y in zip(a, b, strict=True):
        assert abs(x["loss"] - y["loss"]) < 1e-5, (x["step"], x["loss"], y["loss"])
