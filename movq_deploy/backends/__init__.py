"""The one small interface every inference backend implements, and the choice between them.

A *runner* wraps one graph (encoder, decoder or prior step) or one TensorRT engine built from it:

    runner.inputs / runner.outputs: list[TensorSpec]     (names, numpy dtypes, shapes with "batch")
    runner.max_batch: int | None                         (None: any batch; TensorRT: the profile's max)
    runner.run({name: np.ndarray}) -> {name: np.ndarray} (thread-safe)

`open_runners(engine_dir, backend, precision)` opens the three runners on the best backend this machine
offers (TensorRT engines, else ONNX Runtime CUDA, else ONNX Runtime CPU) and says why it chose it. The sampling
loop (movq_deploy.sampling) is written once, above this interface. torch is never imported here.
"""
from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Protocol, Tuple

import numpy as np

from movq_deploy.contract import TensorSpec
from movq_deploy.manifest import EngineDir

logger = logging.getLogger("movq_deploy")

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cuda", "onnxruntime-cpu")
PRECISIONS = ("auto", "fp32", "fp16", "int8")


class Runner(Protocol):
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    max_batch: Optional[int]

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]: ...


@dataclass
class Backend:
    name: str  # "tensorrt" | "onnxruntime-cuda" | "onnxruntime-cpu"
    reason: str  # why this backend was chosen (and why the better ones were not)
    precision: str  # "fp32" | "fp16" | "int8" (int8: the prior only; encoder and decoder stay fp32)
    runners: Dict[str, Runner]  # {"encoder", "decoder", "prior"}


def open_runners(engine_dir: EngineDir, backend: str = "auto", precision: str = "auto") -> Backend:
    """Opens the encoder, decoder and prior-step runners of `engine_dir` on `backend`.

    backend: "auto" (TensorRT engines when present and usable, else ONNX Runtime with the CUDA provider when
    installed, else ONNX Runtime on the CPU), "tensorrt", "onnxruntime" (CUDA provider if installed, else CPU),
    "onnxruntime-cuda" or "onnxruntime-cpu". precision: "auto" (fp16 engines on TensorRT, fp32 graphs on ONNX
    Runtime), "fp32", "fp16" or "int8" (int8 prior with fp32 encoder and decoder).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")

    skipped = []  # why each better backend was passed over, for .reason
    if backend in ("auto", "tensorrt"):
        usable, why = _tensorrt_usable(engine_dir, precision)
        if usable:
            module = importlib.import_module("movq_deploy.backends.tensorrt")
            trt_precision = module.resolve_precision(engine_dir, precision)  # "auto": the fastest usable (fp16)
            runners = module.open_tensorrt_runners(engine_dir, trt_precision)
            return _chosen(Backend("tensorrt", f"TensorRT engines usable: {why}", trt_precision, runners))
        if backend == "tensorrt":
            raise RuntimeError(f"backend 'tensorrt' is not usable here: {why}")
        skipped.append(f"TensorRT not used ({why})")

    from movq_deploy.backends import onnxruntime as ort_backend  # imported here: a TensorRT-only install works

    ort_precision = "fp32" if precision == "auto" else precision
    files = engine_dir.graph_entries(ort_precision)
    if backend in ("auto", "onnxruntime", "onnxruntime-cuda"):
        if ort_backend.cuda_available():
            runners = ort_backend.open_onnxruntime_runners(engine_dir, files, device="cuda")
            reason = "; ".join(skipped + ["ONNX Runtime has the CUDAExecutionProvider"])
            return _chosen(Backend("onnxruntime-cuda", reason, ort_precision, runners))
        if backend == "onnxruntime-cuda":
            raise RuntimeError("backend 'onnxruntime-cuda' is not usable here: onnxruntime has no "
                               "CUDAExecutionProvider (install onnxruntime-gpu instead of onnxruntime)")
        if backend != "onnxruntime-cpu":
            skipped.append("ONNX Runtime has no CUDAExecutionProvider")
    runners = ort_backend.open_onnxruntime_runners(engine_dir, files, device="cpu")
    reason = "; ".join(skipped) if skipped else "requested"
    return _chosen(Backend("onnxruntime-cpu", reason + " -> ONNX Runtime on the CPU", ort_precision, runners))


def _tensorrt_usable(engine_dir: EngineDir, precision: str) -> Tuple[bool, str]:
    """(usable, reason), asking movq_deploy.backends.tensorrt, which imports tensorrt itself (lazily)."""
    try:
        module = importlib.import_module("movq_deploy.backends.tensorrt")
    except ImportError as error:
        return False, f"TensorRT backend unavailable: {error}"
    return module.tensorrt_usable(engine_dir, precision)


def _chosen(backend: Backend) -> Backend:
    logger.info("movq-deploy backend: %s (%s) - %s", backend.name, backend.precision, backend.reason)
    return backend
