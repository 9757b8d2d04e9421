#!/usr/bin/env python
"""Convert a Loom checkpoint to a Hugging Face `transformers` folder, or back.

    python launch/export_hf.py --checkpoint runs/gpt_debug/checkpoints/step_300 --output hf/
    python launch/export_hf.py --checkpoint runs/gpt_debug --output hf/   # newest valid step
    python launch/export_hf.py --to-loom --checkpoint hf/ --output loom/ [--model-config m.yaml]

Loom -> HF reads a checkpoint in either form: sharded (`dcp/`, what training writes) or
single-file (`model.pt`, see launch/convert_checkpoint.py). A checkpoint with metadata.json is
first checked file by file against its checksums, as training does before it resumes; a bare
`model.pt` without one (what --to-loom writes) is read unchecked, with a note. Only the model
state is read, never the optimizer's, less the modules only training uses (a distilled
student's `distill_proj.*`, see models/hf/__init__.py). The model config is the `model` section
of the run's resolved config: `config.yaml` beside the weights, else RUN_DIR/config.yaml two
levels above the checkpoint, or --config. It writes `config.json` + `model.safetensors` with
`save_pretrained` and reloads them to compare every tensor (--no-verify skips that). A T5 with
mixture-of-experts layers (model.moe) becomes a SwitchTransformersForConditionalGeneration, a
BERT without the sentence-pair head (model.pair_head=false, the roberta_* recipes) a
RobertaForMaskedLM, and one without token types either (model.type_vocab_size=0, the
distilbert_* recipes) a DistilBertForMaskedLM; --to-loom reads all three back
(models/hf/switch.py, models/hf/roberta.py and models/hf/distilbert.py say what converts). An
ELECTRA run exports its discriminator as an ElectraForPreTraining (the folder's README.md says
the generator was left out; models/hf/electra.py converts it), which --to-loom cannot read back
alone. A BART run becomes a BartForConditionalGeneration (models/hf/bart.py: its position
tables' two leading rows, the zero final_logits_bias).

The run's tokenizer is written too, so `transformers.pipeline(...)` and
`AutoTokenizer.from_pretrained(DIR)` work offline. It is found from the run config's `data`
section: the prepared corpus of data.path or data.sources (its manifest names the tokenizer),
else the built-in sample corpus prepared under data.cache_dir / $LOOM_CACHE / ~/.cache/loom
for data.tokenizer, data.seq_len and the objective (the byte tokenizer needs no file);
--tokenizer names it instead (a prepared corpus, a tokenizer.json, a SentencePiece .model or
`byte`). Every kind becomes a `tokenizer.json` with the family's special tokens (GPT:
eos/pad/unk; BERT: [CLS] A [SEP] (B [SEP]) and [MASK]; RoBERTa and DistilBERT: [CLS] A
(<eos> B) [SEP] and [MASK]; T5: text <eos>; BART: text <eos> and [MASK]), and the HF config
takes the tokenizer's eos/pad (RoBERTa's bos/eos, and T5's and BART's decoder-start) ids. The
written tokenizer is reloaded and must encode a set of probe texts to Loom's ids and decode
them back as Loom does; a tokenizer that cannot be found or represented is left out, and the
reason is printed and written to the folder's README.md, which always says where the export
came from.

Vocabulary rows: the HF model has `model.vocab_size` rows when the config sets it, else every
row of the checkpoint (including the rows added by make_vocab_size_divisible_by, which are
then ordinary vocabulary entries that no token id uses).

HF -> Loom (--to-loom) writes `model.pt` (a plain model state dict, loadable with
`load_state_dict(strict=True)` into `build_model(cfg, vocab_size=cfg.padded_vocab_size())`)
and `config.yaml` holding its `model` section. The Loom config comes from --model-config (a
YAML file with a `model` section or the bare fields, as in conf/model/) or, where the family
supports it, is derived from the HF config.

A missing or damaged checkpoint, a missing or invalid config, or a family without a Hugging
Face counterpart is reported as one line on stderr with exit code 2 (LOOM_DEBUG=1 shows the
traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a plain checkout too
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402

from common.errors import CheckpointError, ConfigError, LoomError, report  # noqa: E402
from common.process import exit_after  # noqa: E402
from models import hf as hf_convert  # noqa: E402
from models.build import build_model  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from trainer.checkpoint import list_checkpoints, load_file, verify  # noqa: E402

__all__ = [
    "MissingCheckpointError",
    "export_to_hf",
    "export_to_loom",
    "find_tokenizer",
    "load_model_config",
    "main",
    "read_model_state",
    "resolve_checkpoint",
    "vocab_rows",
    "write_tokenizer",
]

PROG = "export_hf"
# Texts every exported tokenizer must encode to Loom's ids and decode back as Loom does:
# spaces, newlines and tabs, accents, several scripts, emoji, code, and the reserved tokens'
# names as plain text.
PROBE_TEXTS = (
    "Hello, world! This is a test of the exported tokenizer.",
    "  Leading and trailing spaces, and  double  spaces.  ",
    "Tabs\tand\nnewlines\n\n    indented\r\nwindows",
    "Ünïcödé façade, naïve café; Ελληνικά, русский, עברית",
    "中文字符和日本語のテキスト、한국어",
    "emoji 🤖👍🏽 and symbols ∑∫√ ©® ½",
    "def f(x):\n    return x ** 2  # comment",
    "a [MASK] b <eos> c [CLS]<pad> <extra_id_0>",
    "",
)


# What transformers writes for a tokenizer (some releases write the last two).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


class MissingCheckpointError(CheckpointError, FileNotFoundError):
    """A checkpoint or HF folder that does not exist or holds no weights."""


# ---------------------------------------------------------------------------------------------
# Configs


def _load_yaml(path: Path, *, what: str) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist")
    try:
        return OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError, yaml.YAMLError) as err:
        detail = " ".join(str(err).split())
        raise ConfigError(f"{path}: not a readable YAML config ({detail})") from None


def _model_config(raw: DictConfig, path: Path) -> ModelConfig:
    section = raw.model if "model" in raw else raw
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), section)
        cfg = OmegaConf.to_object(merged)
        cfg.validate()
    except (OmegaConfBaseException, ValueError) as err:
        raise ConfigError(f"{path}: invalid model config: {err}") from None
    return cfg


def load_model_config(path: Path) -> ModelConfig:
    """ModelConfig from a YAML file: its `model` section, or the whole file if it has none."""
    return _model_config(_load_yaml(path, what="model config"), path)


def _check_has_hf_class(cfg: ModelConfig) -> None:
    """ConfigError, before any weight is read, for a model no installed transformers class
    computes: NEZHA's relative sinusoids (transformers has dropped its Nezha model)."""
    if cfg.position == "relative_sinusoidal":
        raise ConfigError(
            f"model {cfg.name!r} has model.position=relative_sinusoidal (NEZHA), which no "
            "Hugging Face class computes: transformers has no Nezha model any more (deprecated "
            "after v4.40.2, since removed) and its BERT classes have learned positions only"
        )


