"""DataConfig.validate(): every impossible value of every data field is refused before any work,
with a one-line ConfigError naming the field and value."""

from __future__ import annotations

import dataclasses
import math

import pytest

from common.errors import ConfigError
from data_pipeline.config import (
    DataConfig,
    GlmConfig,
    MlmConfig,
    SourceConfig,
    SpanCorruptionConfig,
)

SUB = {"mlm": MlmConfig, "span_corruption": SpanCorruptionConfig, "glm": GlmConfig}


def config(**fields) -> DataConfig:
    """A DataConfig with `fields` set; "mlm__unit"-style keys set a sub-config field."""
    top = {k: v for k, v in fields.items() if "__" not in k}
    for group, cls in SUB.items():
        sub = {k.split("__")[1]: v for k, v in fields.items() if k.startswith(f"{group}__")}
        if sub:
            top[group] = dataclasses.replace(cls(), **sub)
    return DataConfig(**top)


def sources(*pairs) -> list[SourceConfig]:
    return [SourceConfig(path=p, weight=w) for p, w in pairs]


BAD = [
    # data.seq_len
    ({"seq_len": 1}, r"data\.seq_len=1 must be an integer >= 2"),
    ({"seq_len": 64.0}, r"data\.seq_len=64\.0"),
    ({"seq_len": True}, r"data\.seq_len=True"),
    # data.path, data.sources
    ({"path": ""}, r"data\.path='' must be a directory"),
    ({"path": "a", "sources": sources(("b", 1.0))}, r"set data\.path or data\.sources, not both"),
    ({"sources": []}, r"data\.sources is empty"),
    ({"sources": sources(("", 1.0))}, r"data\.sources\[0\]\.path='' must be a directory"),
    ({"sources": sources(("a", 1.0), ("b", 0.0))}, r"data\.sources\[1\]\.weight=0\.0 must be"),
    ({"sources": sources(("a", -2.0))}, r"data\.sources\[0\]\.weight=-2\.0 must be"),
    ({"sources": sources(("a", math.nan))}, r"data\.sources\[0\]\.weight=nan must be"),
    ({"sources": sources(("a", math.inf))}, r"data\.sources\[0\]\.weight=inf must be"),
    ({"sources": sources(("a", "x"))}, r"data\.sources\[0\]\.weight='x' must be a number"),
    ({"sources": sources(("c/a", 1.0), ("c/./a/", 2.0))}, r"data\.sources\[1\]\.path=.*repeats"),
    # data.tokenizer, data.cache_dir
    ({"tokenizer": ""}, r"data\.tokenizer / --tokenizer='' is empty"),
    ({"tokenizer": "char:100"}, r"data\.tokenizer / --tokenizer='char:100' is not a tokenizer"),
    ({"tokenizer": "bpe:abc"}, r"data\.tokenizer / --tokenizer='bpe:abc': vocabulary size"),
    ({"tokenizer": "bpe:10"}, r"data\.tokenizer / --tokenizer='bpe:10': vocabulary size must"),
    ({"cache_dir": 5}, r"data\.cache_dir=5 must be a directory"),
    # data.val_fraction
    ({"val_fraction": 1.0}, r"data\.val_fraction=1\.0 must be in \[0, 1\)"),
    ({"val_fraction": -0.1}, r"data\.val_fraction=-0\.1 must be in \[0, 1\)"),
    # data.objective, with data.document_attention and data.seq_len
    ({"objective": "xlnet"}, r"data\.objective='xlnet' is unknown; choose one of"),
    (
        {"objective": "span_corruption", "document_attention": True},
        r"data\.document_attention=true is not supported by data\.objective=span_corruption",
    ),
    ({"objective": "mlm_nsp", "document_attention": True}, r"data\.objective=mlm_nsp"),
    ({"objective": "mlm_sop", "document_attention": True}, r"data\.objective=mlm_sop"),
    ({"objective": "glm_blank", "document_attention": True}, r"data\.objective=glm_blank"),
    ({"objective": "mlm_nsp", "seq_len": 4}, r"data\.seq_len=4 is too short .*mlm_nsp .*>= 5"),
    ({"objective": "mlm", "seq_len": 2}, r"data\.seq_len=2 is too short .*mlm .*>= 3"),
    ({"objective": "glm_blank", "seq_len": 3}, r"data\.seq_len=3 is too short .*>= 4"),
    ({"document_attention": "yes"}, r"data\.document_attention='yes' must be a bool"),
    # data.num_workers
    ({"num_workers": -1}, r"data\.num_workers=-1 must be an integer >= 0"),
    # data.mlm
    ({"mlm__unit": "foo"}, r"data\.mlm\.unit='foo' is unknown; choose one of \('token', "),
    ({"mlm__mask_prob": 0.0}, r"data\.mlm\.mask_prob=0\.0 must be in \(0, 1\)"),
    ({"mlm__mask_prob": 1.0}, r"data\.mlm\.mask_prob=1\.0 must be in \(0, 1\)"),
    ({"mlm__replace_with_mask": 1.5}, r"data\.mlm\.replace_with_mask=1\.5 must be in \[0, 1\]"),
    ({"mlm__replace_with_random": -0.1}, r"data\.mlm\.replace_with_random=-0\.1 must be in"),
    (
        {"mlm__replace_with_mask": 0.8, "mlm__replace_with_random": 0.3},
        r"data\.mlm\.replace_with_mask \+ data\.mlm\.replace_with_random = 1\.1\d* exceeds 1",
    ),
    ({"mlm__pair_swap_prob": 1.5}, r"data\.mlm\.pair_swap_prob=1\.5 must be in \[0, 1\]"),
    ({"mlm__span_p": 0.0}, r"data\.mlm\.span_p=0\.0 must be in \(0, 1\]"),
    ({"mlm__span_p": 1.5}, r"data\.mlm\.span_p=1\.5 must be in \(0, 1\]"),
    ({"mlm__span_max": 0}, r"data\.mlm\.span_max=0 must be an integer >= 1"),
    ({"mlm__span_max": 2.5}, r"data\.mlm\.span_max=2\.5 must be an integer >= 1"),
    # data.span_corruption
    ({"span_corruption__noise_density": 0}, r"data\.span_corruption\.noise_density=0 must be"),
    ({"span_corruption__noise_density": 1.0}, r"data\.span_corruption\.noise_density=1\.0"),
    ({"span_corruption__mean_span": 0.5}, r"data\.span_corruption\.mean_span=0\.5 must be >= 1"),
    # data.glm
    ({"glm__mask_ratio": 2}, r"data\.glm\.mask_ratio=2 must be in \(0, 1\)"),
    ({"glm__mask_ratio": 0.0}, r"data\.glm\.mask_ratio=0\.0 must be in \(0, 1\)"),
    ({"glm__poisson_lambda": 0.0}, r"data\.glm\.poisson_lambda=0\.0 must be a finite number > 0"),
    ({"glm__poisson_lambda": math.inf}, r"data\.glm\.poisson_lambda=inf must be a finite"),
    ({"glm__sentence_prob": 1.5}, r"data\.glm\.sentence_prob=1\.5 must be in \[0, 1\]"),
    ({"glm__gmask_prob": -0.1}, r"data\.glm\.gmask_prob=-0\.1 must be in \[0, 1\]"),
    (
        {"glm__sentence_prob": 0.6, "glm__gmask_prob": 0.6},
        r"data\.glm\.sentence_prob \+ data\.glm\.gmask_prob = 1\.2 must be <= 1",
    ),
    ({"glm__gmask_min_ratio": 0.0}, r"0 < data\.glm\.gmask_min_ratio=0\.0 <= data\.glm\.gmask"),
    (
        {"glm__gmask_min_ratio": 0.6, "glm__gmask_max_ratio": 0.4},
        r"data\.glm\.gmask_min_ratio=0\.6 <= data\.glm\.gmask_max_ratio=0\.4",
    ),
    ({"glm__gmask_max_ratio": 1.5}, r"data\.glm\.gmask_max_ratio=1\.5 <= 1"),
]


