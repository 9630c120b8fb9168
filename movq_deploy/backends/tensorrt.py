"""TensorRT runner: runs the .plan engines that export/build_trt.py wrote (memory and streams: backends/cuda.py).

Written to the TensorRT 10.x/11.x Python API (tensor names, `set_input_shape`, `get_tensor_shape`,
`set_tensor_address`, `execute_async_v3`, `device_memory_size_v2`; none of the binding-index API removed in 10.0).
`tensorrt` and `cuda` are imported only when an engine is opened, so this module imports (and `tensorrt_usable`
answers) on machines that have neither.

Per runner: one CUDA stream; device buffers for every I/O tensor at the profile's largest batch, each with a pinned
host mirror, so a call is pinned-host copy -> async H2D -> execute -> async D2H -> one synchronize, with no
allocation. Output shapes come from the execution context once the input shapes are set. The prior runs the same
shapes T times per batch, so it can replay CUDA graphs: one execution context per batch size in use (sharing one
scratch allocation, used one at a time under the runner's lock), executed once to warm up, then captured and
replayed; only the MAX_CONTEXTS most recently used sizes are kept.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np

from movq_deploy import engine_cache
from movq_deploy.backends import cuda
from movq_deploy.backends.base import BaseRunner, TensorSpec, optional_import
from movq_deploy.contract import PRIOR_GRAPHS
from movq_deploy.manifest import EngineDir

# TensorRT DataType member name -> numpy dtype name (the I/O types our graphs use; others are refused).
_NUMPY_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT8": "int8", "UINT8": "uint8", "INT32": "int32",
                 "INT64": "int64", "BOOL": "bool"}
# Execution contexts (and CUDA graphs) kept per runner: a sample call uses two batch sizes (full chunks and the
# remainder), an edit a third; older sizes are released instead of accumulating one per size ever seen.
MAX_CONTEXTS = 4
logger = logging.getLogger("movq_deploy")


def import_tensorrt():
    return optional_import("tensorrt", "TensorRT", cuda.GPU_INSTALL)


def current_platform(device: int = 0) -> engine_cache.Platform:
    """This machine's TensorRT version and GPU; ImportError / RuntimeError (one line) when either is missing."""
    trt = import_tensorrt()
    gpu_name, compute_capability = cuda.cuda_gpu(device)
    return engine_cache.Platform(trt.__version__, gpu_name, compute_capability)


def tensorrt_usable(engine_dir: EngineDir, precision: str = "auto") -> "tuple[bool, str]":
    """Can this machine run the engine directory's TensorRT engines (of `precision`, or of any for "auto")?

    Returns (answer, the reason in one line): TensorRT importable, a CUDA GPU present, and engines in the manifest
    built with this TensorRT version on this GPU model. Never raises.
    """
    try:
        platform = current_platform()
    except (ImportError, RuntimeError) as error:
        return False, str(error)
    usable, reason = engine_cache.engines_status(engine_dir, platform)
    if usable and precision != "auto" and precision not in engine_cache.usable_precisions(engine_dir, platform):
        return False, f"no {precision} engines match {platform.describe()} ({reason})"
    return usable, reason


class LeastRecentlyUsed:
    """A dict that keeps its `capacity` most recently used entries and hands each one it drops to `on_evict`."""

    def __init__(self, capacity: int, on_evict: Callable[[Any], None]):
        self.capacity, self.on_evict = capacity, on_evict
        self._entries: "OrderedDict[Any, Any]" = OrderedDict()

    def get_or_create(self, key, create: Callable[[], Any]):
        if key not in self._entries:
            self._entries[key] = create()
            while len(self._entries) > self.capacity:
                self.on_evict(self._entries.popitem(last=False)[1])
        self._entries.move_to_end(key)
        return self._entries[key]

    def keys(self) -> list:
        return list(self._entries)

    def clear(self) -> None:
        """Drops every entry (each handed to `on_evict`)."""
        while self._entries:
            self.on_evict(self._entries.popitem(last=False)[1])


