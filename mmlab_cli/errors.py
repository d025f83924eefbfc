"""The exceptions the CLI turns into a one-line message and an exit code (docs/reliability.md)."""

import errno
import shutil
from pathlib import Path


class MmlabError(Exception):
    """A problem with the user's input: the message names the file and the fix. Exit code 2."""

    exit_code = 2


class TrainingDiverged(MmlabError):
    """Training produced a non-finite loss or weights, or an exploding loss (--diverge-factor); the last good
    checkpoint is kept. Exit code 3."""

    exit_code = 3


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, an exhausted quota


def disk_full(path, needed: int | None = None) -> MmlabError:
    """The one-line error of a write that found no space: the path, the bytes it needed (when known) and what
    is free there now."""
    folder = Path(path)
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        free = f", {_size(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = ""
    need = f"{_size(needed)} needed" if needed is not None else "space needed"
    return MmlabError(f"{path}: no space left on the device ({need}{free}); free some space or write elsewhere, "
                      f"then run the command again")


def _size(n: int) -> str:
    """1536 -> '1.5 KB' (binary units)."""
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
