"""Writing artifacts so that nothing already on disk is lost when a write fails halfway."""
from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path
from typing import Iterator

_ATTEMPTS = 100  # name collisions of 32 random bits before giving up


def new_temp_file(directory: "str | os.PathLike[str]", prefix: str, suffix: str = ".tmp") -> Path:
    """Creates an empty file with a fresh name in `directory`, with the mode a plain open() gives (0666 less the umask).

    Created with O_EXCL and mode 0666 so that the kernel applies the umask: reading the umask would mean setting it
    (os.umask), which races with every other thread that creates a file meanwhile.
    """
    for _ in range(_ATTEMPTS):
        path = Path(directory) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {directory}")


def new_temp_dir(directory: "str | os.PathLike[str]", prefix: str, suffix: str = ".tmp") -> Path:
    """Creates an empty directory with a fresh name in `directory`, mode 0777 less the umask (as os.mkdir gives)."""
    for _ in range(_ATTEMPTS):
        path = Path(directory) / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no free temporary name {prefix}*{suffix} in {directory}")


@contextlib.contextmanager
def atomic_path(path: "str | os.PathLike[str]") -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is renamed onto `path`, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_file(path.parent, prefix=f".{path.name}.")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: "str | os.PathLike[str]", data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: "str | os.PathLike[str]", text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: "str | os.PathLike[str]") -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
