"""A one-node SLURM cluster on localhost, from Debian's ``slurm-wlm`` and ``munge``, for the
scale-out tests: its own munge key and socket, a minimal ``slurm.conf`` and every daemon's
state under one folder, so that it touches nothing of the machine's own set-up."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue")
START_SECONDS = 60


def missing_binaries() -> list[str]:
    """The programs the cluster needs that are not installed (``/usr/sbin`` included)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [name for name in DAEMONS if shutil.which(name, path=search) is None]


def _slurm_conf(root: Path, memory_mb: int) -> str:
    host = socket.gethostname().split(".")[0]
    user = getpass.getuser()
    return "\n".join([
        "ClusterName=bids_harmony_test",
        f"SlurmctldHost={host}(127.0.0.1)",
        "SlurmctldPort=16817",
        "SlurmdPort=16818",
        f"SlurmUser={user}",
        f"SlurmdUser={user}",
        "AuthType=auth/munge",
        f"AuthInfo=socket={root / 'munge.socket'}",
        "CredType=cred/munge",
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'slurmd.log'}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "SchedulerType=sched/builtin",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU_Memory",
        "DefMemPerCPU=500",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "KillWait=5",
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory_mb}",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ])


def _memory_mb() -> int:
    """What slurmd would report, less 1 GB for the daemons and the test itself."""
    with open("/proc/meminfo") as meminfo:
        total_kb = int(next(line for line in meminfo if line.startswith("MemTotal")).split()[1])
    return total_kb // 1024 - 1024


def _wait(what: str, ready, log: Path | None = None, seconds: float = START_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not ready():
        if time.monotonic() > deadline:
            tail = log.read_text()[-2000:] if log and log.is_file() else ""
            raise RuntimeError(f"{what} not ready after {seconds:.0f} s\n{tail}")
        time.sleep(0.5)


@contextmanager
def local_cluster(root: Path) -> Iterator[dict[str, str]]:
    """Start munged, slurmctld and slurmd under ``root``; yield the environment that reaches
    them (``SLURM_CONF``, the ``sbin`` path); cancel every job and stop the daemons after."""
    for folder in ("state", "spool", "munge"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([env.get("PATH", ""), "/usr/sbin", "/sbin"])
    env["SLURM_CONF"] = str(root / "slurm.conf")
    (root / "slurm.conf").write_text(_slurm_conf(root, _memory_mb()))
    key = root / "munge" / "munge.key"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], env=env, check=True,
                   capture_output=True)
    key.chmod(0o600)
    subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={root / 'munge.socket'}",
                    f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'munged.log'}",
                    f"--seed-file={root / 'munge' / 'munged.seed'}"],
                   env=env, check=True, capture_output=True)
    pid_files = [root / "munged.pid"]
    try:
        _wait("munged", (root / "munge.socket").exists, root / "munged.log")
        for daemon in ("slurmctld", "slurmd"):
            subprocess.run([daemon, "-f", env["SLURM_CONF"]], env=env, check=True,
                           capture_output=True)
            pid_files.append(root / f"{daemon}.pid")

        def node_idle() -> bool:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                                   text=True)
            return state.returncode == 0 and state.stdout.strip() == "idle"

        _wait("the SLURM node", node_idle, root / "slurmd.log")
        yield env
    finally:
        subprocess.run(["scancel", "--user", getpass.getuser()], env=env, capture_output=True)
        for pid_file in reversed(pid_files):
            if pid_file.is_file():
                try:
                    os.kill(int(pid_file.read_text().split()[0]), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass


def wait_for_jobs(env: dict[str, str], seconds: float) -> None:
    """Return when the queue is empty; fail with the queue after ``seconds``."""
    def empty() -> bool:
        queue = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
        return queue.returncode == 0 and not queue.stdout.strip()

    deadline = time.monotonic() + seconds
    while not empty():
        if time.monotonic() > deadline:
            queue = subprocess.run(["squeue"], env=env, capture_output=True, text=True)
            raise AssertionError(f"jobs still queued after {seconds:.0f} s:\n{queue.stdout}")
        time.sleep(1)
