"""Atomic writes (spn._io): all or nothing, and ordinary file permissions."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from spn._io import atomic_path, remove_stale_temporaries, unused_path, write_atomic


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


def test_a_writer_killed_before_its_rename_leaves_a_temporary_that_can_be_removed(tmp_path):
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"old")
    script = (
        "import os, sys\n"
        "from spn._io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as temporary:\n"
        "    temporary.write_bytes(b'new')\n"
        "    os._exit(9)  # killed between the write and the rename\n"
    )
    finished = subprocess.run([sys.executable, "-c", script, str(target)], check=False)
    assert finished.returncode == 9
    assert target.read_bytes() == b"old"
    (stale,) = tmp_path.glob(".checkpoint.pt.*.tmp")
    # not atomic_path's temporaries: the user's files stay
    others = [tmp_path / "notes.tmp", tmp_path / ".hidden", tmp_path / ".notes.tmp", tmp_path / ".my.notes.tmp"]
    for other in others:
        other.write_bytes(b"keep")
    (tmp_path / ".folder.tmp").mkdir()
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and all(other.exists() for other in others) and (tmp_path / ".folder.tmp").is_dir()


def test_unused_path_never_names_an_existing_file(tmp_path):
    # the benchmarks' default records are named by date: a second run the same day gets _2, then _3
    record = tmp_path / "torch_path_2026-12-03.json"
    assert unused_path(record) == record
    record.write_text("first")
    assert unused_path(record) == tmp_path / "torch_path_2026-12-03_2.json"
    (tmp_path / "torch_path_2026-12-03_2.json").write_text("second")
    (tmp_path / "torch_path_2026-12-03_3.json").symlink_to(tmp_path / "missing")  # a dangling link is taken too
    assert unused_path(record) == tmp_path / "torch_path_2026-12-03_4.json"
    assert record.read_text() == "first"