@dataclass
class _ExecutionState:
    """An execution context with its input and output shapes and, once captured, the CUDA graph replaying it."""

    context: Any
    shapes: Optional[dict] = None
    output_shapes: Optional[dict] = None
    executions: int = 0
    graph_exec: Any = None


class TensorRTRunner(BaseRunner):
    """Runs one serialized engine: `run({input name: array}) -> {output name: array}` (the runner interface).

    `entry` is the engine's manifest entry: when given, the TensorRT version and GPU it was built for and the
    plan's sha256 are checked before deserializing. `cuda_graphs` turns on CUDA-graph replay (meant for the
    fixed-shape prior step).
    """

    def __init__(self, plan_path: "str | os.PathLike[str]", *, entry: Optional[dict] = None, cuda_graphs: bool = False):
        plan_path = Path(plan_path)
        trt = import_tensorrt()
        runtime = self._cudart = cuda.cudart()
        if entry is not None:
            engine_cache.check_engine_platform(entry, current_platform())
            engine_cache.verify_plan(plan_path.parent, entry)
        elif not plan_path.is_file():
            raise FileNotFoundError(f"TensorRT engine {plan_path} does not exist")

        self.name = plan_path.name
        self.cuda_graphs = bool(cuda_graphs)
        self._trt = trt
        self._lock = threading.Lock()
        self._runtime = trt.Runtime(trt_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            raise ValueError(f"TensorRT {trt.__version__} could not deserialize {plan_path} (see its log above): "
                             f"rebuild it with `python export/build_trt.py`")
        self.inputs, self.outputs, self._dynamic_inputs = [], [], []
        self.min_batch, self.max_batch = self._read_io(trt)

        self._stream = cuda.cuda_check(runtime, runtime.cudaStreamCreateWithFlags(runtime.cudaStreamNonBlocking),
                                       "cudaStreamCreateWithFlags")
        self._stream_handle = cuda.native_handle(self._stream)  # what execute_async_v3 takes, resolved once
        self._buffers = {spec.name: cuda.PinnedDeviceBuffer(runtime, spec.dtype, _concrete(spec.shape, self.max_batch or 1))
                         for spec in self.inputs + self.outputs}
        # Activation scratch, allocated once and handed to every execution context (TensorRT >= 10.1 API).
        self._scratch_size = max(int(self._engine.device_memory_size_v2), 256)
        self._scratch = cuda.cuda_check(runtime, runtime.cudaMalloc(self._scratch_size), "cudaMalloc(scratch)")
        self._states = LeastRecentlyUsed(MAX_CONTEXTS, on_evict=lambda state: _destroy_graph(runtime, state))

    def _read_io(self, trt) -> "tuple[int, Optional[int]]":
        """Fills the I/O specs by tensor name; returns profile 0's batch range. Only the batch axis may be dynamic."""
        engine, min_batch, max_batch = self._engine, 1, None
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            dtype = _numpy_dtype(engine.get_tensor_dtype(name), name)
            shape = tuple(engine.get_tensor_shape(name))
            if -1 in shape[1:]:
                raise ValueError(f"{self.name}: tensor {name!r} has shape {shape}; only the leading batch axis may be dynamic")
            batched = bool(shape) and shape[0] == -1
            spec = TensorSpec(name, dtype, ("batch", *shape[1:]) if batched else shape)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.INPUT:
                self.outputs.append(spec)
                continue
            self.inputs.append(spec)
            if batched:
                self._dynamic_inputs.append(name)
                low, _, high = engine.get_tensor_profile_shape(name, 0)
                min_batch = max(min_batch, int(low[0]))
                max_batch = int(high[0]) if max_batch is None else min(max_batch, int(high[0]))
        return min_batch, max_batch

    # -- the runner interface ---------------------------------------------------------------------------------
    def run_impl(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        with self._lock:
            if self._engine is None:
                raise RuntimeError(f"{self.name}: the runner is closed")
            for spec in self.inputs:
                self._buffers[spec.name].upload(np.ascontiguousarray(feeds[spec.name]), self._stream)
            state = self._state_for({name: tuple(feeds[name].shape) for name in self._dynamic_inputs})
            self._execute(state)
            for name, shape in state.output_shapes.items():
                self._buffers[name].download(shape, self._stream)
            cuda.cuda_check(self._cudart, self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            return {name: self._buffers[name].view(shape).copy() for name, shape in state.output_shapes.items()}

    def close(self) -> None:
        """Frees the graphs, contexts, buffers and stream now (also done when the runner is garbage-collected)."""
        lock = getattr(self, "_lock", None)
        if lock is None:  # __init__ failed before allocating anything
            return
        with lock:
            self._release()

    def _release(self) -> None:
        runtime = getattr(self, "_cudart", None)
        if runtime is None:
            return
        if getattr(self, "_states", None) is not None:
            self._states.clear()
        for buffer in getattr(self, "_buffers", {}).values():
            buffer.free()
        self._buffers = {}
        if getattr(self, "_scratch", None) is not None:
            runtime.cudaFree(self._scratch)
            self._scratch = None
        if getattr(self, "_stream", None) is not None:
            runtime.cudaStreamDestroy(self._stream)
            self._stream = None
        self._engine = self._runtime = None
        self._cudart = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the CUDA runtime may already be gone
            pass

    # -- internals --------------------------------------------------------------------------------------------
    def _new_context(self):
        context = self._engine.create_execution_context(self._trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise RuntimeError(f"{self.name}: TensorRT could not create an execution context")
        context.set_device_memory(int(self._scratch), self._scratch_size)
        for name, buffer in self._buffers.items():
            if not context.set_tensor_address(name, int(buffer.device)):
                raise RuntimeError(f"{self.name}: set_tensor_address({name!r}) failed")
        return context

    def _state_for(self, shapes: dict) -> _ExecutionState:
        # With CUDA graphs every shape gets its own context (a captured graph is bound to its context's shapes),
        # the least recently used beyond MAX_CONTEXTS released; without, one context follows the shapes.
        key = tuple(sorted(shapes.items())) if self.cuda_graphs else None
        state = self._states.get_or_create(key, lambda: _ExecutionState(self._new_context()))
        if state.shapes != shapes:
            for name, shape in shapes.items():
                if not state.context.set_input_shape(name, shape):
                    raise ValueError(f"{self.name}: TensorRT refused input shape {shape} for {name!r}")
            state.shapes = dict(shapes)
            state.output_shapes = {spec.name: self._output_shape(state.context, spec.name) for spec in self.outputs}
        return state

    def _output_shape(self, context, name: str) -> tuple:
        shape = tuple(int(dim) for dim in context.get_tensor_shape(name))
        if any(dim < 0 for dim in shape):
            raise RuntimeError(f"{self.name}: TensorRT left output {name!r} with shape {shape} after the input shapes")
        return shape

    def _execute(self, state: _ExecutionState) -> None:
        runtime, stream = self._cudart, self._stream
        if self.cuda_graphs and state.graph_exec is None and state.executions >= 1:
            # The warm-up execution has run (TensorRT finishes its shape-dependent setup there): capture now.
            cuda.cuda_check(runtime, runtime.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            try:
                state.graph_exec = cuda.capture_cuda_graph(runtime, stream, lambda: self._enqueue(state.context))
            except RuntimeError as error:  # some engines cannot be captured: run them without graphs
                logger.warning("%s: CUDA-graph capture failed, running without CUDA graphs (%s)", self.name, error)
                self.cuda_graphs = False
        if state.graph_exec is not None:
            cuda.cuda_check(runtime, runtime.cudaGraphLaunch(state.graph_exec, stream), "cudaGraphLaunch")
        else:
            self._enqueue(state.context)
        state.executions += 1

    def _enqueue(self, context) -> None:
        if not context.execute_async_v3(self._stream_handle):
            raise RuntimeError(f"{self.name}: execute_async_v3 failed (see the TensorRT log above)")


def open_tensorrt_runners(engine_dir: EngineDir, precision: str = "auto", *, cuda_graphs: bool = True) -> dict:
    """{graph name: TensorRTRunner} for the engine directory's engines of `precision` (every graph it has:
    encoder, decoder, prior, and prior_guided when present).

    "auto" picks the fastest precision whose engines match this machine (`resolve_precision`). Each engine is
    checked (built from the ONNX graph the manifest lists now, TensorRT version, GPU, sha256) before it is
    deserialized, and its I/O names against the graph's. CUDA graphs are used for the prior steps only.
    """
    precision = resolve_precision(engine_dir, precision)
    runners = {}
    try:
        for graph in engine_dir.graph_names:
            entry = engine_dir.engine(precision, graph)
            if entry is None:
                raise FileNotFoundError(f"the manifest has no {precision} TensorRT engine for the {graph} (run "
                                        f"`python export/build_trt.py --engine-dir {engine_dir.path}"
                                        f"{' --fp16' if precision == 'fp16' else ''}`)")
            engine_cache.check_engine_source(entry, engine_dir.graph(precision, graph))
            runner = runners[graph] = TensorRTRunner(engine_dir.path / entry["file"], entry=entry,
                                                     cuda_graphs=cuda_graphs and graph in PRIOR_GRAPHS)
            _check_io_names(runner, engine_dir.graph(precision, graph), graph)
    except BaseException:
        for runner in runners.values():
            runner.close()
        raise
    return runners


def resolve_precision(engine_dir: EngineDir, precision: str = "auto") -> str:
    """`precision`, or for "auto" the preferred one with engines matching this machine; ValueError if none."""
    if precision != "auto":
        if precision not in engine_cache.ENGINE_PRECISIONS:
            raise ValueError(f"TensorRT engines come in {'/'.join(engine_cache.ENGINE_PRECISIONS)}, not {precision!r}")
        return precision
    platform = current_platform()
    usable = engine_cache.usable_precisions(engine_dir, platform)
    if not usable:
        raise ValueError(f"no TensorRT engines usable here: {engine_cache.engines_status(engine_dir, platform)[1]}")
    return usable[0]


def _check_io_names(runner: TensorRTRunner, graph_entry: Optional[dict], graph: str) -> None:
    if graph_entry is None:
        return
    for kind, specs in (("inputs", runner.inputs), ("outputs", runner.outputs)):
        expected = sorted(io["name"] for io in graph_entry.get(kind, []))
        if expected and expected != sorted(spec.name for spec in specs):
            raise ValueError(f"{runner.name}: engine {kind} {sorted(s.name for s in specs)} differ from the {graph} "
                             f"graph's {expected}: rebuild it with `python export/build_trt.py`")


def _destroy_graph(runtime, state: _ExecutionState) -> None:
    if state.graph_exec is not None:
        runtime.cudaGraphExecDestroy(state.graph_exec)
        state.graph_exec = None


def _concrete(shape: tuple, batch: int) -> tuple:
    return tuple(batch if dim == "batch" else int(dim) for dim in shape)


def _numpy_dtype(trt_dtype, name: str) -> str:
    try:
        return _NUMPY_DTYPES[trt_dtype.name]
    except KeyError:
        raise ValueError(f"tensor {name!r} has TensorRT type {trt_dtype.name}, which this runtime does not feed") from None


_LOGGER = None


def trt_logger(trt):
    """One logger for the process (TensorRT routes every builder and runtime message through it, and warns when a
    builder or runtime is given a different one); export/build_trt.py uses it too."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    return _LOGGER