@pytest.mark.parametrize(("fields", "message"), BAD, ids=[str(f) for f, _ in BAD])
def test_impossible_value_is_refused_naming_field_and_value(fields, message):
    cfg = config(**fields)
    with pytest.raises(ConfigError, match=message) as info:
        cfg.validate()
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


GOOD = [
    {},
    {"val_fraction": 0.0},  # a corpus without a validation split (trainer.eval_every=0)
    {"seq_len": 2, "objective": "clm", "document_attention": True},
    {"objective": "mlm", "document_attention": True, "seq_len": 3},
    {"objective": "mlm_sop", "seq_len": 5},
    {"sources": sources(("a", 3.0), ("b", 1.0)), "tokenizer": "bpe:32000"},
    {"tokenizer": "/does/not/exist/yet.json"},  # looked for when the tokenizer is built
    {"mlm__unit": "span", "mlm__span_p": 1.0, "mlm__span_max": 1},
    {"mlm__replace_with_mask": 0.9, "mlm__replace_with_random": 0.1},
    {"span_corruption__noise_density": 0.5, "span_corruption__mean_span": 1.0},
    {"glm__sentence_prob": 0.3, "glm__gmask_prob": 0.7, "glm__gmask_min_ratio": 1.0},
]


@pytest.mark.parametrize("fields", GOOD, ids=[str(f) for f in GOOD])
def test_possible_values_pass(fields):
    config(**fields).validate()


def test_the_objectives_share_the_checks():
    """Objectives built from a config nobody validated refuse it with the same message."""
    from data_pipeline.objectives import build_objective, row_length
    from data_pipeline.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    cases = [
        ("mlm", config(mlm__unit="foo"), r"data\.mlm\.unit='foo' is unknown"),
        ("glm_blank", config(glm__mask_ratio=2), r"data\.glm\.mask_ratio=2 must be in"),
        ("span_corruption", config(span_corruption__noise_density=0), r"noise_density=0 must"),
        ("clm", DataConfig(), r"data\.seq_len=0 is too short .*clm"),
    ]
    for name, cfg, message in cases:
        seq_len = 0 if name == "clm" else 64
        with pytest.raises(ConfigError, match=message):
            build_objective(name, cfg=cfg, tokenizer=tok, seq_len=seq_len, seed=0)
    with pytest.raises(ConfigError, match=r"noise_density=0 must"):
        row_length("span_corruption", cfg=config(span_corruption__noise_density=0), seq_len=64)
    with pytest.raises(ConfigError, match=r"data\.objective='bert' is unknown"):
        DataConfig().check_objective("bert", seq_len=64)
