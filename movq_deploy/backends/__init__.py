"""The inference backends, and the choice between them.

    base.py         the Runner protocol, TensorSpec, and the input checks every runner's `run` makes first
    deferred.py     a runner opened by its first call (the CPU's encoder and guided prior)
    onnxruntime.py  ONNX Runtime runners (CPU provider; CUDA provider where onnxruntime-gpu works)
    openvino.py     OpenVINO runners (CPU: fp32, bf16 with fp32 ends, int8)
    cpu_choice.py   which CPU path runs each graph, and why; cpu_features.py: what the CPU computes natively
    tensorrt.py     the TensorRT runner of a .plan engine
    cuda.py         cuda-python for it: buffers, streams, CUDA-graph capture, error checks

`open_runners(engine_dir, backend, precision)` opens the runners (encoder, decoder, prior step, and the guided
prior step where the directory has it) on the best backend this machine offers (TensorRT engines, else ONNX Runtime
CUDA, else the CPU, where each graph goes to ONNX Runtime or OpenVINO by cpu_choice's rule) and says why it chose
it: with backend="auto" a backend that fails to open (a plan missing, altered or not deserializable; a CUDA
provider that does not start) hands over to the next one, with the reason; a backend asked for by name raises
instead. The sampling loop (movq_deploy.sampling) is written once, above the runners. torch is never imported here.
"""
from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from movq_deploy.backends import cpu_choice
from movq_deploy.backends.base import GPU_INSTALL, Runner, TensorSpec, optional_import
from movq_deploy.backends.cpu_choice import OPENVINO_INSTALL, ORT_CPU, Placement
from movq_deploy.backends.deferred import ON_FIRST_USE, DeferredRunner
from movq_deploy.manifest import EngineDir

__all__ = ["BACKENDS", "PRECISIONS", "Backend", "Placement", "Runner", "TensorSpec", "open_runners"]

logger = logging.getLogger("movq_deploy")

BACKENDS = ("auto", "tensorrt", "onnxruntime", "onnxruntime-cuda", "onnxruntime-cpu", "openvino")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
_ORT_INSTALL = "pip install 'movq-deploy[cpu]' (or 'movq-deploy[gpu]')"


@dataclass
class Backend:
    name: str  # "tensorrt" | "onnxruntime-cuda" | "onnxruntime-cpu" | "openvino", or "+"-joined (cpu_choice)
    reason: str  # why this backend was chosen (and why the better ones were not)
    precision: str  # "fp32" | "fp16" | "bf16" | "int8", or "+"-joined where graphs differ ("bf16+fp32")
    runners: Dict[str, Runner]  # {"encoder", "decoder", "prior"} (+ "prior_guided")
    placement: Dict[str, Placement] = field(default_factory=dict)  # graph -> backend and precision (CPU paths)


