"""scripts/paper_size.py's measuring: a stage's wall time and peak memory (its process, and its process tree with
the children it starts), the kill at the memory limit, a stage that skips itself, and the table."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import paper_size  # noqa: E402

MB = 1 << 20
HOLD = "import time; x = bytearray({size}); x[::4096] = b'1' * len(x[::4096]); time.sleep({seconds})"


def test_a_stage_is_timed_with_the_peak_of_its_process_and_of_its_children(tmp_path):
    child = HOLD.format(size=150 * MB, seconds=2)
    parent = (f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {child!r}]); "
              f"{HOLD.format(size=100 * MB, seconds=2)}; p.wait()")
    result = paper_size.run_stage(paper_size.Result("probe", ""), [sys.executable, "-c", parent], tmp_path, 8 << 30)
    assert result.status == "ok" and 2 <= result.seconds < 60
    assert result.max_rss >= 150 * MB  # wait4: the largest of the process and the children it waited for
    assert result.tree_pss >= 230 * MB  # both alive at once, counted together
    assert (tmp_path / "probe.log").is_file() and (tmp_path / "probe.memory.csv").read_text().count("\n") >= 3


def test_a_stage_past_the_memory_limit_is_killed_and_said_so(tmp_path):
    argv = [sys.executable, "-c", HOLD.format(size=300 * MB, seconds=30)]
    result = paper_size.run_stage(paper_size.Result("hog", ""), argv, tmp_path, 200 * MB)
    assert result.status == "killed: its processes passed 200 MB" and result.seconds < 20


def test_a_stage_that_says_its_tool_is_missing_is_skipped_with_the_reason(tmp_path):
    argv = [sys.executable, "-c", "import sys; sys.exit('build_trt.py: TensorRT is not installed (no module)')"]
    result = paper_size.run_stage(paper_size.Result("build-trt", ""), argv, tmp_path, 8 << 30, None, None,
                                  "TensorRT is not installed")
    assert result.status == "skipped: build_trt.py: TensorRT is not installed (no module)"
    failed = paper_size.run_stage(paper_size.Result("x", ""), [sys.executable, "-c", "raise SystemExit(3)"],
                                  tmp_path, 8 << 30)
    assert failed.status == "failed (exit 3)"


def test_the_table_marks_each_target():
    rows = [paper_size.Result("export", "", "ok", 60, 10 << 30, 12 << 30),
            paper_size.Result("prior-b8", "", "ok", 60, 13 << 30, 12 << 30),
            paper_size.Result("edit", "", "ok", 5, 1 << 30, 1 << 30)]
    table = paper_size.markdown(rows, "a test machine")
    assert "| export | ok | 60 | 10 GB | 12 GB | 16 GB | met |" in table
    assert "| prior-b8 | ok | 60 | 13 GB | 12 GB | 12 GB | **missed** |" in table
    assert "| edit | ok | 5 | 1 GB | 1 GB |  |  |" in table
