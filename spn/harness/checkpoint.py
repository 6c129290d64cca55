"""Checkpoints and run files written atomically, read back with ``weights_only=True``.

A checkpoint holds only tensors, numbers, strings and containers of them, so that
``torch.load(path, weights_only=True)`` reads it without running any pickled code. Every file
a run writes goes to a temporary file in the same directory first and is then renamed over
the target (``os.replace`` is atomic on POSIX), so a run killed at any moment, even with
``kill -9``, leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from spn._io import write_atomic

__all__ = [
    "CheckpointError",
    "append_jsonl",
    "load_checkpoint",
    "save_checkpoint",
    "write_atomic",
    "write_json",
    "write_text",
]

FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or of another model or run."""


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """``text`` as UTF-8, written atomically."""
    data = text.encode()
    write_atomic(path, lambda file: _write_all(file, data))


def write_json(path: str | os.PathLike[str], value: Any) -> None:
    """``value`` as indented JSON, written atomically."""
    data = (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
    write_atomic(path, lambda file: _write_all(file, data))


def append_jsonl(
    path: str | os.PathLike[str], record: Mapping[str, Any], keep: Callable[[dict[str, Any]], bool] | None = None
) -> None:
    """Append one JSON line to ``path`` atomically (the file is rewritten whole), first dropping
    the existing lines for which ``keep`` is False (e.g. epochs a resumed run will redo)."""
    target = Path(path)
    lines = target.read_text().splitlines() if target.exists() else []
    if keep is not None:
        lines = [line for line in lines if line.strip() and keep(json.loads(line))]
    lines.append(json.dumps(dict(record), sort_keys=True))
    data = ("\n".join(lines) + "\n").encode()
    write_atomic(target, lambda file: _write_all(file, data))


def _write_all(file: IO[bytes], data: bytes) -> None:
    file.write(data)


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> None:
    """Save ``state`` (tensors, numbers, strings, containers) atomically with a format tag."""
    payload = {"format": FORMAT, **state}
    write_atomic(path, lambda file: torch.save(payload, file))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` on the CPU.

    Raises:
        CheckpointError: the file is missing, unreadable, or not an spn checkpoint.
    """
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"{source}: no checkpoint there")
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"{source}: not a readable checkpoint ({error})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{source}: not an spn checkpoint (format {FORMAT} expected)")
    return payload
