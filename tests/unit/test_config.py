from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from trainer.config import (
    JobConfig,
    fit_micro_batch,
    load_job_config,
    register_configs,
    validate_job,
)

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def compose_job(*overrides: str) -> JobConfig:
    """The JobConfig launch/train.py builds from these overrides (after register_configs, as
    there). A wrong type fails while Hydra merges it into the typed schema; like the launcher,
    report that as a ValueError naming the override."""
    register_configs()
    try:
        with initialize_config_dir(config_dir=CONF, version_base=None):
            cfg = compose(config_name="config", overrides=list(overrides))
    except ConfigCompositionException as exc:
        raise ValueError(f"{exc} ({exc.__cause__})") from exc
    return load_job_config(cfg)


def test_default_config_matches_schema_defaults():
    job = compose_job()
    validate_job(job)
    assert job.model.name == "gpt_debug"
    assert job.trainer.out_dir == "runs/gpt_debug"
    assert job.optim.name == "adamw" and job.precision.dtype == "fp32"


def test_model_and_group_overrides():
    job = compose_job("+model=gpt2_small", "optim=lamb", "precision=bf16", "trainer.max_steps=50")
    assert (job.model.n_layer, job.model.d_model, job.model.vocab_size) == (12, 768, 50257)
    assert job.optim.name == "lamb" and job.precision.dtype == "bf16"
    assert job.trainer.max_steps == 50 and job.trainer.out_dir == "runs/gpt2_small"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+trainer.max_stepz=5"], "trainer.max_stepz"),
        (["trainer.max_steps=abc"], "trainer.max_steps"),
        (["+model.n_heads=5"], "model.n_heads"),
    ],
)
def test_unknown_keys_and_wrong_types_name_the_key(overrides, message):
    with pytest.raises(ValueError, match=message):
        compose_job(*overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["trainer.max_steps=-1"], r"trainer.max_steps=-1"),
        (["model.n_head=5"], r"model.n_head=5 does not divide model.d_model=128"),
        (["optim.name=sgd"], r"optim.name='sgd'"),
        (["precision.dtype=fp8"], r"precision.dtype='fp8'"),
        (["trainer.global_batch_size=12"], r"trainer.global_batch_size=12"),
        (["data.seq_len=256"], r"data.seq_len=256 exceeds model.max_seq_len=128"),
        (["model.dropout=1.5"], r"model.dropout=1.5"),
        (["optim.min_lr=1.0"], r"optim.min_lr=1.0"),
    ],
)
def test_impossible_values_name_field_and_value(overrides, message):
    job = compose_job(*overrides)
    with pytest.raises(ValueError, match=message):
        validate_job(job)


def test_global_batch_must_split_over_data_parallel_ranks():
    job = compose_job("trainer.global_batch_size=16", "trainer.micro_batch_size=8")
    validate_job(job, world_size=2)
    with pytest.raises(ValueError, match="data-parallel size 4"):
        validate_job(job, world_size=4)
    with pytest.raises(ValueError, match="does not split over 32 data-parallel ranks"):
        validate_job(job, world_size=32)


@pytest.mark.parametrize(("world", "micro"), [(1, 8), (2, 8), (4, 4), (8, 2), (16, 1)])
def test_a_rank_share_below_the_micro_batch_becomes_the_micro_batch(world, micro):
    """`torchrun --nproc_per_node 8 launch/train.py +model=glm_large` runs as written: the
    16 sequences of a step are 2 per rank, so 2 is the micro-batch."""
    job = compose_job("+model=glm_large")
    note = fit_micro_batch(job, world_size=world)
    assert job.trainer.micro_batch_size == micro
    assert (note is None) == (micro == 8)
    if note:
        assert f"micro-batches of {micro}" in note
    validate_job(job, world_size=world)
    job = compose_job("trainer.global_batch_size=16", "trainer.micro_batch_size=8")
    assert fit_micro_batch(job, world_size=32) is None  # validate_job names that one