def _run_config_path(checkpoint: Path) -> Path:
    """config.yaml beside the weights (--to-loom output), else RUN_DIR/config.yaml."""
    beside = checkpoint / "config.yaml"
    return beside if beside.is_file() else checkpoint.parent.parent / "config.yaml"


# ---------------------------------------------------------------------------------------------
# Checkpoints


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint directory `path` names: itself, or for a run directory (one holding
    checkpoints/) its newest checkpoint that passes verification."""
    if not path.is_dir():
        raise MissingCheckpointError(
            f"{path} does not exist (expected RUN_DIR/checkpoints/step_N holding dcp/ or model.pt)"
        )
    if (path / "dcp").is_dir() or (path / "model.pt").is_file():
        return path
    found = list_checkpoints(path / "checkpoints")
    if not found:
        raise MissingCheckpointError(
            f"{path} holds neither dcp/ nor model.pt, nor checkpoints/step_N "
            "(expected RUN_DIR/checkpoints/step_N or a run directory)"
        )
    problems = []
    for _, step_dir in reversed(found):
        try:
            verify(step_dir)
            return step_dir
        except CheckpointError as err:
            problems.append(str(err))
    raise CheckpointError(f"no checkpoint under {path / 'checkpoints'} is intact: {problems[0]}")


def _read_dcp_model(directory: Path) -> dict[str, torch.Tensor]:
    """The model entries of a DCP checkpoint, whole, on this process (no optimizer state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = dcp.FileSystemReader(str(directory)).read_metadata()
        model = {
            key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in metadata.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
        }
        with warnings.catch_warnings():  # DCP says it loads in one process, which is the point
            warnings.filterwarnings("ignore", "torch.distributed is", UserWarning)
            dcp.load({"model": model}, checkpoint_id=str(directory), no_dist=True)
    except Exception as err:  # DCP raises several types for damaged or foreign files
        detail = " ".join(str(err).split())
        raise CheckpointError(f"{directory}: cannot be read ({detail})") from None
    if not model:
        raise CheckpointError(f"{directory}: holds no model state")
    return model


def read_model_state(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(model state dict, facts) of a step_N directory in either form.

    facts: {"form": "sharded" | "single-file", "step": int | None, "verified": bool}. Files
    are checked against metadata.json first; a sharded checkpoint without one is incomplete.
    """
    sealed = (checkpoint / "metadata.json").is_file()
    meta = verify(checkpoint) if sealed else {}
    facts = {"step": meta.get("step"), "verified": sealed}
    if (checkpoint / "dcp").is_dir():
        if not sealed:
            raise CheckpointError(
                f"{checkpoint / 'metadata.json'}: missing; a sharded checkpoint gets it when "
                "complete, so this one is not"
            )
        return _read_dcp_model(checkpoint / "dcp"), {**facts, "form": "sharded"}
    if (checkpoint / "model.pt").is_file():
        return load_file(checkpoint / "model.pt"), {**facts, "form": "single-file"}
    raise MissingCheckpointError(f"{checkpoint} holds neither dcp/ nor model.pt")


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
    raise ConfigError(f"no vocabulary-sized tensor found in the checkpoint of {cfg.name!r}")


def _check_loads(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], *, rows: int) -> None:
    """Raise naming the keys if `state_dict` does not fit the Loom model of `cfg`."""
    with torch.device("meta"):
        model = build_model(cfg, vocab_size=rows)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise ConfigError(
            f"checkpoint does not match model config {cfg.name!r}: {detail}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Tokenizers


def _tokenizer_of_corpus(directory: Path):
    """The tokenizer a prepared corpus's manifest names (raises OSError / ValueError)."""
    from data_pipeline.tokenizers import load_tokenizer

    manifest_path = directory / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        entry = manifest["tokenizer"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{manifest_path}: no readable tokenizer entry ({err})") from None
    return load_tokenizer(entry, directory)


def _tokenizer_from_spec(spec: str):
    """--tokenizer: a prepared corpus directory, a tokenizer.json, a .model file or 'byte'."""
    from data_pipeline.tokenizers import build_tokenizer

    path = Path(spec).expanduser()
    try:
        if path.is_dir():
            return _tokenizer_of_corpus(path), f"the corpus {path}"
        if spec == "byte" or spec.endswith((".json", ".model")):
            return build_tokenizer(spec), f"--tokenizer {spec}"
    except (OSError, ValueError) as err:
        raise ConfigError(f"--tokenizer {spec}: {err}") from None
    raise ConfigError(
        f"--tokenizer {spec}: expected a prepared corpus directory, a tokenizer.json, "
        "a SentencePiece .model file or 'byte'"
    )


def _data_config(run: DictConfig):
    from data_pipeline.config import DataConfig

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), run.data))


