"""The inference backends, and the choice between them.

    base.py         the Runner protocol, TensorSpec, and the input checks every runner's `run` makes first
    onnxruntime.py  ONNX Runtime runners (CPU provider; CUDA provider where onnxruntime-gpu works)
    tensorrt.py     the TensorRT runner of a .plan engine
    cuda.py         cuda-python for it: buffers, streams, CUDA-graph capture, error checks

`open_runners(engine_dir, backend, precision)` opens the three runners (encoder, decoder, prior step) on the best
backend this machine offers (TensorRT engines, else ONNX Runtime CUDA, else ONNX Runtime CPU) and says why it chose
it: with backend="auto" a backend that fails to open (a plan missing, altered or not deserializable; a CUDA
provider that does not start) hands over to the next one, with the reason; a backend asked for by name raises
instead. The sampling loop (movq_deploy.sampling) is written once, above the runners. torch is never imported here.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from movq_deploy.backends.base import Runner, TensorSpec, optional_import
from movq_deploy.manifest import EngineDir

__all__ = ["BACKENDS", "PRECISIONS", "Backend", "Runner", "TensorSpec", "open_runners"]

logger = logging.getLogger("movq_deploy")

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cuda", "onnxruntime-cpu")
PRECISIONS = ("auto", "fp32", "fp16", "int8")
_ORT_INSTALL = "pip install .[cpu] (or .[gpu])"


@dataclass
class Backend:
    name: str  # "tensorrt" | "onnxruntime-cuda" | "onnxruntime-cpu"
    reason: str  # why this backend was chosen (and why the better ones were not)
    precision: str  # "fp32" | "fp16" | "int8" (int8: ONNX Runtime CPU graphs, fixed activation scales)
    runners: Dict[str, Runner]  # {"encoder", "decoder", "prior"}


def open_runners(engine_dir: EngineDir, backend: str = "auto", precision: str = "auto",
                 threads: Optional[int] = None, shared_pool: bool = False) -> Backend:
    """Opens the encoder, decoder and prior-step runners of `engine_dir` on `backend`.

    backend: "auto" (TensorRT engines when present and usable, else ONNX Runtime with the CUDA provider when it
    starts, else ONNX Runtime on the CPU), "tensorrt", "onnxruntime" (CUDA provider if it starts, else CPU),
    "onnxruntime-cuda" or "onnxruntime-cpu". precision: "auto" (fp16 engines on TensorRT, fp32 graphs on ONNX
    Runtime), "fp32", "fp16" or "int8" (the int8 prior, encoder and decoder).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    skipped: List[str] = []  # why each better backend was passed over, for .reason
    if backend in ("auto", "tensorrt"):
        chosen = _open_tensorrt(engine_dir, precision, required=backend == "tensorrt", skipped=skipped)
        if chosen is not None:
            return _chosen(chosen)
    ort_backend = optional_import("movq_deploy.backends.onnxruntime", "onnxruntime", _ORT_INSTALL)
    ort_precision = "fp32" if precision == "auto" else precision
    files = engine_dir.graph_entries(ort_precision)
    if backend in ("auto", "onnxruntime", "onnxruntime-cuda"):
        why_not = "onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu instead of onnxruntime)"
        if ort_backend.cuda_available():
            try:
                runners = ort_backend.open_onnxruntime_runners(engine_dir, files, "cuda", threads, shared_pool)
                reason = "; ".join(skipped + ["ONNX Runtime's CUDAExecutionProvider is in use"])
                return _chosen(Backend("onnxruntime-cuda", reason, ort_precision, runners))
            except ort_backend.CudaProviderUnavailable as error:
                why_not = str(error)
        if backend == "onnxruntime-cuda":
            raise RuntimeError(f"backend 'onnxruntime-cuda' is not usable here: {why_not}")
        skipped.append(f"ONNX Runtime CUDA not used ({why_not})")
    runners = ort_backend.open_onnxruntime_runners(engine_dir, files, "cpu", threads, shared_pool)
    reason = "; ".join(skipped) if skipped else "requested"
    return _chosen(Backend("onnxruntime-cpu", reason + " -> ONNX Runtime on the CPU", ort_precision, runners))


def _open_tensorrt(engine_dir: EngineDir, precision: str, required: bool, skipped: List[str]):
    """The TensorRT Backend, or None (the reason appended to `skipped`); raises instead when `required`."""
    usable, why = _tensorrt_usable(engine_dir, precision)
    if usable:
        module = optional_import("movq_deploy.backends.tensorrt", "TensorRT", "pip install .[gpu]")
        try:
            trt_precision = module.resolve_precision(engine_dir, precision)  # "auto": the fastest usable (fp16)
            runners = module.open_tensorrt_runners(engine_dir, trt_precision)
            return Backend("tensorrt", f"TensorRT engines usable: {why}", trt_precision, runners)
        except (FileNotFoundError, ValueError, RuntimeError) as error:  # a plan missing, altered, undeserializable
            if required:
                raise
            why = f"its engines did not open: {error}"
    if required:
        raise RuntimeError(f"backend 'tensorrt' is not usable here: {why}")
    skipped.append(f"TensorRT not used ({why})")
    return None


def _tensorrt_usable(engine_dir: EngineDir, precision: str) -> Tuple[bool, str]:
    """(usable, reason), asking movq_deploy.backends.tensorrt, which imports tensorrt itself (lazily)."""
    try:
        module = optional_import("movq_deploy.backends.tensorrt", "TensorRT", "pip install .[gpu]")
    except ImportError as error:
        return False, f"TensorRT backend unavailable: {error}"
    return module.tensorrt_usable(engine_dir, precision)


def _chosen(backend: Backend) -> Backend:
    logger.info("movq-deploy backend: %s (%s) - %s", backend.name, backend.precision, backend.reason)
    return backend