def _unknown_or_restated(listed: dict, defaults: dict, prefix: str = "") -> list[str]:
    """What is wrong with the keys of a YAML mapping placed at `prefix` of the schema."""
    problems = []
    for key, value in listed.items():
        name = prefix + key
        if key not in defaults:
            problems.append(f"{name} is not a field of the schema")
        elif isinstance(value, dict) and isinstance(defaults[key], dict):
            problems += _unknown_or_restated(value, defaults[key], name + ".")
        elif value == defaults[key]:
            problems.append(f"{name} restates the schema default {value!r}")
    return problems


def test_yaml_files_list_only_schema_keys_with_non_default_values():
    """The schemas are the base config (conf/config.yaml names `job_schema` first), so a
    default is written once, in its dataclass: config.yaml and every group file list only
    keys the schema has, each with a value that differs from its default."""
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.structured(JobConfig), resolve=False)
    conf = Path(CONF)
    files = [conf / "config.yaml", *sorted(conf.glob("*/*.yaml"))]
    assert len(files) == 80  # config.yaml and every group file
    problems = []
    for path in files:
        listed = OmegaConf.to_container(OmegaConf.load(path)) or {}
        if path.parent == conf:
            assert listed.pop("defaults")[0] == "job_schema"
            listed.pop("hydra")
        else:  # a group file lands under its group's key (model files: `# @package model`)
            listed = {path.parent.name: listed}
        problems += [
            f"{path.relative_to(conf)}: {p}" for p in _unknown_or_restated(listed, defaults)
        ]
    assert not problems


def test_every_native_composition_is_available_and_the_rest_refused_by_name():
    for overrides, world in [
        (("parallel.tp=2", "parallel.pp=2", "parallel.zero=1"), 8),
        (("parallel.pp=2", "parallel.zero=3"), 4),
        (("parallel.tp=2",), 4),  # TP with DDP-style data parallelism
    ]:
        job = compose_job(*overrides)
        validate_job(job, world_size=world)
        job.parallel.check_available(world_size=world)
    with pytest.raises(ValueError, match=r"parallel.sp=true needs parallel.tp > 1"):
        compose_job("parallel.sp=true").parallel.check_available(world_size=2)
    with pytest.raises(ValueError, match=r"parallel.offload=cpu needs parallel.engine=deepspeed"):
        compose_job("parallel.offload=cpu").parallel.check_available(world_size=2)
    moe = ("+model=gpt_moe_debug", "parallel.ep=2", "parallel.activation_checkpointing=selective")
    compose_job(*moe, "parallel.zero=1").parallel.check_available(world_size=2)
    with pytest.raises(ValueError, match=r"selective with parallel.ep=2 and parallel.zero=3: "):
        compose_job(*moe, "parallel.zero=3").parallel.check_available(world_size=2)


def test_explicit_dp_must_match_world():
    job = compose_job("parallel.dp=2")
    assert job.parallel.world_size_for_plan(1) == 2
    with pytest.raises(ValueError, match=r"parallel.dp=2 .* world size 4"):
        validate_job(job, world_size=4)


def test_fused_lamb_is_a_deepspeed_lamb_opt_in():
    ok = compose_job("optim=lamb", "optim.fused_lamb=true", "parallel.engine=deepspeed")
    validate_job(ok)
    for overrides in [
        ("optim.fused_lamb=true", "parallel.engine=deepspeed"),  # adamw
        ("optim=lamb", "optim.fused_lamb=true"),  # native engine
    ]:
        with pytest.raises(ValueError, match=r"optim.fused_lamb=true needs optim.name=lamb"):
            validate_job(compose_job(*overrides))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_fused_lamb_without_cuda_names_the_field():
    from trainer.optim import build_optimizer

    job = compose_job("optim=lamb", "optim.fused_lamb=true", "parallel.engine=deepspeed")
    with pytest.raises(ValueError, match=r"optim.fused_lamb=true: .* no CUDA device"):
        build_optimizer(torch.nn.Linear(2, 2), job.optim)


