"""One process trains a run directory at a time: it holds an exclusive `fcntl.flock` on `RUN/.lock` for as long
as it trains. The kernel takes the lock atomically (two resumes started at the same instant cannot both get it)
and releases it when the process ends, however it ends (kill -9 included), so there is no stale lock to judge:
a `.lock` file nobody holds is simply taken. The file also records the holder's pid and host, for the message
a second process gets."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from mmlab_cli.data.format import check_writable, read_json_object
from mmlab_cli.errors import MmlabError

LOCK_NAME = ".lock"


def _holder(lock: Path) -> str:
    holder = read_json_object(lock) or {}
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"


def _flock(fd: int, mode: int, tries: int = 1) -> bool:
    """Take `mode` on `fd` without waiting, trying `tries` times 50 ms apart; whether it was taken."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if attempt + 1 < tries:
                time.sleep(0.05)
    return False


def _acquire(lock: Path) -> int:
    """An open descriptor of `lock` holding its flock, or a one-line error naming the live holder. A few tries:
    `lock_holder`'s probe holds a shared lock for an instant. The file is removed by its holder when it is
    done, so a lock taken on a file already unlinked is retried on the file now at that path (else two
    processes could each hold a lock on a different file)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        if not _flock(fd, fcntl.LOCK_EX, tries=5):
            os.close(fd)
            raise MmlabError(f"{lock}: {_holder(lock)} is training {lock.parent}; wait for it to end")
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def lock_holder(root: str | Path) -> str | None:
    """'process PID on HOST' while another process holds RUN/.lock, else None (free, or left by a process that
    is gone). A probe that never waits: a shared lock taken and dropped at once."""
    lock = Path(root) / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        if _flock(fd, fcntl.LOCK_SH):
            return None
        return None if (read_json_object(lock) or {}).get("pid") == os.getpid() else _holder(lock)
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(root: str | Path):
    """Hold RUN/.lock while the block runs (creating RUN if needed); a live holder is a one-line error."""
    root = Path(root)
    check_writable(root)
    lock = root / LOCK_NAME
    fd = _acquire(lock)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        yield
    finally:
        lock.unlink(missing_ok=True)  # while still holding it: a waiter that opened this file retries
        os.close(fd)
