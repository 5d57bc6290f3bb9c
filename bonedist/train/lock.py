"""One writer per run folder: an exclusive lock (``flock`` on ``RUN/.lock``) taken by rank 0 before anything is
written and held for the whole job, naming its holder (host, pid, Slurm job). A second ``train`` into the folder is
refused in one line naming the holder; the kernel releases the lock of a killed process, so a lock left by a killed
job is taken over (with a line saying so), and a requeued Slurm job takes it when the first has ended.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from bonedist import BonedistError

LOCK_NAME = ".lock"


def _identity() -> dict:
    job = os.environ.get("SLURM_JOB_ID")
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": job,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def describe(holder: dict) -> str:
    job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}{job}, since {holder.get('since', '?')}"


class RunLock:
    """``acquire()`` returns a note when it took over a lock left by a process that is gone, else None; raises
    ``BonedistError`` naming the holder when another process holds it. ``release()`` at the end of the run."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> str | None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise BonedistError(f"{self.path.parent} is being trained by another process ({describe(holder)}): two "
                                f"writers would corrupt each other's checkpoints and metrics. Wait for it to end, "
                                f"stop it, or train into another --experiment or --runs-dir") from None
        previous = _read(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(_identity()) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if previous and previous.get("pid") is not None:
            return f"took over the lock of {self.path.parent} left by {describe(previous)}: that process is gone"
        return None

    def release(self) -> None:
        """Unlock; the holder's line is cleared, so a clean end leaves no holder behind."""
        if self.fd is None:
            return
        os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


def _read(fd: int) -> dict:
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(text) if text else {}
    except (OSError, json.JSONDecodeError):
        return {}