def _sample_corpus_dir(data, cfg: ModelConfig) -> Path:
    """Where training prepared the built-in corpus for these settings (it may be gone)."""
    from data_pipeline.objectives import row_length
    from data_pipeline.sample_corpus import default_cache_dir, sample_corpus_key

    objective = data.objective or cfg.objective
    row_len = row_length(objective, cfg=data, seq_len=data.seq_len or cfg.max_seq_len)
    key = sample_corpus_key(
        tokenizer_spec=data.tokenizer, seq_len=row_len - 1, val_fraction=data.val_fraction
    )
    root = Path(data.cache_dir).expanduser() if data.cache_dir else default_cache_dir()
    return root / key


def find_tokenizer(run: DictConfig | None, cfg: ModelConfig, *, spec: str | None = None):
    """(tokenizer, where it came from) of a run, or (None, why not).

    `spec` (--tokenizer) wins and any problem with it raises ConfigError; otherwise the run
    config's `data` section is followed (see the module docstring).
    """
    from data_pipeline.tokenizers import ByteTokenizer

    if spec is not None:
        return _tokenizer_from_spec(spec)
    if run is None or "data" not in run:
        return None, "the config has no data section; name the tokenizer with --tokenizer"
    try:
        data = _data_config(run)
    except (OmegaConfBaseException, ValueError) as err:
        return None, f"the config's data section cannot be read ({err}); use --tokenizer"
    if data.sources:
        corpora = [Path(s.path) for s in data.sources]
    elif data.path is not None:
        corpora = [Path(data.path)]
    else:
        corpora = []
    try:
        if not corpora:
            directory = _sample_corpus_dir(data, cfg)
            if (directory / "manifest.json").is_file():
                return _tokenizer_of_corpus(directory), f"the built-in corpus {directory}"
            if data.tokenizer == "byte":
                return ByteTokenizer(), "data.tokenizer=byte"
            return None, (
                f"the built-in corpus prepared with data.tokenizer={data.tokenizer} is not in "
                f"{directory.parent} (deleted, or another $LOOM_CACHE); use --tokenizer"
            )
        found = [_tokenizer_of_corpus(path) for path in corpora]
    except (OSError, ValueError) as err:
        hint = " (relative paths are read from the current directory)" if corpora else ""
        return None, f"{err}{hint}; use --tokenizer"
    identities = {json.dumps(t.identity(), sort_keys=True) for t in found}
    if len(identities) > 1:
        return None, "the corpora of data.sources use different tokenizers; use --tokenizer"
    return found[0], "the corpus " + ", ".join(map(str, corpora))


