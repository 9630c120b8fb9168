"""benchmarks/studies/guidance_step.py on the tiny conditional export: both graphs timed, the report written."""
from __future__ import annotations

import json

import pytest

from benchmarks.studies import guidance_step


def test_guided_and_plain_steps_are_timed_and_reported(tiny_engines, tmp_path):
    report = guidance_step.main(["--engine-dir", str(tiny_engines.engine_dir), "--batch-sizes", "1,2",
                                 "--precisions", "fp32,int8", "--rounds", "2", "--budget-s", "0.01",
                                 "--threads", "1", "--out", str(tmp_path)])
    rows = report["rows"]
    assert [(row["precision"], row["batch"]) for row in rows] == [("fp32", 1), ("fp32", 2), ("int8", 1), ("int8", 2)]
    for row in rows:
        assert row["plain"]["p50_ms"] > 0 and row["guided"]["p50_ms"] > 0 and len(row["ratio_per_round"]) == 2
    assert json.loads((tmp_path / "guidance_step.json").read_text())["guidance_scale"] == 3.0
    assert "| fp32 | 2 |" in (tmp_path / "guidance_step.md").read_text()


def test_a_directory_without_the_guided_graph_is_refused(tiny_unconditional_engines, tmp_path):
    with pytest.raises(SystemExit, match="no prior_guided graph"):
        guidance_step.main(["--engine-dir", str(tiny_unconditional_engines.engine_dir), "--out", str(tmp_path)])
