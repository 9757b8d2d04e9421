#!/usr/bin/env python
"""A one-node Slurm cluster on this machine, for the tests/slurm tier and for trying
launch/submit.py by hand.

    python tests/slurm/cluster.py up DIR      # prints: export SLURM_CONF=DIR/slurm.conf
    python tests/slurm/cluster.py down DIR

Debian 12's slurm-wlm (22.05) runs as root without systemd or cgroups: process tracking by
/proc (`proctrack/linuxproc`, `task/none`), no accounting daemon, the node at 127.0.0.1
with every CPU of the machine (`nproc --all`: plain `nproc` honours OMP_NUM_THREADS). `up`
installs the packages when they are absent and this is root with apt-get (about 17 s),
starts munged if no munge daemon answers, writes the config and state into DIR (which
must be new: state left by another cluster can keep the node down), starts slurmctld and
slurmd on free ports and waits until the node is idle. `down` stops both daemons by their
pid files and waits for them to exit. Credentials expire after 5 s (AuthInfo
cred_expire=5), so a requeued job restarts in seconds rather than two minutes.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "munge", "slurm-client"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "munged"]


class Unavailable(RuntimeError):
    """This machine cannot run the cluster; the message says why."""


def install_if_absent() -> None:
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable("Slurm is not installed and this is not root with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {proc.stderr[-300:]}")


def munge_alive() -> bool:
    cred = subprocess.run(["munge", "-n"], capture_output=True)
    if cred.returncode != 0:
        return False
    return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True).returncode == 0


def start_munge() -> None:
    if munge_alive():
        return
    run = Path("/run/munge")
    run.mkdir(parents=True, exist_ok=True)
    shutil.chown(run, "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True)
    subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
    wait_for(munge_alive, 10, "munged to answer")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(directory: Path) -> Path:
    host = socket.gethostname().split(".")[0]
    cpus = int(subprocess.run(["nproc", "--all"], capture_output=True, text=True).stdout)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    for sub in ("state", "spool", "log"):
        (directory / sub).mkdir(parents=True)
    conf = directory / "slurm.conf"
    conf.write_text(
        f"""\
ClusterName=loomtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
KillWait=30
StateSaveLocation={directory}/state
SlurmdSpoolDir={directory}/spool
SlurmctldPidFile={directory}/slurmctld.pid
SlurmdPidFile={directory}/slurmd.pid
SlurmctldLogFile={directory}/log/slurmctld.log
SlurmdLogFile={directory}/log/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
    )
    return conf


def wait_for(predicate, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise Unavailable(f"timed out waiting for {what}")


def up(directory: Path) -> dict[str, str]:
    """Start the cluster in the new directory; the environment its commands need."""
    if os.geteuid() != 0:
        raise Unavailable("the test cluster runs its daemons as root")
    install_if_absent()
    start_munge()
    directory.mkdir(parents=True, exist_ok=False)
    conf = write_config(directory)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for daemon in ("slurmctld", "slurmd"):
        proc = subprocess.run([f"/usr/sbin/{daemon}"], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise Unavailable(f"{daemon} did not start: {proc.stderr.strip()[-300:]}")

    def node_idle() -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
        return out.stdout.strip() == "idle"

    try:
        wait_for(node_idle, 30, "the node to be idle")
    except Unavailable:
        down(directory)
        raise
    return {"SLURM_CONF": str(conf)}


def down(directory: Path) -> None:
    pids = []
    for name in ("slurmd", "slurmctld"):
        pid_file = directory / f"{name}.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().strip() or 0)
            try:
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except ProcessLookupError:
                pass

    def all_gone() -> bool:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        return not alive

    wait_for(all_gone, 30, "the Slurm daemons to exit")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("up", "down"):
        sys.exit(__doc__)
    target = Path(sys.argv[2]).resolve()
    try:
        if sys.argv[1] == "up":
            print(f"export SLURM_CONF={up(target)['SLURM_CONF']}")
        else:
            down(target)
    except Unavailable as exc:
        sys.exit(f"cluster: {exc}")
