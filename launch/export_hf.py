#!/usr/bin/env python
"""Convert a Loom checkpoint to a Hugging Face `transformers` folder, or back.

    python launch/export_hf.py --checkpoint runs/gpt2_small/checkpoints/step_1000 --output hf/
    python launch/export_hf.py --to-loom --checkpoint hf/ --output loom/ [--model-config m.yaml]

Loom -> HF reads the run's resolved config (RUN_DIR/config.yaml, the `model` section; RUN_DIR
is two levels above the checkpoint, or give --config) and the checkpoint's `model.pt`, and
writes `config.json` + `model.safetensors` with `save_pretrained`, loadable offline with
`AutoModelForCausalLM.from_pretrained(DIR)` (GPT) or the family's class (BERT, T5). No
tokenizer is written.

Vocabulary rows: the HF model has `model.vocab_size` rows when the config sets it, else every
row of the checkpoint (including the rows added by make_vocab_size_divisible_by, which are
then ordinary vocabulary entries that no token id uses).

HF -> Loom (--to-loom) writes `model.pt` (a plain model state dict, loadable with
`load_state_dict(strict=True)` into `build_model(cfg, vocab_size=cfg.padded_vocab_size())`)
and `config.yaml` holding its `model` section. The Loom config comes from --model-config (a
YAML file with a `model` section or the bare fields, as in conf/model/) or, where the family
supports it, is derived from the HF config.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a plain checkout too
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from models import hf as hf_convert  # noqa: E402
from models.build import build_model  # noqa: E402
from models.config import ModelConfig  # noqa: E402

__all__ = ["export_to_hf", "export_to_loom", "load_model_config", "main", "vocab_rows"]


def load_model_config(path: Path) -> ModelConfig:
    """ModelConfig from a YAML file: its `model` section, or the whole file if it has none."""
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist")
    raw = OmegaConf.load(path)
    section = raw.model if "model" in raw else raw
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), section)
        cfg = OmegaConf.to_object(merged)
        cfg.validate()
    except (OmegaConfBaseException, ValueError) as err:
        raise ValueError(f"{path}: invalid model config: {err}") from err
    return cfg


def vocab_rows(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> int:
    """Embedding rows of a Loom checkpoint, for any family.

    Two meta-device builds with different vocabularies show which tensors scale with the
    vocabulary, without knowing the family's parameter names.
    """
    with torch.device("meta"):
        small = build_model(cfg, vocab_size=8).state_dict()
        large = build_model(cfg, vocab_size=16).state_dict()
    for key, value in small.items():
        if value.dim() and value.shape[0] == 8 and large[key].shape[0] == 16 and key in state_dict:
            return int(state_dict[key].shape[0])
    raise ValueError(f"no vocabulary-sized tensor found in the checkpoint of {cfg.name!r}")


def _check_loads(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], *, rows: int) -> None:
    """Raise naming the keys if `state_dict` does not fit the Loom model of `cfg`."""
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=rows)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"checkpoint does not match model config {cfg.name!r}: {err}") from err


def _load_converted(model: torch.nn.Module, hf_state: dict[str, torch.Tensor]) -> None:
    """Load converted weights into a meta-device HF model, refusing any silent change."""
    result = model.load_state_dict(hf_state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"converted weights have unexpected keys {result.unexpected_keys[:8]}")
    if result.missing_keys:
        model.tie_weights()  # a tied output is usually converted once, as the input embedding
    loaded = model.state_dict()
    unset = [k for k, v in loaded.items() if v.is_meta]
    if unset:
        raise ValueError(f"converted weights leave {unset[:8]} unset")
    # Tying may have replaced a converted tensor by another one (a config that ties weights
    # the checkpoint keeps apart): compare whatever is no longer the tensor that was loaded.
    for key, value in hf_state.items():
        now = loaded[key]
        if now.data_ptr() != value.data_ptr() and not torch.equal(now, value):
            raise ValueError(
                f"{key} differs from the converted weight after loading: the HF config ties it "
                "to another weight that the Loom checkpoint keeps separate"
            )


def _verify_saved(output: Path, family: str, hf_state: dict[str, torch.Tensor]) -> None:
    """Reload `output` as a user would and compare every converted tensor.

    `save_pretrained` writes a weight once when the config says it is tied to another, so a
    tie the checkpoint does not have would otherwise be lost without a word.
    """
    model = hf_convert.hf_model_class(family).from_pretrained(output, local_files_only=True)
    reloaded = model.state_dict()
    for key, value in hf_state.items():
        if key not in reloaded or not torch.equal(reloaded[key].to(value.dtype), value):
            raise ValueError(f"reloading {output} does not give back the converted {key}")


def export_to_hf(
    checkpoint: Path, output: Path, *, config: Path | None = None, verify: bool = True
) -> Path:
    """Loom `checkpoint` (a step_N folder holding model.pt) -> HF folder `output`.

    `verify` reloads the folder with transformers and compares every tensor (needs memory
    for a second copy of the model).
    """
    weights = checkpoint / "model.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist (expected RUN_DIR/checkpoints/step_N)")
    config = config or checkpoint.parent.parent / "config.yaml"
    cfg = load_model_config(config)
    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    rows = vocab_rows(cfg, state_dict)
    _check_loads(cfg, state_dict, rows=rows)

    vocab = cfg.vocab_size if cfg.vocab_size is not None else rows
    hf_state = hf_convert.to_hf(cfg.family, state_dict, cfg)
    with torch.device("meta"):
        model = hf_convert.build_hf_model(cfg.family, cfg, vocab_size=vocab)
    _load_converted(model, hf_state)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    if verify:
        _verify_saved(output, cfg.family, hf_state)
    return output


def export_to_loom(
    hf_dir: Path, output: Path, *, model_config: Path | None = None, name: str | None = None
) -> Path:
    """HF folder `hf_dir` -> `output`/model.pt + `output`/config.yaml (model section)."""
    from transformers import AutoConfig

    if not (hf_dir / "config.json").is_file():
        raise FileNotFoundError(f"{hf_dir / 'config.json'} does not exist (not an HF folder)")
    hf_cfg = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    family = hf_convert.family_of(hf_cfg)
    if model_config is not None:
        cfg = load_model_config(model_config)
        if cfg.family != family:
            raise ValueError(
                f"{model_config}: model.family={cfg.family!r} but {hf_dir} holds a {family} model"
            )
        if cfg.vocab_size is None:
            cfg = dataclasses.replace(cfg, vocab_size=hf_cfg.vocab_size)
    else:
        cfg = hf_convert.loom_config(family, hf_cfg, name=name)
    if name is not None:
        cfg = dataclasses.replace(cfg, name=name)

    model = hf_convert.hf_model_class(family).from_pretrained(hf_dir, local_files_only=True)
    state_dict = hf_convert.from_hf(family, model.state_dict(), cfg)
    _check_loads(cfg, state_dict, rows=cfg.padded_vocab_size())
    output.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, output / "model.pt")
    yaml_text = OmegaConf.to_yaml(OmegaConf.create({"model": dataclasses.asdict(cfg)}))
    (output / "config.yaml").write_text(yaml_text)
    return output


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="Loom RUN_DIR/checkpoints/step_N (or, with --to-loom, an HF folder)",
    )
    parser.add_argument("--output", type=Path, required=True, help="folder to write")
    parser.add_argument(
        "--config", type=Path, help="run config.yaml (default: RUN_DIR/config.yaml)"
    )
    parser.add_argument("--to-loom", action="store_true", help="convert HF -> Loom instead")
    parser.add_argument(
        "--no-verify",
        action="store_true",
        help="skip reloading the exported HF folder to compare every tensor",
    )
    parser.add_argument(
        "--model-config", type=Path, help="with --to-loom: Loom model YAML to convert into"
    )
    parser.add_argument("--name", help="with --to-loom: model.name of the written config")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.to_loom:
        out = export_to_loom(
            args.checkpoint, args.output, model_config=args.model_config, name=args.name
        )
    else:
        out = export_to_hf(
            args.checkpoint, args.output, config=args.config, verify=not args.no_verify
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
