"""Checkpoints that a crash or kill can never corrupt.

Layout of `<out_dir>/checkpoints/step_N/`:
  dcp/              model and optimizer state, sharded: every rank writes its own shards
                    (torch.distributed.checkpoint), loadable under any other layout
  trainer.pt        step, data position and loss-scaler state (rank 0)
  rng_rank{R}.pt    every RNG of rank R (dropout streams differ per rank)
  metadata.json     size and sha256 of each file above; written last
The single-file form (model.pt + optim.pt instead of dcp/, see launch/convert_checkpoint.py)
loads the same way.

A checkpoint is written under `.tmp_step_N`, fsynced, and renamed to `step_N` only when
complete, so `step_N` either exists whole or not at all. Loading verifies every file
against metadata.json and reads with `torch.load(weights_only=True)`; a bad checkpoint
is reported by name and the previous one is tried.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from common.errors import CheckpointError, ConfigError
from common.log import get_logger

_STEP_DIR = re.compile(r"^step_(\d+)$")
log = get_logger("loom.checkpoint")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _save_synced(obj: object, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seal(directory: Path, *, step: int) -> None:
    """Write metadata.json (size and sha256 of every file below `directory`) and fsync."""
    files = {
        str(f.relative_to(directory)): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(directory.rglob("*"))
        if f.is_file() and f.name != "metadata.json"
    }
    with open(directory / "metadata.json", "w") as f:
        json.dump({"step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for sub in [directory, *(d for d in directory.rglob("*") if d.is_dir())]:
        _fsync_dir(sub)


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint directories, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = []
    for child in ckpt_dir.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found)


def verify(path: Path) -> dict:
    """Check every file of a checkpoint against its metadata; return the metadata."""
    meta_path = path / "metadata.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable metadata ({exc})") from None
    for name, info in meta["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if file.stat().st_size != info["bytes"]:
            raise CheckpointError(
                f"{file}: {file.stat().st_size} bytes, metadata says {info['bytes']} (truncated?)"
            )
        if _sha256(file) != info["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch")
    return meta


def load_file(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged zip archives
        raise CheckpointError(f"{path}: cannot be loaded ({exc})") from None


class CheckpointManager:
    """Saves, prunes and finds checkpoints under `<out_dir>/checkpoints`."""

    def __init__(self, out_dir: str | Path, *, keep: int, rank: int, barrier) -> None:
        self.dir = Path(out_dir) / "checkpoints"
        self.keep = keep
        self.rank = rank
        self._barrier = barrier

    def save(
        self,
        step: int,
        *,
        shared: dict[str, object],
        per_rank: dict[str, object],
        sharded: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write `shared` files from rank 0, `per_rank` files and `sharded(dir)` from every
        rank, atomically.

        shared: {"trainer.pt": state}; per_rank: {"rng": state} -> rng_rank{R}.pt;
        sharded: a collective writing the sharded states under `<checkpoint>/dcp`.
        """
        tmp = self.dir / f".tmp_step_{step}"
        final = self.dir / f"step_{step}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        for stem, obj in per_rank.items():
            _save_synced(obj, tmp / f"{stem}_rank{self.rank}.pt")
        if sharded is not None:
            sharded(tmp / "dcp")
        if self.rank == 0:
            for name, obj in shared.items():
                _save_synced(obj, tmp / name)
        self._barrier()
        if self.rank == 0:
            self._seal(tmp, final, step)
            self._prune()
        self._barrier()
        return final

    def _seal(self, tmp: Path, final: Path, step: int) -> None:
        seal(tmp, step=step)
        if final.exists():  # a re-run of the same step after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.dir)

    def _prune(self) -> None:
        for _, path in list_checkpoints(self.dir)[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)

    def latest_valid(self) -> Path | None:
        """Newest checkpoint that passes verification; bad ones are reported and skipped."""
        for step, path in reversed(list_checkpoints(self.dir)):
            try:
                verify(path)
                return path
            except CheckpointError as exc:
                log.error("checkpoint step_%d is unusable, trying the previous one: %s", step, exc)
        return None

    def load(self, path: Path) -> dict[str, dict]:
        """Verify and read a checkpoint's small files: {"trainer": .., "rng": ..}, plus
        "model" and "optim" when it is in single-file form (no dcp/ folder).

        A rank with no RNG file of its own (the job grew) takes rank 0's states.
        """
        verify(path)
        names = ["trainer"] if (path / "dcp").is_dir() else ["model", "optim", "trainer"]
        out = {name: load_file(path / f"{name}.pt") for name in names}
        own = path / f"rng_rank{self.rank}.pt"
        out["rng"] = load_file(own if own.exists() else path / "rng_rank0.pt")
        return out


def resolve_resume(manager: CheckpointManager, resume: str) -> Path | None:
    """trainer.resume -> the checkpoint to load (None: start fresh)."""
    if resume == "never":
        return None
    if resume == "auto":
        return manager.latest_valid()
    path = Path(resume)
    if not path.is_dir():
        raise ConfigError(f"trainer.resume={resume!r} is not a checkpoint directory")
    verify(path)
    return path
