"""Shared fixtures: a small prepared corpus and a cache dir kept out of the user's home."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    """The tests compare runs bit for bit: settle CPU math first (common.cpu_math)."""
    from common.cpu_math import settle_cpu_math

    settle_cpu_math()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def loom_cache(tmp_path_factory) -> Path:
    """One cache for the built-in corpus, shared by every test (and its subprocesses)."""
    path = Path(os.environ.get("LOOM_TEST_CACHE") or tmp_path_factory.mktemp("loom_cache"))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(fn, nprocs: int, *args) -> None:
    """Run fn(rank, *args) in `nprocs` spawned processes and wait for them; a rank that
    raises fails the call with its traceback. A rank that returns ends at once, as
    launch/train.py does (common.process.end_process says why): gloo's threads would
    otherwise make it abort at exit now and then. Results go to files or a SimpleQueue,
    which are written before fn returns."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(fn, args), nprocs=nprocs, start_method="spawn")


def _rank_main(rank: int, fn, args: tuple) -> None:
    from common.cpu_math import settle_cpu_math
    from common.process import end_process

    settle_cpu_math()
    fn(rank, *args)
    end_process(0)


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_command(*overrides: str, nproc: int = 1, torchrun_args: tuple = ()) -> list[str]:
    """launch/train.py with these overrides, under torchrun when nproc > 1."""
    script = str(ROOT / "launch" / "train.py")
    if nproc == 1:
        return [sys.executable, script, *overrides]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        *torchrun_args,
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        script,
        *overrides,
    ]


@pytest.fixture()
def train_env(loom_cache) -> dict[str, str]:
    """The environment training subprocesses run with (the shared corpus cache)."""
    launcher = ("LOOM_EXIT_STATE", "TORCHELASTIC_RUN_ID", "WORLD_SIZE", "RANK", "SLURM_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(launcher)}
    return {**env, "LOOM_CACHE": str(loom_cache), "PYTHONUNBUFFERED": "1"}


@pytest.fixture()
def train_cli(train_env):
    """Run launch/train.py in a subprocess as a user would; returns CompletedProcess."""
    import subprocess

    def run(
        *overrides: str,
        cwd: Path | None = None,
        nproc: int = 1,
        check: bool = True,
        timeout: float = 600,
        env: dict[str, str] | None = None,
    ):
        cmd = train_command(*overrides, nproc=nproc)
        proc = subprocess.run(
            cmd,
            cwd=cwd or ROOT,
            env={**train_env, **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{cmd} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        # A log call whose arguments do not fit its format loses its line without failing.
        assert "--- Logging error ---" not in proc.stderr, proc.stderr
        return proc

    return run


_ONE_PROCESS: dict[tuple[str, ...], Path] = {}


@pytest.fixture()
def one_process(train_cli, tmp_path_factory):
    """The single-process run of exactly these overrides, trained once per session: the
    reference that several distributed runs of the same config are compared with."""

    def run(*overrides: str) -> Path:
        if overrides not in _ONE_PROCESS:
            out = tmp_path_factory.mktemp("one_process")
            train_cli(*overrides, f"trainer.out_dir={out}")
            _ONE_PROCESS[overrides] = out
        return _ONE_PROCESS[overrides]

    return run


def final_weights(run_dir: Path) -> dict:
    """The model state of a run's last checkpoint, whole, by parameter name."""
    from parallel.state import read_full

    ckpt = max((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
    return read_full(ckpt / "dcp")["model"]


def assert_same_weights(run_a: Path, run_b: Path, *, atol: float = 1e-6) -> None:
    """Two runs ended with the same parameters (rtol 1e-5, atol 1e-6 unless given), by name."""
    import torch

    wa, wb = final_weights(run_a), final_weights(run_b)
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-5, atol=atol, msg=name)


def assert_same_losses(run_a: Path, run_b: Path, *, tol: float = 1e-5) -> None:
    """Two runs logged the same steps with train and validation losses within `tol`."""
    a, b = read_metrics(run_a), read_metrics(run_b)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b, strict=True):
        key = "loss" if "loss" in x else "val_loss"
        assert abs(x[key] - y[key]) < tol, (x["step"], key, x[key], y[key])


def worker_pids(out_dir: Path) -> dict[int, int]:
    """{rank: pid} of the training processes of the run writing to `out_dir` (not torchrun's
    agent): their command line names the run directory, their environment the rank."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"trainer.out_dir={out_dir}".encode() not in cmdline:
            continue
        if b"torch.distributed.run" in cmdline:
            continue
        rank = next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), 0)
        found[rank] = int(proc.name)
    return found
