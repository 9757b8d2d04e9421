"""trainer.init_from: start a run from the weights of another one.

The source is a Loom run directory (its newest intact checkpoint), one checkpoint
directory (`checkpoints/step_N`, sharded or single-file form, verified against its
checksums first), or a folder written by `launch/export_hf.py --to-loom` (a Hugging Face
model converted to Loom's names). Only model weights are taken: optimizer, step, data
position and RNG start afresh (a run that finds its own checkpoint resumes from that
instead, so a restarted job never goes back to the source).

Every tensor of the model takes the source's tensor of the same name and shape. Two
differences are allowed, for continuing training under another objective: a tensor the
source lacks keeps its initialisation (BERT's pair head, say), and a token-type table with
fewer rows in the source is extended by repeating the source's rows in order (row r takes
row r mod n: BERT's two segment embeddings become UniLM's six, 0 1 0 1 0 1, so each
task's first and second segments start from BERT's). Any other mismatch is an error that
names the tensor and both shapes; source tensors the model has no use for are listed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from common.errors import CheckpointError, ConfigError
from common.log import log_rank0
from models.config import ModelConfig
from parallel.state import read_full
from trainer.checkpoint import list_checkpoints, load_file, verify

# Tables that may grow by repeating rows: BERT's token types.
_EXTENDABLE = ("tte.weight",)


def checkpoint_of(source: Path, *, what: str = "trainer.init_from") -> Path:
    """The checkpoint directory `source` names: itself, or a run's newest intact one;
    errors name the setting `what` that gave it."""
    if (source / "metadata.json").is_file():
        return source
    for _, path in reversed(list_checkpoints(source / "checkpoints")):
        try:
            verify(path)
            return path
        except CheckpointError as exc:
            log_rank0("%s: skipping %s (%s)", what, path, exc)
    raise ConfigError(
        f"{what}={str(source)!r} holds no intact checkpoint (a run directory, a "
        "checkpoints/step_N directory or a folder written by export_hf.py --to-loom)"
    )


def read_weights(source: str, *, what: str = "trainer.init_from") -> dict[str, torch.Tensor]:
    """The model state (by Loom parameter name) that `source` holds."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"{what}={source!r} does not exist")
    if _is_converted(path):
        return load_file(path / "model.pt")  # export_hf.py --to-loom
    ckpt = checkpoint_of(path, what=what)
    verify(ckpt)
    if (ckpt / "dcp").is_dir():
        return read_full(ckpt / "dcp")["model"]
    return load_file(ckpt / "model.pt")


def load_model_config(path: Path) -> ModelConfig:
    """ModelConfig from a YAML file: its `model` section (a run's config.yaml), or the whole
    file if it has none; ConfigError naming the file for anything unreadable or invalid."""
    if not path.is_file():
        raise ConfigError(f"model config {path} does not exist")
    try:
        raw = OmegaConf.load(path)
        section = raw.model if "model" in raw else raw
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), section))
        cfg.validate()
    except (OSError, OmegaConfBaseException, ValueError, yaml.YAMLError) as err:
        detail = " ".join(str(err).split())
        raise ConfigError(f"{path}: not a valid model config ({detail})") from None
    return cfg


def run_config_path(checkpoint: Path) -> Path:
    """config.yaml beside the weights (export_hf.py --to-loom output), else the run's
    RUN_DIR/config.yaml of a checkpoints/step_N directory."""
    beside = checkpoint / "config.yaml"
    return beside if beside.is_file() else checkpoint.parent.parent / "config.yaml"


def checkpoint_config(source: Path, *, what: str) -> ModelConfig:
    """The model config of the weights `source` names (as `read_weights` finds them)."""
    if not source.exists():
        raise ConfigError(f"{what}={str(source)!r} does not exist")
    ckpt = source if _is_converted(source) else checkpoint_of(source, what=what)
    return load_model_config(run_config_path(ckpt))


def _is_converted(path: Path) -> bool:
    """A folder written by export_hf.py --to-loom: model.pt without checkpoint metadata."""
    return path.is_dir() and (path / "model.pt").is_file() and not (path / "metadata.json").exists()


@torch.no_grad()
def init_weights(model: nn.Module, state: dict[str, torch.Tensor], *, source: str) -> None:
    """Copy `state` into `model` by the rules of the module docstring."""
    kept, extended = [], []
    for name, target in model.state_dict().items():
        if name not in state:
            kept.append(name)
            continue
        value = state[name]
        if value.shape == target.shape:
            target.copy_(value)
        elif (
            name.endswith(_EXTENDABLE)
            and value.dim() == 2
            and value.shape[1] == target.shape[1]
            and value.shape[0] < target.shape[0]
        ):
            target.copy_(value[torch.arange(target.shape[0]) % value.shape[0]])
            extended.append(name)
        else:
            raise CheckpointError(
                f"trainer.init_from={source!r}: {name} has shape {tuple(value.shape)}, the "
                f"model's is {tuple(target.shape)}; the source must be the same architecture"
            )
    unused = sorted(set(state) - set(model.state_dict()))
    log_rank0(
        "initialised from %s: %d tensors%s%s%s",
        source,
        len(model.state_dict()) - len(kept),
        f"; rows repeated in {extended}" if extended else "",
        f"; kept the model's own {kept}" if kept else "",
        f"; not used {unused}" if unused else "",
    )
