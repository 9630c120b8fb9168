"""benchmarks/latency_targets.py: each target is a ratio of rows of one run, and says "not measured" when a row is
missing instead of guessing."""
from __future__ import annotations

from benchmarks.latency_targets import evaluate_targets, int8_image_targets


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
