"""Output folders: checked before anything is written into them, and one writer each.

:func:`check_output_dir` turns a folder that cannot be created (a regular file in the way) into one line naming
the path and the file. :class:`DirLock` is the one-writer rule: a pretraining's ``run.output_dir`` and each
transfer trial's folder hold a lock file while a process writes there, so that a second process on the same
folder refuses (pretraining) or skips that trial (``transfer/run_all.py``) instead of rewriting the same files.

The lock is a file created atomically with ``os.open(O_CREAT | O_EXCL)`` that holds its holder's host, PID and
start time, rather than ``fcntl.flock``: it works the same on every OS (``fcntl`` is POSIX only) and on network
file systems where ``flock`` is emulated or not shared between hosts (a cluster's results folder), and it says
who holds it, so the message can name the process and the host. Its cost is that a killed holder (SIGKILL, a
lost node) leaves the file behind, hence the stale rule: a lock of this host whose PID no longer runs is taken
over, with a log line; so is one of an earlier run of this very SLURM job (the same ``SLURM_JOB_ID``: a requeued
job, which may start on another node). Any other lock of another host cannot be checked from here: it holds until
that host's run ends, or until it is removed by hand (the message names the file). Under torchrun only rank 0 takes a lock and
tells the other ranks the verdict: a rank must never be refused by its own rank 0's lock.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import sys
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class OutputDirError(RuntimeError):
    """An output folder that cannot be written: a file in the way, or another process writing there."""


def check_output_dir(path: str | os.PathLike, what: str = "output") -> None:
    """Raise :class:`OutputDirError` when ``path`` cannot be a folder: it, or a folder above it, is a file."""
    path = Path(path)
    for p in (path, *path.parents):
        if p.is_dir():
            return
        if p.exists():
            raise OutputDirError(f"{what} {path} cannot be created: {p} is a file, not a folder "
                                 f"(choose another {what} or move that file)")


def _pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this host (unknown -> alive: a lock is never taken on a guess)."""
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stale(holder: dict) -> Optional[str]:
    """Why the lock's holder is gone (a PID of this host that no longer runs, an earlier run of this SLURM job),
    or None when it may still run."""
    job = os.environ.get("SLURM_JOB_ID", "")
    me = (socket.gethostname(), os.getpid())
    if job and holder.get("slurm_job_id") == job and (holder.get("host"), holder.get("pid")) != me:
        return f"an earlier run of this SLURM job {job}"
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid > 0 and not _pid_alive(pid):
        return "that process no longer runs"
    return None


def describe_holder(holder: dict) -> str:
    return (f"host {holder.get('host', '?')} pid {holder.get('pid', '?')} since {holder.get('started_at', '?')}")


class DirLock:
    """``<folder>/.lock`` for one writer of ``folder``. :meth:`acquire` returns None once this process holds it,
    else the holder's description; :meth:`release` removes the file if it is still this process's.
    ``taken_over``: the line to log when :meth:`acquire` took over a stale lock (the caller logs it once its
    log file is open), else None."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.held = False
        self.taken_over: Optional[str] = None

    def _content(self) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                           "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
                           "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "command": " ".join(sys.argv)[:500]}) + "\n"

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(self._content())
        self.held = True
        return True

    def _read(self, path: Path) -> Optional[str]:
        try:
            return path.read_text()
        except FileNotFoundError:
            return None

    def acquire(self) -> Optional[str]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # the holder may release it between our attempt and our read
            if self._create():
                return None
            text = self._read(self.path)
            if text is None:
                continue
            try:
                holder = json.loads(text)
            except json.JSONDecodeError:  # being written this instant, or damaged: not ours to take
                return f"an unreadable lock ({self.path}; remove it if no process writes there)"
            why = _stale(holder)
            if why is None:
                return f"{describe_holder(holder)} ({self.path})"
            # stale: its holder was killed. Move it aside first so that, of two processes taking it over,
            # only the one whose rename moved that very file goes on
            aside = self.path.with_name(f"{LOCK_NAME}.stale.{self.token}")
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                continue
            if self._read(aside) != text:  # another process took it over first: put its lock back
                os.replace(aside, self.path)
                continue
            aside.unlink()
            self.taken_over = f"{self.path}: stale lock of {describe_holder(holder)} ({why}): taken over"
        if self._create():
            return None
        text = self._read(self.path) or "{}"
        try:
            return f"{describe_holder(json.loads(text))} ({self.path})"
        except json.JSONDecodeError:
            return f"an unreadable lock ({self.path}; remove it if no process writes there)"

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        text = self._read(self.path)
        try:
            mine = text is not None and json.loads(text).get("token") == self.token
        except json.JSONDecodeError:
            mine = False
        if mine:
            try:
                self.path.unlink()
            except OSError as e:  # never let a release hide the trial's own outcome
                if e.errno != errno.ENOENT:
                    log.warning("could not remove the lock %s: %s", self.path, e)
