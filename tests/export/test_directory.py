"""The engine directory on disk: stale work folders, the atomic swap, TensorRT engines carried over."""
from __future__ import annotations

import os
import subprocess
import sys

from movq_deploy.engine_cache import TIMING_CACHE_NAME
from movq_deploy.export.directory import _replace_dir, carry_over_engines, make_work_dir, remove_stale_work_dirs


def test_replacing_an_engine_dir_swaps_it_whole(tmp_path):
    out, new = tmp_path / "engines", tmp_path / "new"
    out.mkdir()
    (out / "prior.fp16.plan").write_bytes(b"stale")
    new.mkdir()
    (new / "manifest.json").write_text("{}")
    _replace_dir(new, out)
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["engines"]


def test_reexport_keeps_only_tensorrt_engines_of_unchanged_graphs(tmp_path, make_engine_dir):
    old, work = tmp_path / "engines", tmp_path / "work"
    old.mkdir()
    work.mkdir()
    for name in ("prior.fp16.plan", "decoder.fp16.plan", TIMING_CACHE_NAME):
        (old / name).write_bytes(name.encode())
    engines = {"fp16": {"prior": {"file": "prior.fp16.plan", "onnx_sha256": "same"},
                        "decoder": {"file": "decoder.fp16.plan", "onnx_sha256": "old"}}}
    make_engine_dir(old, engines=engines).write()
    graphs = {"fp16": {"prior": {"sha256": "same"}, "decoder": {"sha256": "new"}}}
    kept = carry_over_engines(old, work, graphs)
    assert kept == {"fp16": {"prior": engines["fp16"]["prior"]}}
    assert sorted(p.name for p in work.iterdir()) == ["prior.fp16.plan", TIMING_CACHE_NAME]
    assert carry_over_engines(tmp_path / "nothing", work, graphs) == {}


def _finished_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def test_work_folders_of_killed_exports_are_removed_and_nothing_else(tmp_path):
    out = tmp_path / "engines"
    killed = tmp_path / f".engines.{_finished_pid()}-abc123.tmp"
    running = tmp_path / f".engines.{os.getpid()}-def456.tmp"  # a concurrent export in a live process
    other_dir = tmp_path / f".other.{_finished_pid()}-abc123.tmp"
    not_ours = tmp_path / ".engines.abc123.tmp"
    for folder in (killed, running, other_dir, not_ours):
        folder.mkdir()
        (folder / "prior.onnx").write_bytes(b"half written")
    assert remove_stale_work_dirs(out) == [killed]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (running, other_dir, not_ours))

    work = make_work_dir(out)  # the next export: named after its process, so a later one can tell
    assert work.parent == tmp_path and work.name.startswith(f".engines.{os.getpid()}-") and work.suffix == ".tmp"
    assert remove_stale_work_dirs(out) == [] and work.is_dir()