def _as_hf_tokenizer(tokenizer):
    """A `tokenizers.Tokenizer` with the ids of a Loom tokenizer (see models/hf/tokenizer.py)."""
    from tokenizers import Tokenizer

    from data_pipeline.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer
    from models.hf import tokenizer as hf_tokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return hf_tokenizer.byte_tokenizer(tokenizer.special_tokens)
    if isinstance(tokenizer, HFTokenizer):
        return Tokenizer.from_str(tokenizer.hf_tokenizer.to_str())
    if isinstance(tokenizer, SentencePieceTokenizer):
        proto = tokenizer.sp_processor.serialized_model_proto()
        return hf_tokenizer.sentencepiece_tokenizer(proto, tokenizer.special_tokens)
    raise ConfigError(f"tokenizer kind {tokenizer.kind!r} has no Hugging Face form")


def _differs(directory: Path, tokenizer) -> str | None:
    """How the tokenizer saved in `directory` differs from Loom's on PROBE_TEXTS (None: not).

    `split_special_tokens=True` encodes reserved tokens' names as text, as Loom does. A
    SentencePiece tokenizer's decoding is compared without the reserved tokens: Loom decodes
    the pieces between two of them on their own, so a space after one is dropped, where
    SentencePiece and HF keep it.
    """
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    specials = set(tokenizer.special_tokens.values())
    skipped = specials if tokenizer.kind == "sentencepiece" else set()
    for text in PROBE_TEXTS:
        ids = tokenizer.encode(text)
        got = hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        if got != ids:
            return f"it encodes {text!r} to {got[:12]}, Loom to {ids[:12]}"
        ids = [i for i in ids if i not in skipped]
        back, loom_back = hf.decode(ids), tokenizer.decode(ids)
        if back != loom_back:
            return f"it decodes the ids of {text!r} to {back!r}, Loom to {loom_back!r}"
    return None


def _remove_tokenizer_files(output: Path) -> None:
    """Drop the tokenizer files of an earlier export into the same folder."""
    for name in _TOKENIZER_FILES:
        (output / name).unlink(missing_ok=True)


def write_tokenizer(
    tokenizer,
    output: Path,
    *,
    family: str,
    max_length: int,
    vocab_size: int,
    model: ModelConfig | None = None,
) -> tuple[list[str], str | None]:
    """Write `tokenizer` into the HF folder `output`: (file names, None), or ([], why not).

    The conventions are the family's, or those of the HF model the config `model` converts
    to (a BERT without the pair head is a RoBERTa). Nothing is written unless the reloaded
    tokenizer matches Loom's on PROBE_TEXTS.
    """
    from models.hf.tokenizer import save_tokenizer

    if tokenizer.vocab_size > vocab_size:
        return [], (
            f"the {tokenizer.kind} tokenizer has {tokenizer.vocab_size} ids but the model "
            f"{vocab_size} rows, so it is not the tokenizer this model was trained with"
        )
    staging = output / ".tokenizer"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_tokenizer(
            _as_hf_tokenizer(tokenizer),
            staging,
            conventions=hf_convert.token_conventions(family, model),
            special_ids=tokenizer.special_tokens,
            max_length=max_length,
        )
        problem = _differs(staging, tokenizer)
    except LoomError as err:
        problem = str(err)
    if problem is not None:
        shutil.rmtree(staging, ignore_errors=True)
        return [], f"the {tokenizer.kind} tokenizer cannot be written exactly: {problem}"
    names = sorted(p.name for p in staging.iterdir())
    for name in names:
        os.replace(staging / name, output / name)
    staging.rmdir()
    return names, None


