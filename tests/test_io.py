"""Atomic writes (spn._io): all or nothing, and ordinary file permissions."""

from __future__ import annotations

import os
import stat

import pytest

from spn._io import atomic_path, write_atomic


def test_written_file_has_umask_permissions(tmp_path):
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.json", lambda file: file.write(b"{}"))
        with atomic_path(tmp_path / "b.png") as temporary:
            temporary.write_bytes(b"x")
    finally:
        os.umask(old)
    for name in ("a.json", "b.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640  # 0666 & ~0027, not mkstemp's 0600


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("old")

    def fail(file):
        file.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["record.json"]


def test_parent_folder_is_created(tmp_path):
    write_atomic(tmp_path / "a" / "b" / "c.txt", lambda file: file.write(b"ok"))
    assert (tmp_path / "a" / "b" / "c.txt").read_bytes() == b"ok"
