"""One process trains a run directory at a time: `RUN/.lock` holds the pid and host of the process that
trains it. The lock file appears complete or not at all (written aside, then hard-linked into place,
which fails if a lock exists), and a lock whose process is gone (killed with kill -9, say) is stale:
the next process takes it over."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

from mmlab_cli.data.format import check_writable, read_json_object
from mmlab_cli.errors import MmlabError

LOCK_NAME = ".lock"


def _holder(lock: Path) -> dict:
    return read_json_object(lock) or {}


def _alive(holder: dict) -> bool:
    """Whether the holder may still run: a pid on this host that exists (and is not this process);
    on another host there is no way to tell, so it counts as alive."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    mine = {"pid": os.getpid(), "host": socket.gethostname()}
    draft = root / f".lock.{os.getpid()}"
    draft.write_text(json.dumps(mine))
    try:
        for _ in range(2):
            try:
                os.link(draft, lock)
                break
            except FileExistsError:
                holder = _holder(lock)
                if _alive(holder):
                    raise MmlabError(f"{lock}: process {holder['pid']} on {holder['host']} is training {root}; "
                                     f"wait for it to end (if it no longer runs, delete {lock})") from None
                lock.unlink(missing_ok=True)  # stale: its process is gone
        else:
            raise MmlabError(f"{lock}: another process took the lock while a stale one was removed; try again")
    finally:
        draft.unlink(missing_ok=True)
    try:
        yield
    finally:
        if _holder(lock) == mine:
            lock.unlink(missing_ok=True)