@pytest.mark.parametrize(
    ("overrides", "world", "match"),
    [
        (("+model=t5_debug", "parallel.pp=2"), 2, r"model\.family='t5' cannot be pipelined"),
        (("+model=albert_debug", "parallel.pp=2"), 2, r"model\.share_layers=True"),
        (("parallel.pp=2", "trainer.global_batch_size=8"), 2, r"1f1b needs .*=1 >= parallel\.pp=2"),
        (("parallel.pp=2", "parallel.virtual_stages=2"), 2, r"virtual_stages=1 \(got 2\)"),
        (("parallel.pp=2", "model.n_layer=3", "trainer.micro_batch_size=4"), 2, r"n_layer=3"),
        (("parallel.pp=2", "parallel.pp_microbatches=3"), 2, r"pp_microbatches=3 does not"),
        (("parallel.engine=deepspeed", "parallel.zero=2", "precision=fp16"), 2, r"fp16 is not"),
        (
            ("parallel.engine=deepspeed", "parallel.zero=3", "optim=lamb"),
            2,
            r"parallel\.offload=nvme with optim\.name=lamb",
        ),
        (("parallel.tp=2", "model.vocab_size=301"), 2, r"vocab rows 301"),
        (("parallel.tp=4", "model.n_head=2", "model.d_model=128"), 4, r"model\.n_head=2"),
        (("parallel.tp=2", "parallel.sp=true", "model.max_seq_len=127"), 2, r"parallel\.sp=true"),
        (
            ("+model=gpt_rotary_debug", "parallel.tp=2", "parallel.pp=2", "parallel.sp=true"),
            4,
            r"model\.position=rotary",
        ),
    ],
)
def test_layouts_that_cannot_run_are_refused_before_any_work(overrides, world, match):
    """Checked on the config alone, before any process group, data or model exists."""
    from trainer.config import check_runnable

    if "optim=lamb" in overrides:
        overrides = (*overrides, "parallel.offload=nvme", "parallel.nvme_path=/tmp/nvme")
    job = compose_job(*overrides)
    validate_job(job, world_size=world)
    with pytest.raises(ValueError, match=match):
        check_runnable(job, world_size=world)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (("model.pre_ln=false",), r"model\.pre_ln=False is not supported by family=gpt"),
        (("+model=glm_debug", "model.activation=relu"), r"model\.activation='relu' .*glm"),
        (("+model=t5_debug", "model.norm=layernorm"), r"model\.norm='layernorm' .*t5"),
        (("+model=bert_debug", "model.n_decoder_layer=2"), r"model\.n_decoder_layer=2"),
        (("model.pair_head=false",), r"model\.pair_head=False is not supported by family=gpt"),
        # A pair task needs the pair head, whether the model's objective or data.objective's.
        (("+model=bert_debug", "model.pair_head=false"), r"mlm_nsp .*model\.pair_head=false"),
        (("+model=roberta_debug", "data.objective=mlm_sop"), r"mlm_sop .*model\.pair_head"),
    ],
)
def test_family_field_rules_are_checked_with_the_config(overrides, match):
    with pytest.raises(ValueError, match=match):
        validate_job(compose_job(*overrides))


@pytest.mark.parametrize(
    ("overrides", "world", "match"),
    [
        (("parallel.ep=2",), 2, r"parallel\.ep=2 needs experts"),
        (("+model=gpt_moe_debug", "model.moe.num_experts=6", "parallel.ep=4"), 4, r"=6 is not"),
        (("+model=gpt_moe_debug", "parallel.ep=4"), 2, r"parallel\.ep=4 does not divide the 2"),
    ],
)
def test_expert_parallel_degrees_are_checked_with_the_config(overrides, world, match):
    with pytest.raises(ValueError, match=match):
        validate_job(compose_job(*overrides, "trainer.micro_batch_size=4"), world_size=world)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (("parallel.tp=2",), r"tensor parallelism does not shard experts"),
        (("parallel.engine=deepspeed", "parallel.zero=2"), r"DeepSpeed engine does not run"),
    ],
)
def test_moe_layouts_that_cannot_run_are_refused(overrides, match):
    from trainer.config import check_runnable

    job = compose_job("+model=gpt_moe_debug", *overrides)
    with pytest.raises(ValueError, match=match):
        check_runnable(job, world_size=2)


def test_compile_is_refused_with_deepspeed():
    from trainer.config import check_runnable

    job = compose_job("parallel.engine=deepspeed", "parallel.zero=2", "parallel.compile=true")
    with pytest.raises(ValueError, match=r"parallel.compile=true is not available"):
        check_runnable(job, world_size=2)
