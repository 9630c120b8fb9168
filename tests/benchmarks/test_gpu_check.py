"""benchmarks/gpu_check.py, rehearsed on the CPU: ONNX Runtime CPU checked against itself passes every check that
applies; the CUDA checks are judged on the facts a CUDA session would show."""
from __future__ import annotations

from benchmarks import gpu_check


def test_the_cpu_backend_passes_against_itself(tiny_engines):
    report = gpu_check.compare(tiny_engines.engine_dir, "onnxruntime-cpu", ["fp32"], n=3, steps=2)
    entry = report["fp32"]
    assert entry["grid_agreement"] == entry["grid_agreement_same_graphs"] == 1.0
    assert entry["decode_psnr_db"] == 100.0 and all(entry["checks"].values())
    assert {r["providers"][0] for r in entry["runners"].values()} == {"CPUExecutionProvider"}


def test_cuda_checks_fail_on_a_session_that_runs_on_the_cpu():
    facts = {"backend": "onnxruntime-cuda", "backend_reason": "ONNX Runtime's CUDAExecutionProvider is in use",
             "runners": {"prior": {"providers": ["CPUExecutionProvider"], "io_binding": False}}}
    figures = {"grid_agreement": 1.0, "grid_agreement_same_graphs": 1.0, "decode_psnr_db": 50.0}
    checks = gpu_check._checks("onnxruntime-cuda", "fp16", figures, facts)
    assert not checks["CUDA provider first in every session"] and not checks["I/O binding in use"]
    assert checks["decode PSNR >= 40 dB"] and checks["backend_reason says CUDA is in use"]
