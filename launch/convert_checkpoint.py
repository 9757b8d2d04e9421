#!/usr/bin/env python
"""Convert a Loom checkpoint between its sharded and single-file forms.

    python launch/convert_checkpoint.py --to-single runs/x/checkpoints/step_100 out/step_100
    python launch/convert_checkpoint.py --to-sharded out/step_100 runs/y/checkpoints/step_100

Sharded: dcp/ (torch.distributed.checkpoint, one shard set per rank of the saving job).
Single-file: model.pt + optim.pt (full tensors keyed by parameter name, loadable with
torch.load(weights_only=True)). Both carry trainer.pt and rng_rank*.pt unchanged, are
written under a temporary name and sealed with checksums, and resume under any layout.

The source is checked against its metadata.json first, as training does before it resumes.
A missing, incomplete or damaged source, a source already in the asked-for form and an
existing output are reported as one line on stderr with exit code 2 (LOOM_DEBUG=1 shows the
traceback).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from common.errors import CheckpointError, LoomError, report  # noqa: E402
from common.process import exit_after  # noqa: E402
from parallel.state import read_full, write_sharded_from_full  # noqa: E402
from trainer.checkpoint import load_file, seal, verify  # noqa: E402


def _copy_small_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and (f.name == "trainer.pt" or f.name.startswith("rng_rank")):
            shutil.copy2(f, dst / f.name)


def convert(src: Path, dst: Path, *, to: str) -> Path:
    """Write the other form of checkpoint `src` to `dst` (which must not exist)."""
    if not src.is_dir():
        raise CheckpointError(f"{src} does not exist (expected a checkpoint directory step_N)")
    meta = verify(src)
    if dst.exists():
        raise CheckpointError(f"{dst} exists; choose a new output directory")
    sharded = (src / "dcp").is_dir()
    if (to == "single") != sharded:
        raise CheckpointError(f"{src} is already {'sharded' if sharded else 'single-file'}")
    tmp = dst.with_name(f".tmp_{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _copy_small_files(src, tmp)
    with warnings.catch_warnings():  # DCP says it works in one process, which is the point
        warnings.filterwarnings("ignore", "torch.distributed is", UserWarning)
        if to == "single":
            full = read_full(src / "dcp")
            torch.save(full["model"], tmp / "model.pt")
            torch.save(full["optim"], tmp / "optim.pt")
        else:
            state = {"model": load_file(src / "model.pt"), "optim": load_file(src / "optim.pt")}
            write_sharded_from_full(state, tmp / "dcp")
    seal(tmp, step=int(meta["step"]))
    os.replace(tmp, dst)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--to-single", action="store_true", help="sharded -> single-file")
    mode.add_argument("--to-sharded", action="store_true", help="single-file -> sharded")
    parser.add_argument("source", type=Path, help="checkpoint directory (step_N)")
    parser.add_argument("output", type=Path, help="new checkpoint directory")
    args = parser.parse_args(argv)
    try:
        out = convert(args.source, args.output, to="single" if args.to_single else "sharded")
    except LoomError as exc:
        return report(exc, prog="convert_checkpoint")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    exit_after(main)