# ---------------------------------------------------------------------------------------------
# Models


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


def _verify_saved(output: Path, model_class: type, hf_state: dict[str, torch.Tensor]) -> None:
    """Reload `output` as a user would and compare every converted tensor.

    `save_pretrained` writes a weight once when the config says it is tied to another, so a
    tie the checkpoint does not have would otherwise be lost without a word.
    """
    model = model_class.from_pretrained(output, local_files_only=True)
    reloaded = model.state_dict()
    for key, value in hf_state.items():
        if key not in reloaded or not torch.equal(reloaded[key].to(value.dtype), value):
            raise ValueError(f"reloading {output} does not give back the converted {key}")


_SPECIAL_TEXT_NOTE = (
    'Loom encodes text that spells a reserved token ("[MASK]", "<eos>", ...) as plain '
    "text; this tokenizer, like every transformers tokenizer, turns such strings into the "
    "special id. `tokenizer(text, split_special_tokens=True)` encodes exactly as Loom."
)


def _tokenizer_notes(tokenizer, cfg: ModelConfig) -> list[str]:
    notes = [_SPECIAL_TEXT_NOTE]
    conventions = hf_convert.token_conventions(cfg.family, cfg)
    if conventions.single is not None:
        single, pair = (
            " ".join(part.partition(":")[0] for part in parts)
            for parts in (conventions.single, conventions.pair or conventions.single)
        )
        notes.append(
            f"The tokenizer lays out a text as `{single}` and a pair as `{pair}`, as Loom's "
            f"{cfg.objective} objective does; `add_special_tokens=False` gives the text alone."
        )
    if tokenizer.kind == "sentencepiece":
        notes.append(
            "SentencePiece unigram models: where two splits of a text score the same (runs "
            'of one character, such as "*****"), tokenizers may pick another split than '
            "SentencePiece; the ids differ there, the text does not."
        )
    return notes


def _write_readme(output: Path, *, lines: list[str], notes: list[str]) -> None:
    text = ["# Exported from Loom", "", *lines]
    if notes:
        text += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    (output / "README.md").write_text("\n".join(text) + "\n", encoding="utf-8")


def _save_model(
    output: Path,
    cfg: ModelConfig,
    state_dict: dict[str, torch.Tensor],
    *,
    vocab: int,
    token_ids: dict[str, int] | None,
    verify: bool,
) -> type:
    """Convert, save with `save_pretrained` and (with `verify`) reload and compare; the HF
    model class (a T5 with experts is a SwitchTransformersForConditionalGeneration)."""
    hf_state = hf_convert.to_hf(cfg.family, state_dict, cfg)
    with torch.device("meta"):
        model = hf_convert.build_hf_model(cfg.family, cfg, vocab_size=vocab, token_ids=token_ids)
    _load_converted(model, hf_state)
    output.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output)
    if verify:
        _verify_saved(output, type(model), hf_state)
    return type(model)


def _export_tokenizer(tok, source: str, output: Path, cfg: ModelConfig, *, vocab: int):
    """Write the run's tokenizer (or say why not): (README line, notes)."""
    _remove_tokenizer_files(output)  # never leave an earlier export's tokenizer behind
    problem = source
    if tok is not None:
        _, problem = write_tokenizer(
            tok,
            output,
            family=cfg.family,
            max_length=cfg.max_seq_len,
            vocab_size=vocab,
            model=cfg,
        )
    if problem is not None:
        print(f"{PROG}: warning: no tokenizer written: {problem}", file=sys.stderr)
        return "Tokenizer: none (see the notes).", [f"No tokenizer was written: {problem}."]
    print(f"tokenizer: {tok.kind} from {source}")
    line = f"Tokenizer: {tok.kind} ({tok.vocab_size} ids), from {source}."
    return line, _tokenizer_notes(tok, cfg)


