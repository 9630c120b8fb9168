"""benchmarks/gpu_bar.py rehearsed on the CPU at the tiny size: every planned row is timed or says why not.

The GPU itself is not here: these runs check the script's plumbing (models, modes, the ONNX Runtime rows, the
deadline, the report), so that the GPU slice is not spent on a crash."""
from __future__ import annotations

import json
import math

import pytest

from benchmarks.gpu_bar import STAGES, main, parse_args, plans


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("gpu_bar")
    report = main(["--device", "cpu", "--config", "tiny", "--batch-sizes", "1", "--steps", "2", "--modes",
                   "eager,eager-bf16", "--budget-s", "0.01", "--deadline-s", "600", "--out", str(out)])
    return report, out


@pytest.fixture(scope="module")
def one_torch_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_rehearsal_times_every_torch_and_onnxruntime_row(rehearsal):
    report, out = rehearsal
    rows = report["results"]
    timed = {(r["backend"], r["mode"], r["stage"]) for r in rows if "p50_ms" in r}
    for mode in ("eager", "eager-bf16"):
        assert {("pytorch", mode, stage) for stage in STAGES} <= timed
    for precision in ("fp32", "fp16"):
        assert {("onnxruntime-cpu", precision, stage) for stage in STAGES} <= timed
    graph_rows = [r for r in rows if r["backend"] == "onnxruntime-cuda-graph"]
    assert graph_rows and all("CUDA provider" in r["skipped"] for r in graph_rows)  # not on a CPU
    for row in rows:
        if "p50_ms" in row:
            assert math.isfinite(row["p50_ms"]) and 0 < row["p50_ms"] <= row["p99_ms"] and row["warmup_s"] >= 0
    assert json.loads((out / "gpu_bar.json").read_text())["results"] == json.loads(json.dumps(rows))
    table = (out / "gpu_bar.md").read_text()
    assert "| pytorch | eager-bf16 | 1 |" in table and "| onnxruntime-cpu | fp16 | 1 |" in table


def test_the_deadline_skips_what_would_start_too_late(tmp_path):
    report = main(["--device", "cpu", "--config", "tiny", "--batch-sizes", "1", "--modes", "eager", "--no-ort",
                   "--budget-s", "0.01", "--deadline-s", "1e-9", "--out", str(tmp_path)])
    assert report["results"] and all("deadline" in row["skipped"] for row in report["results"])


def test_plan_order_and_arguments():
    order = [(p.backend, p.mode) for p in plans(["compile", "eager"], [1, 64], with_ort=True)]
    assert order.index(("pytorch", "eager")) < order.index(("pytorch", "compile")) < order.index(("onnxruntime", "fp32"))
    assert len(order) == 3 * 2 * 2 + 2 * (3 * 2 + 2)  # two torch modes, two ONNX precisions (+ CUDA-graph steps)
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--modes", "eager,fp8"])
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--batch-sizes", "0"])
