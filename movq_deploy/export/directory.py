"""The engine directory on disk: the output folder checked, the finished folder swapped in atomically, and the
previous export's TensorRT engines carried over when their ONNX graph did not change."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from movq_deploy import manifest as mf
from movq_deploy.engine_cache import TIMING_CACHE_NAME

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
