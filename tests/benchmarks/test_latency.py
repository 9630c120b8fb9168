"""benchmarks/latency.py on the tiny exported model with a tiny budget: structure and sanity of what it writes."""
from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from benchmarks.flops import prior_step_flops
from movq_deploy.export.flops import counted_flops
from benchmarks.latency import STAGES, main
from benchmarks.timing import CallTimer, summarize, time_calls

OPENVINO = importlib.util.find_spec("openvino") is not None


@pytest.fixture(scope="module")
def report(tiny_engines, tmp_path_factory):
    out = tmp_path_factory.mktemp("latency")
    # No --ckpt: the checkpoint the manifest names is found beside the engine directory.
    report = main(["--engine-dir", str(tiny_engines.engine_dir), "--batch-sizes", "1,2", "--steps", "2",
                   "--budget-s", "0.01", "--no-compile", "--out", str(out)])
    assert report["models"][0]["ckpt"] == str(tiny_engines.ckpt)
    return report, out


def test_writes_json_markdown_and_png(report):
    report, out = report
    on_disk = json.loads((out / "latency.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(report["results"]))
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "latency.md").read_text()
    assert "| model | backend | precision | batch |" in table and "| target | measured | met |" in table
    assert "auto on the checkpoint model: onnxruntime-cpu fp32: encoder (" in table  # tiny graphs: below the rule
    machine = on_disk["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and "onnxruntime" in machine["libraries"]
    assert on_disk["gemm"]["cpu_fp32_gflops"] > 0 and on_disk["gemm"]["cpu_int8_gops"] > 0


def test_every_backend_stage_and_batch_is_timed_with_finite_positive_numbers(report):
    report, _ = report
    rows = report["results"]
    timed = {(r["backend"], r["precision"], r["stage"], r["batch"]) for r in rows if "p50_ms" in r}
    for batch in (1, 2):
        for stage in STAGES:
            assert ("onnxruntime-cpu", "fp32", stage, batch) in timed
            assert ("pytorch-eager", "fp32", stage, batch) in timed
        for stage in STAGES:  # the tiny engines hold the int8 prior, encoder and decoder
            assert ("onnxruntime-cpu", "int8", stage, batch) in timed
            assert ("pytorch-eager", "bf16", stage, batch) in timed  # bf16 autocast, the CPU user's fallback
            assert ("auto", "fp32", stage, batch) in timed  # the Generator's default: ONNX Runtime for tiny graphs
            if OPENVINO:
                assert ("openvino", "fp32", stage, batch) in timed and ("openvino-direct", "bf16", stage, batch) in timed
    for row in rows:
        if "p50_ms" not in row:
            continue
        for key in ("p50_ms", "p90_ms", "p99_ms", "images_per_s", "gflops_per_s", "gemm_fraction",
                    "speedup_vs_eager"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["repeats"] >= 2
    eager = [r for r in rows if (r["backend"], r["precision"]) == ("pytorch-eager", "fp32") and "p50_ms" in r]
    assert all(r["speedup_vs_eager"] == pytest.approx(1.0) for r in eager)


def test_loop_overhead_and_targets(report):
    report, _ = report
    samples = [r for r in report["results"] if r["stage"] == "sample" and r["backend"] == "onnxruntime-cpu"]
    assert samples
    for row in samples:
        assert 0.0 < row["engine_share"] <= 1.0
        assert row["loop_overhead"] == pytest.approx(1.0 - row["engine_share"])
        assert row["engine_calls_per_sample"] == 2 + 1  # --steps 2 prior steps + one decode
    model = report["models"][0]
    assert len(model["targets"]) == 10
    psnr = next(t for t in model["targets"] if "PSNR" in t["target"])  # from the manifest's export figures
    assert 0 < psnr["value"] <= 100 and isinstance(psnr["met"], bool)
    agreements = model["top_token_agreement"]
    assert agreements["onnxruntime-cpu fp32"] == 1.0 and 0.0 <= agreements["onnxruntime-cpu int8"] <= 1.0
    measured = {t["target"]: t for t in model["targets"] if t["value"] is not None}
    assert any("1.3x" in name for name in measured)  # batch 1 was timed: the fp32 step target has a number
    assert all(isinstance(t["met"], bool) for t in measured.values())
    # Across the run: the paper targets are not measured without --config paper; "never slower" is (batch 1 only).
    never = next(t for t in report["targets"] if "never > 5% slower" in t["target"])
    assert never["value"] > 0 and isinstance(never["met"], bool)


def test_prior_flops_match_the_counted_module():
    import torch

    from movq_deploy.models.movq import MoVQConfig
    from movq_deploy.models.prior import MaskGITPrior, PriorConfig

    config = PriorConfig.preset("tiny", MoVQConfig.preset("tiny"), num_classes=2)
    prior = MaskGITPrior(config).eval()
    tokens = torch.full((3, config.num_slots), config.mask_id)
    counted = counted_flops(lambda: prior(tokens, torch.zeros(3, dtype=torch.long)))
    assert prior_step_flops(config, batch=3)["total"] == counted


def test_timing_helpers():
    calls = CallTimer(lambda: sum(range(1000)))
    times = time_calls(calls, budget_s=0.01, warmup=2, min_repeats=3)
    assert calls.calls == len(times) + 2 and len(times) >= 3 and calls.seconds > 0
    stats = summarize(np.array([0.001, 0.002, 0.003, 0.004]), batch=8)
    assert stats["p50_ms"] == pytest.approx(2.5) and stats["images_per_s"] == pytest.approx(8 / 0.0025)
    with pytest.raises(ValueError, match="budget_s"):
        time_calls(lambda: None, budget_s=0)


def test_bad_arguments_fail_with_one_line(tmp_path):
    with pytest.raises(SystemExit):
        main(["--batch-sizes", "0,1"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--engine-dir", str(tmp_path / "missing"), "--out", str(tmp_path)])
