"""OpenVINO called directly, the peer a CPU user would try after PyTorch: the engine directory's fp32 ONNX graphs, each
compiled whole by OpenVINO's CPU plugin in bf16 (its own default where the CPU has native bf16), one infer request,
no package runtime around it: no fp32 ends, no input checks, no request pool.

Behind the same `run(feeds) -> {name: array}` as a backend's runners, so the benchmark times it with the same code
and drives it with the same sampling loop (benchmarks/torch_peers.loop_sample).
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

OPENVINO_DIRECT = "openvino-direct"  # the peer's backend name in benchmark rows


class DirectRunner:
    """One ONNX graph compiled whole by OpenVINO at an inference precision ("bf16" or "f32")."""

    def __init__(self, path: Path, hint: str, threads: int):
        from movq_deploy.backends.openvino import shared_core

        self.compiled = shared_core().compile_model(str(path), "CPU", {
            "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()
        self.names = [port.get_any_name() for port in self.compiled.outputs]

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        results = self.request.infer(feeds)
        return {name: results[port] for name, port in zip(self.names, self.compiled.outputs)}

    def close(self) -> None:
        """Drops the compiled model and its request (their memory goes with them)."""
        self.compiled = self.request = None


def direct_runners(engine_dir, threads: int, hint: str = "bf16") -> Dict[str, DirectRunner]:
    """{"encoder", "decoder", "prior"}: the fp32 graphs of `engine_dir` (a movq_deploy.manifest.EngineDir)."""
    return {name: DirectRunner(engine_dir.verify(engine_dir.graph("fp32", name)), hint, threads)
            for name in ("encoder", "decoder", "prior")}