def open_runners(engine_dir: EngineDir, backend: str = "auto", precision: str = "auto",
                 threads: Optional[int] = None, shared_pool: bool = False,
                 cache_dir: "str | os.PathLike[str] | None" = None) -> Backend:
    """Opens the encoder, decoder and prior-step runners of `engine_dir` on `backend`.

    backend: "auto" (TensorRT engines when present and usable, else ONNX Runtime with the CUDA provider when it
    starts, else the CPU: each graph on ONNX Runtime or OpenVINO by movq_deploy.backends.cpu_choice's rule),
    "tensorrt", "onnxruntime" (CUDA provider if it starts, else CPU), "onnxruntime-cuda", "onnxruntime-cpu" or
    "openvino". precision: "auto" (fp16 engines on TensorRT, fp32 graphs on ONNX Runtime CUDA, the CPU rule's
    choice on the CPU), "fp32", "fp16" (GPU), "bf16" (OpenVINO, CPUs with native bf16) or "int8" (the int8 prior,
    encoder and decoder: ONNX Runtime's graphs, or OpenVINO's where the directory has them). cache_dir: OpenVINO's
    model cache (default: `<engine dir>.openvino-cache` beside the engine directory).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    skipped: List[str] = []  # why each better backend was passed over, for .reason
    if backend in ("auto", "tensorrt") and precision != "bf16":
        chosen = _open_tensorrt(engine_dir, precision, required=backend == "tensorrt", skipped=skipped)
        if chosen is not None:
            return _chosen(chosen)
    if backend == "openvino":
        placement = cpu_choice.openvino_placement(engine_dir, precision)
        return _chosen(_open_cpu(engine_dir, placement, "requested", threads, shared_pool, cache_dir))
    if precision == "bf16" and backend != "auto":
        raise ValueError(f"backend {backend!r} has no bf16 (ONNX Runtime's CPU provider has no bf16 kernels on "
                         f"x86): use backend 'openvino' or 'auto'")
    ort_backend = optional_import("movq_deploy.backends.onnxruntime", "onnxruntime", _ORT_INSTALL)
    if backend in ("auto", "onnxruntime", "onnxruntime-cuda") and precision != "bf16":
        ort_precision = "fp32" if precision == "auto" else precision
        files = engine_dir.graph_entries(ort_precision)
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
    if backend == "auto":
        if precision == "bf16":
            placement, why = cpu_choice.openvino_placement(engine_dir, "bf16"), "bf16 asked for: OpenVINO"
        else:
            placement, why = cpu_choice.auto_placement(engine_dir, precision)
    else:
        placement = {graph: Placement(ORT_CPU, "fp32" if precision == "auto" else precision)
                     for graph in engine_dir.graph_names}
        why = "requested"
    reason = "; ".join(skipped + [f"the CPU: {why}"])
    return _chosen(_open_cpu(engine_dir, placement, reason, threads, shared_pool, cache_dir))


def _open_cpu(engine_dir: EngineDir, placement: Dict[str, Placement], reason: str, threads: Optional[int],
              shared_pool: bool, cache_dir) -> Backend:
    """The CPU runners of a placement: each graph on ONNX Runtime or OpenVINO at its precision; the graphs only some
    calls use (deferred.ON_FIRST_USE) verified now and opened by their first call."""
    runners: Dict[str, Runner] = {}
    for (backend, precision), graphs in _grouped(placement).items():
        if backend == ORT_CPU:
            module = optional_import("movq_deploy.backends.onnxruntime", "onnxruntime", _ORT_INSTALL)
            entries = {graph: engine_dir.graph_entries(precision)[graph] for graph in graphs}

            def open_graphs(chosen: Dict[str, dict], module=module) -> Dict[str, Runner]:
                return module.open_onnxruntime_runners(engine_dir, chosen, "cpu", threads, shared_pool)
        else:
            module = optional_import("movq_deploy.backends.openvino", "openvino", OPENVINO_INSTALL)
            entries = module.openvino_entries(engine_dir, graphs, precision)

            def open_graphs(chosen: Dict[str, dict], module=module, precision=precision) -> Dict[str, Runner]:
                return module.open_openvino_runners(engine_dir, chosen, precision, threads, cache_dir)
        runners.update(open_graphs({g: e for g, e in entries.items() if g not in ON_FIRST_USE}))
        for graph in entries.keys() & set(ON_FIRST_USE):
            engine_dir.verify(entries[graph])  # a missing or altered file is refused now, not at its first call
            runners[graph] = DeferredRunner(graph, functools.partial(_open_one, open_graphs, graph, entries[graph]))
    name, precision = cpu_choice.describe(placement)
    return Backend(name, reason, precision, {graph: runners[graph] for graph in placement}, placement)


def _open_one(open_graphs: Callable[[Dict[str, dict]], Dict[str, Runner]], graph: str, entry: dict) -> Runner:
    return open_graphs({graph: entry})[graph]


def _grouped(placement: Dict[str, Placement]) -> Dict[Tuple[str, str], List[str]]:
    groups: Dict[Tuple[str, str], List[str]] = {}
    for graph, where in placement.items():
        groups.setdefault((where.backend, where.precision), []).append(graph)
    return groups


def _open_tensorrt(engine_dir: EngineDir, precision: str, required: bool, skipped: List[str]):
    """The TensorRT Backend, or None (the reason appended to `skipped`); raises instead when `required`."""
    usable, why = _tensorrt_usable(engine_dir, precision)
    if usable:
        module = optional_import("movq_deploy.backends.tensorrt", "TensorRT", GPU_INSTALL)
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
        module = optional_import("movq_deploy.backends.tensorrt", "TensorRT", GPU_INSTALL)
    except ImportError as error:
        return False, f"TensorRT backend unavailable: {error}"
    return module.tensorrt_usable(engine_dir, precision)


def _chosen(backend: Backend) -> Backend:
    logger.info("movq-deploy backend: %s (%s) - %s", backend.name, backend.precision, backend.reason)
    return backend
