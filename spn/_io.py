"""Atomic file writes: readers see the old file or the whole new one, never a part.

A temporary file beside the target is written, flushed to disk and renamed over the target
(``os.replace``, atomic on POSIX and Windows). The file gets the permissions of a file
created with ``open`` (0666 minus the umask), not ``mkstemp``'s private 0600.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_path", "remove_stale_temporaries", "unused_path", "write_atomic"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on a clean exit it is renamed to ``path``, on
    any error removed (``path`` untouched). The parent folder is created if missing."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Call ``write(file)`` on a temporary binary file beside ``path``, fsync it, then rename it
    to ``path``. On any error the temporary file is removed and ``path`` is untouched."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        write(file)
        file.flush()
        os.fsync(file.fileno())


def unused_path(path: str | os.PathLike[str]) -> Path:
    """``path`` if nothing is there, else the first of ``<stem>_2<suffix>``, ``<stem>_3<suffix>``, ...
    that is free: for records named by default (by date), so that a second run the same day
    does not replace the first."""
    target = Path(path)
    number = 2
    while target.exists() or target.is_symlink():
        target = target.with_name(f"{Path(path).stem}_{number}{Path(path).suffix}")
        number += 1
    return target


# The names `atomic_path` gives its temporaries: ".<target name>.<8 characters of mkstemp>.tmp".
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")


def remove_stale_temporaries(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that `atomic_path` leaves in ``folder`` when its process is
    killed between the write and the rename (kill -9, power loss; the targets themselves are
    whole): files named as it names them, nothing else. Call it only where no other writer is at
    work. Returns what it removed."""
    removed = []
    for stale in sorted(Path(folder).glob(".*.tmp")):
        if stale.is_file() and _TEMPORARY.fullmatch(stale.name):
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
