"""benchmarks/latency_targets.py: each target is a ratio of rows of one run, and says "not measured" when a row is
missing instead of guessing."""
from __future__ import annotations

from benchmarks.latency_targets import cpu_path_targets, evaluate_targets, int8_image_targets


def _row(backend, precision, stage, batch, p50_ms, **extra):
    return {"backend": backend, "precision": precision, "stage": stage, "batch": batch, "p50_ms": p50_ms, **extra}


def test_targets_are_judged_from_the_rows_and_unmeasured_ones_are_none():
    rows = [_row("onnxruntime-cpu", "fp32", "prior_step", 1, 1.0, speedup_vs_eager=1.6),
            _row("onnxruntime-cpu", "fp32", "prior_step", 16, 9.0, gemm_fraction=0.8),
            _row("onnxruntime-cpu", "int8", "prior_step", 1, 0.5, speedup_vs_eager=3.0),
            _row("onnxruntime-cpu", "int8", "prior_step", 16, 4.0, speedup_vs_eager=2.0)]
    targets = {t["target"]: t for t in evaluate_targets(rows, int8_agreement=0.96, batch_sizes=[1, 16])}
    assert targets["prior step fp32 ORT >= 1.3x PyTorch eager (batch 1)"]["met"] is True
    fraction = targets["prior step fp32 ORT >= 85% of GEMM rate (batch >= 8)"]
    assert (fraction["value"], fraction["met"]) == (0.8, False)
    assert targets["int8 prior step >= 2.5x PyTorch eager fp32"]["value"] == 2.0  # the worst batch decides
    assert targets["int8 prior top-token agreement >= 95%"]["met"] is True
    assert targets["loop overhead <= 3% of sample(n=64)"]["met"] is None  # no sample(n=64) row in this run
    assert targets["int8 decode >= 1.8x fp32 ORT (batch 16)"]["met"] is None


def test_int8_image_targets_take_speed_from_the_run_and_agreement_from_the_manifest():
    fp32, int8 = _row("onnxruntime-cpu", "fp32", "decode", 16, 10.0), _row("onnxruntime-cpu", "int8", "decode", 16, 5.0)
    validation = {"decoder": {"psnr_db": 34.0}, "encoder": {"index_agreement": 0.98}}
    speed, psnr, agreement = int8_image_targets(fp32, int8, validation)
    assert (speed["value"], speed["met"]) == (2.0, True)
    assert (psnr["value"], psnr["met"]) == (34.0, False)
    assert agreement["met"] is True


def _paper(backend, precision, stage, batch, p50_ms, **extra):
    return {"model": "paper", "compute": precision, **_row(backend, precision, stage, batch, p50_ms, **extra)}


def test_cpu_path_targets_compare_the_fastest_package_path_with_the_fastest_peer():
    rows = [_paper("openvino", "int8", "prior_step", 16, 100.0, gemm_fraction=0.7),
            _paper("openvino", "bf16", "prior_step", 16, 180.0, gemm_fraction=0.85),
            _paper("openvino", "bf16", "prior_step", 1, 20.0, gemm_fraction=0.75),
            _paper("openvino-direct", "bf16", "prior_step", 16, 170.0),
            _paper("pytorch-eager", "bf16", "prior_step", 16, 400.0),
            _paper("auto", "bf16", "sample", 16, 2000.0, loop_overhead=0.01),
            _paper("pytorch-eager", "bf16", "sample", 16, 5000.0),
            _paper("onnxruntime-cpu", "fp32", "sample", 16, 9000.0),
            _paper("auto", "bf16", "decode", 1, 10.5), _paper("onnxruntime-cpu", "fp32", "decode", 1, 10.0)]
    targets = {t["target"]: t for t in cpu_path_targets(rows, [1, 16])}
    ahead = targets["paper prior step, batch 16: fastest package path >= 1.3x the fastest peer"]
    assert (ahead["value"], ahead["met"]) == (1.7, True) and "openvino int8 100 ms vs openvino-direct" in ahead["detail"]
    assert targets["paper prior step, batch 1: fastest package path >= 1.2x the fastest peer"]["met"] is None
    bf16 = targets["paper bf16 prior step >= 80% of the bf16 GEMM rate"]
    assert (bf16["value"], bf16["met"]) == (0.75, False)  # the worst batch decides
    assert targets["paper int8 prior step >= 65% of the int8 GEMM rate (batch >= 8)"]["met"] is True
    assert targets["paper Generator.sample(n=16) >= 1.3x the PyTorch reference sampler in bf16"]["value"] == 2.5
    assert targets["paper: the package's loop adds <= 3% to sample(n=16) (auto)"]["met"] is True
    never = targets["paper: auto never > 5% slower than ONNX Runtime fp32 (every stage, batch 1 and 16)"]
    assert never["value"] == 1.05 and never["met"] is True and "decode batch 1" in never["detail"]
    assert cpu_path_targets(rows[-2:], [1])[0]["target"].startswith("paper prior step")  # paper rows: paper targets
    digits = [{**row, "model": "checkpoint"} for row in rows[-2:]]
    assert [t["target"] for t in cpu_path_targets(digits, [1])] == [
        "checkpoint: auto never > 5% slower than ONNX Runtime fp32 (every stage, batch 1 and 16)"]
