"""movq_deploy.files: atomic writes, and temporary names that get the umask's mode without touching the umask."""
from __future__ import annotations

import os
import stat

import pytest

from movq_deploy import files


@pytest.fixture
def umask():
    """Sets the process umask for one test (restored after)."""
    before = os.umask(0o022)
    os.umask(before)

    def set_umask(value: int) -> None:
        os.umask(value)

    yield set_umask
    os.umask(before)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_and_dirs_get_the_mode_open_and_mkdir_give(tmp_path, umask, monkeypatch, mask):
    umask(mask)

    def no_umask(_):  # setting the umask to read it races with other threads creating files
        raise AssertionError("os.umask called")

    monkeypatch.setattr(os, "umask", no_umask)
    files.atomic_write_text(tmp_path / "manifest.json", "{}\n")
    temp_dir = files.new_temp_dir(tmp_path, prefix=".engines.")
    monkeypatch.undo()
    assert _mode(tmp_path / "manifest.json") == 0o666 & ~mask
    assert _mode(temp_dir) == 0o777 & ~mask and temp_dir.name.startswith(".engines.") and temp_dir.name.endswith(".tmp")


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "plan"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["plan"]
    files.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["plan"]


def test_temp_names_never_reuse_an_existing_one(tmp_path, monkeypatch):
    names = iter(["aaaa", "aaaa", "bbbb"])
    monkeypatch.setattr(files.secrets, "token_hex", lambda n: next(names))
    first = files.new_temp_file(tmp_path, prefix=".x.")
    second = files.new_temp_file(tmp_path, prefix=".x.")
    assert (first.name, second.name) == (".x.aaaa.tmp", ".x.bbbb.tmp")
