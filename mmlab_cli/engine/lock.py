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
from pathlib import Path

from mmlab_cli.data.format import check_writable, read_json_object
from mmlab_cli.errors import MmlabError

LOCK_NAME = ".lock"


def _acquire(lock: Path) -> int:
    """An open descriptor of `lock` holding its flock, or a one-line error naming the live holder. The file
    is removed by its holder when it is done, so a lock taken on a file already unlinked is retried on the
    file now at that path (else two processes could each hold a lock on a different file)."""
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = read_json_object(lock) or {}
            who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
            raise MmlabError(f"{lock}: {who} is training {lock.parent}; wait for it to end") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def lock_holder(root: str | Path) -> str | None:
    """'process PID on HOST' when a process of this host other than this one holds RUN/.lock and lives, else
    None: free, stale, or held from another host, whose process cannot be checked (run_lock refuses that one)."""
    holder = _holder(Path(root) / LOCK_NAME)
    live = holder.get("host") == socket.gethostname() and _alive(holder)
    return f"process {holder['pid']} on {holder['host']}" if live else None


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