def export_to_hf(
    checkpoint: Path,
    output: Path,
    *,
    config: Path | None = None,
    verify: bool = True,
    tokenizer: str | None = None,
) -> Path:
    """Loom `checkpoint` (step_N in either form, or a run directory) -> HF folder `output`.

    `verify` reloads the folder with transformers and compares every tensor (needs memory
    for a second copy of the model). `tokenizer` overrides the tokenizer found from the run
    config (see the module docstring).
    """
    checkpoint = resolve_checkpoint(checkpoint)
    config = config or _run_config_path(checkpoint)
    run = _load_yaml(config, what="run config (give --config)")
    cfg = _model_config(run, config)
    _check_has_hf_class(cfg)
    hf_convert.token_conventions(cfg.family, cfg)  # an unconvertible model fails before reading
    state_dict, facts = read_model_state(checkpoint)
    # Modules only training uses (a distilled student's projections) are no part of the model.
    state_dict = hf_convert.drop_training_only(cfg.family, state_dict)
    rows = vocab_rows(cfg, state_dict)
    _check_loads(cfg, state_dict, rows=rows)
    vocab = cfg.vocab_size if cfg.vocab_size is not None else rows
    tok, source = find_tokenizer(run, cfg, spec=tokenizer)
    token_ids = tok.special_tokens if tok is not None and tok.vocab_size <= vocab else None

    model_class = _save_model(
        output, cfg, state_dict, vocab=vocab, token_ids=token_ids, verify=verify
    )
    tokenizer_line, notes = _export_tokenizer(tok, source, output, cfg, vocab=vocab)
    notes += hf_convert.export_notes(cfg.family, cfg)
    if not facts["verified"]:
        notes.append(f"{checkpoint} has no metadata.json, so its files were not checksummed.")
        print(f"{PROG}: note: {checkpoint} has no metadata.json; not checksummed", file=sys.stderr)
    step = f", step {facts['step']}" if facts["step"] is not None else ""
    lines = [
        f"Model: {cfg.name} (Loom family {cfg.family}) as "
        f"{model_class.__name__}, {vocab} vocabulary rows.",
        f"Source: {checkpoint.resolve()} ({facts['form']}{step}), config {config.resolve()}.",
        tokenizer_line,
    ]
    _write_readme(output, lines=lines, notes=notes)
    return output


def export_to_loom(
    hf_dir: Path, output: Path, *, model_config: Path | None = None, name: str | None = None
) -> Path:
    """HF folder `hf_dir` -> `output`/model.pt + `output`/config.yaml (model section)."""
    from transformers import AutoConfig

    if not (hf_dir / "config.json").is_file():
        raise MissingCheckpointError(
            f"{hf_dir / 'config.json'} does not exist (not a Hugging Face model folder)"
        )
    hf_cfg = AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    family = hf_convert.family_of(hf_cfg)
    if model_config is not None:
        cfg = load_model_config(model_config)
        if cfg.family != family:
            raise ConfigError(
                f"{model_config}: model.family={cfg.family!r} but {hf_dir} holds a {family} model"
            )
        if cfg.vocab_size is None:
            cfg = dataclasses.replace(cfg, vocab_size=hf_cfg.vocab_size)
    else:
        cfg = hf_convert.loom_config(family, hf_cfg, name=name)
    if name is not None:
        cfg = dataclasses.replace(cfg, name=name)

    _, state_dict = hf_convert.read_hf_folder(hf_dir, cfg=cfg)
    _check_loads(cfg, state_dict, rows=cfg.padded_vocab_size())
    output.mkdir(parents=True, exist_ok=True)
    torch.save(state_dict, output / "model.pt")
    yaml_text = OmegaConf.to_yaml(OmegaConf.create({"model": dataclasses.asdict(cfg)}))
    (output / "config.yaml").write_text(yaml_text)
    return output


# ---------------------------------------------------------------------------------------------
# Command line


def _quiet_transformers() -> None:
    """No progress bars for a folder of a few files (warnings and errors still show)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        return
    hf_logging.disable_progress_bar()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="Loom RUN_DIR/checkpoints/step_N or RUN_DIR (or, with --to-loom, an HF folder)",
    )
    parser.add_argument("--output", type=Path, required=True, help="folder to write")
    parser.add_argument(
        "--config", type=Path, help="run config.yaml (default: RUN_DIR/config.yaml)"
    )
    parser.add_argument(
        "--tokenizer",
        help="tokenizer to write instead of the run's: a prepared corpus directory, a "
        "tokenizer.json, a SentencePiece .model file or 'byte'",
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _quiet_transformers()
    try:
        if args.to_loom:
            out = export_to_loom(
                args.checkpoint, args.output, model_config=args.model_config, name=args.name
            )
        else:
            out = export_to_hf(
                args.checkpoint,
                args.output,
                config=args.config,
                verify=not args.no_verify,
                tokenizer=args.tokenizer,
            )
    except LoomError as err:
        return report(err, prog=PROG)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    exit_after(main)
