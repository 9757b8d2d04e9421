from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from trainer.checkpoint import (
    CheckpointError,
    CheckpointManager,
    list_checkpoints,
    resolve_resume,
    rng_state,
    set_rng_state,
    verify,
)


def manager(tmp_path, keep=3):
    return CheckpointManager(tmp_path, keep=keep, rank=0, barrier=lambda: None)


def save(mgr, step):
    shared = {
        "model.pt": {"w": torch.full((4,), float(step))},
        "optim.pt": {"state": {}},
        "trainer.pt": {"step": step},
    }
    return mgr.save(step, shared=shared, per_rank={"rng": rng_state()})


def test_save_is_complete_and_loads(tmp_path):
    mgr = manager(tmp_path)
    path = save(mgr, 10)
    assert path.name == "step_10"
    assert sorted(p.name for p in path.iterdir()) == [
        "metadata.json",
        "model.pt",
        "optim.pt",
        "rng_rank0.pt",
        "trainer.pt",
    ]
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))
    state = mgr.load(path)
    assert torch.equal(state["model"]["w"], torch.full((4,), 10.0))
    assert state["trainer"]["step"] == 10


def test_keep_prunes_oldest(tmp_path):
    mgr = manager(tmp_path, keep=2)
    for step in (1, 2, 3):
        save(mgr, step)
    assert [s for s, _ in list_checkpoints(mgr.dir)] == [2, 3]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_meta", "delete_file"])
def test_corrupt_latest_is_named_and_previous_used(tmp_path, damage, caplog):
    mgr = manager(tmp_path)
    save(mgr, 1)
    bad = save(mgr, 2)
    target = bad / "model.pt"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:20])
    elif damage == "flip":
        data = bytearray(target.read_bytes())
        data[-5] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "delete_meta":
        (bad / "metadata.json").unlink()
    else:
        target.unlink()
    with pytest.raises(CheckpointError, match="step_2"):
        verify(bad)
    assert mgr.latest_valid().name == "step_1"
    assert "step_2" in caplog.text


def test_unfinished_temp_dir_is_ignored(tmp_path):
    mgr = manager(tmp_path)
    save(mgr, 5)
    (mgr.dir / ".tmp_step_6").mkdir()  # a save killed half-way
    assert resolve_resume(mgr, "auto").name == "step_5"
    assert resolve_resume(mgr, "never") is None
    with pytest.raises(ValueError, match="trainer.resume"):
        resolve_resume(mgr, str(tmp_path / "nope"))


def test_rng_round_trip():
    set_rng_state(rng_state())  # tolerates its own output
    state = rng_state()
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    set_rng_state(state)
    second = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
