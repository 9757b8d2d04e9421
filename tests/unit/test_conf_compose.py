"""The config tree composes over the schemas: each file's values land on the defaults.

conf/config.yaml starts from `job_schema` (JobConfig) and the group files list only what
differs from it (tests/unit/test_config.py keeps that rule), so these tests check that
every choice composes to "schema defaults + that file" and still carries every field.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from models.config import ModelConfig
from tests.unit.test_config import CONF, compose_job
from trainer.config import (
    JobConfig,
    OptimConfig,
    PrecisionConfig,
    load_job_config,
    register_configs,
    to_yaml,
    validate_job,
)

MODELS = sorted(p.stem for p in (Path(CONF) / "model").glob("*.yaml"))
OPTIMS = sorted(p.stem for p in (Path(CONF) / "optim").glob("*.yaml"))
PRECISIONS = sorted(p.stem for p in (Path(CONF) / "precision").glob("*.yaml"))


def from_file(schema: type, group: str, name: str):
    """The schema's defaults with conf/GROUP/NAME.yaml merged over them."""
    listed = OmegaConf.load(Path(CONF) / group / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), listed))


def leaf_keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        if isinstance(value, dict):
            keys |= leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


SCHEMA_KEYS = leaf_keys(OmegaConf.to_container(OmegaConf.structured(JobConfig)))


def test_no_arguments_is_the_schema_default_with_adamw_and_fp32():
    job = compose_job()
    expected = JobConfig(optim=from_file(OptimConfig, "optim", "adamw"))
    expected.trainer.out_dir = "runs/gpt_debug"  # the resolved ${model.name}
    assert job == expected
    assert job.precision == from_file(PrecisionConfig, "precision", "fp32") == PrecisionConfig()


@pytest.mark.parametrize("name", MODELS)
def test_plus_model_overrides_the_schema_model_and_nothing_else(name):
    job = compose_job(f"+model={name}")
    assert job.model == from_file(ModelConfig, "model", name)
    assert job.model.name == name and job.trainer.out_dir == f"runs/{name}"
    default = compose_job()
    assert dataclasses.replace(job, model=default.model, trainer=default.trainer) == default
    validate_job(job)


@pytest.mark.parametrize("optim", OPTIMS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_optim_and_precision_choices_land_on_their_defaults(optim, precision):
    job = compose_job("+model=t5_debug", f"optim={optim}", f"precision={precision}")
    assert job.optim == from_file(OptimConfig, "optim", optim)
    assert job.precision == from_file(PrecisionConfig, "precision", precision)
    assert job.model == from_file(ModelConfig, "model", "t5_debug")


def test_command_line_overrides_win_over_every_file():
    job = compose_job(
        "+model=gpt2_small", "optim=lamb", "model.n_layer=2", "optim.lr=0.5", "data.mlm.unit=word"
    )
    assert (job.model.n_layer, job.model.d_model, job.optim.lr) == (2, 768, 0.5)
    assert job.optim.min_lr == from_file(OptimConfig, "optim", "lamb").min_lr
    assert job.data.mlm.unit == "word"


def test_composed_config_and_run_config_hold_every_field():
    """What `--cfg job` prints and what a run writes as config.yaml: defaults included."""
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose(config_name="config", overrides=["+model=bert_debug"])
    assert leaf_keys(OmegaConf.to_container(cfg)) == SCHEMA_KEYS
    job = load_job_config(cfg)
    written = yaml.safe_load(to_yaml(job))
    assert leaf_keys(written) == SCHEMA_KEYS
    assert load_job_config(written) == job
