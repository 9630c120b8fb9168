"""The engine directory on disk: the output folder checked, the new one written in a work folder beside it (work
folders that a killed export left behind removed first) and swapped in atomically, and the previous export's
TensorRT engines carried over when their ONNX graph did not change."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from movq_deploy import manifest as mf
from movq_deploy.engine_cache import TIMING_CACHE_NAME
from movq_deploy.files import new_temp_dir


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def remove_stale_work_dirs(out: Path) -> "list[Path]":
    """Removes the work folders of exports to `out` whose process is gone (killed mid-export); returns them.

    A work folder is named .<out name>.<pid>-<random>.tmp; one whose process still runs (a concurrent export) is
    left alone, and so is anything else beside `out`.
    """
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(\d+)-[^.]+\.tmp")
    stale = []
    for path in sorted(out.parent.glob(f".{out.name}.*.tmp")):
        match = pattern.fullmatch(path.name)
        if match and path.is_dir() and not _process_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            stale.append(path)
    return stale


def make_work_dir(out: Path) -> Path:
    """A fresh folder beside `out` for the new engine directory, named after this process (remove_stale_work_dirs
    reads the name), with the permissions of an ordinary directory."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work_dirs(out)
    # mkdir applies the umask itself (mkdtemp would make it private, and reading the umask means setting it, which
    # races with other threads creating files)
    return new_temp_dir(out.parent, prefix=f".{out.name}.{os.getpid()}-")


def _replace_dir(new: Path, out: Path) -> None:
    """Puts the finished directory `new` at `out`; an existing `out` is swapped out and removed only afterwards."""
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(new, out)
    except OSError:
        os.replace(old / out.name, out)
        raise
    shutil.rmtree(old)


def carry_over_engines(out: Path, work: Path, graphs: dict) -> dict:
    """The previous export's TensorRT engines whose ONNX graph is byte-identical to the new one (same sha256): their
    plans (and the timing cache) are copied into `work`, so build_trt.py need not rebuild them. Returns their
    manifest "engines" entries."""
    try:
        previous = mf.EngineDir.load(out)
    except (FileNotFoundError, ValueError):
        return {}
    kept: dict = {}
    for precision, engines in previous.engines.items():
        for graph, entry in engines.items():
            onnx_entry = graphs.get(precision, {}).get(graph)
            if onnx_entry and entry.get("onnx_sha256") == onnx_entry["sha256"] and (out / entry["file"]).is_file():
                shutil.copy2(out / entry["file"], work / entry["file"])
                kept.setdefault(precision, {})[graph] = entry
    timing_cache = out / TIMING_CACHE_NAME
    if timing_cache.is_file():
        shutil.copy2(timing_cache, work / TIMING_CACHE_NAME)
    return kept


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / mf.MANIFEST_NAME).is_file():
        raise ValueError(f"refusing to replace {out}: it is not empty and not an engine directory (no manifest.json)")
