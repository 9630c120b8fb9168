"""TensorRT backend: runs the .plan engines that export/build_trt.py wrote, with cuda-python for memory and streams.

Written to the TensorRT 10.x/11.x Python API (tensor names, `set_input_shape`, `set_tensor_address`,
`execute_async_v3`, `device_memory_size_v2`; none of the binding-index API removed in 10.0) and to cuda-python's
`cuda.bindings.runtime`. `tensorrt` and `cuda` are imported only when an engine is opened, so this module imports
(and `tensorrt_usable` answers) on machines that have neither.

Per runner: one CUDA stream; device buffers for every I/O tensor at the profile's largest batch, each with a pinned
host mirror, so a call is pinned-host copy -> async H2D -> execute -> async D2H -> one synchronize, with no
allocation. The prior runs the same shapes T times per batch, so it can replay CUDA graphs: per batch size in use
one execution context (they share one scratch allocation, used one at a time under the runner's lock), executed
once to warm up, then captured and replayed from the next call on.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from movq_deploy import engine_cache
from movq_deploy.contract import TensorSpec
from movq_deploy.manifest import EngineDir, verify_file

# TensorRT DataType member name -> numpy dtype name (the I/O types our graphs use; others are refused).
_NUMPY_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "INT8": "int8",
    "UINT8": "uint8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}

_GPU_INSTALL_HINT = "pip install .[gpu]"
logger = logging.getLogger("movq_deploy")


def _import_tensorrt():
    try:
        import tensorrt
    except ImportError as error:
        raise ImportError(f"TensorRT is not installed ({error}); install it with `{_GPU_INSTALL_HINT}`") from None
    return tensorrt


def _import_cudart():
    try:
        from cuda.bindings import runtime as cudart
    except ImportError as error:
        raise ImportError(f"cuda-python is not installed ({error}); install it with `{_GPU_INSTALL_HINT}`") from None
    return cudart


def cuda_check(cudart, result, what: str):
    """Unpacks a cuda-python call's (error, *values) tuple: raises RuntimeError naming `what` on an error."""
    result = result if isinstance(result, tuple) else (result,)
    error, values = result[0], result[1:]
    if error != cudart.cudaError_t.cudaSuccess:
        _, name = cudart.cudaGetErrorName(error)
        _, text = cudart.cudaGetErrorString(error)
        raise RuntimeError(f"{what} failed: {name.decode()} ({text.decode()})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def native_handle(cuda_object) -> int:
    """The address behind a cuda-python object (a stream), as TensorRT's Python API takes it."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # cuda-bindings >= 12.9.1 (int() is deprecated)
    except ImportError:
        return int(cuda_object)
    return get_cuda_native_handle(cuda_object)


def cuda_gpu(device: int = 0) -> "tuple[str, str]":
    """(GPU name, compute capability "major.minor") of CUDA device `device`; RuntimeError when there is none."""
    cudart = _import_cudart()
    error, count = cudart.cudaGetDeviceCount()
    if error != cudart.cudaError_t.cudaSuccess or count <= device:
        found = f"{count} devices" if error == cudart.cudaError_t.cudaSuccess else cudart.cudaGetErrorName(error)[1].decode()
        raise RuntimeError(f"no CUDA GPU is available (cudaGetDeviceCount: {found})")
    props = cuda_check(cudart, cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}.{props.minor}"


def current_platform(device: int = 0) -> engine_cache.Platform:
    """This machine's TensorRT version and GPU; ImportError / RuntimeError (one line) when either is missing."""
    trt = _import_tensorrt()
    gpu_name, compute_capability = cuda_gpu(device)
    return engine_cache.Platform(trt.__version__, gpu_name, compute_capability)


def tensorrt_usable(engine_dir: EngineDir, precision: str = "auto") -> "tuple[bool, str]":
    """Can this machine run the manifest's TensorRT engines (of `precision`, or of any for "auto")?

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


class PinnedDeviceBuffer:
    """One tensor's storage at its largest shape: device memory plus a pinned (page-locked) host mirror.

    Pinned memory is what lets cudaMemcpyAsync overlap with the host and stay legal under stream capture.
    """

    def __init__(self, cudart, dtype, max_shape):
        self._cudart = cudart
        self.dtype = np.dtype(dtype)
        self.capacity = int(np.prod(max_shape, dtype=np.int64))
        nbytes = max(self.capacity * self.dtype.itemsize, 1)
        self.device = cuda_check(cudart, cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes})")
        self.host_pointer = cuda_check(cudart, cudart.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})")
        raw = (ctypes.c_uint8 * nbytes).from_address(int(self.host_pointer))
        self.host = np.frombuffer(raw, dtype=np.uint8)[: self.capacity * self.dtype.itemsize].view(self.dtype)

    def upload(self, array: np.ndarray, stream) -> None:
        """Copies `array` to the pinned mirror, then enqueues host -> device on `stream`."""
        if array.size > self.capacity:
            raise ValueError(f"{array.size} elements do not fit a buffer of {self.capacity}")
        self.host[: array.size] = array.ravel()
        nbytes = array.size * self.dtype.itemsize
        cudart = self._cudart
        kind = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_check(cudart, cudart.cudaMemcpyAsync(self.device, self.host_pointer, nbytes, kind, stream), "cudaMemcpyAsync H2D")

    def download(self, shape, stream) -> None:
        """Enqueues device -> pinned host for the first prod(shape) elements; read `view(shape)` after a sync."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        cudart = self._cudart
        kind = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_check(cudart, cudart.cudaMemcpyAsync(self.host_pointer, self.device, nbytes, kind, stream), "cudaMemcpyAsync D2H")

    def view(self, shape) -> np.ndarray:
        return self.host[: int(np.prod(shape, dtype=np.int64))].reshape(shape)

    def free(self) -> None:
        if self.device is not None:
            self._cudart.cudaFree(self.device)
            self._cudart.cudaFreeHost(self.host_pointer)
            self.device = self.host_pointer = None
            self.host = None


def capture_cuda_graph(cudart, stream, enqueue: Callable[[], None]):
    """Records the work `enqueue()` puts on `stream` into an executable CUDA graph (launch with cudaGraphLaunch).

    Thread-local capture mode: other threads' CUDA calls neither join nor break the capture.
    """
    mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    cuda_check(cudart, cudart.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
    try:
        enqueue()
    except BaseException:
        # End the capture whatever happened, so the stream is usable again.
        _, graph = cudart.cudaStreamEndCapture(stream)
        if graph is not None:
            cudart.cudaGraphDestroy(graph)
        raise
    graph = cuda_check(cudart, cudart.cudaStreamEndCapture(stream), "cudaStreamEndCapture")
    try:
        return cuda_check(cudart, cudart.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
    finally:
        cudart.cudaGraphDestroy(graph)  # the executable graph keeps what it needs


@dataclass
class _ExecutionState:
    """An execution context with its input shapes and, once captured, the CUDA graph replaying it."""

    context: Any
    shapes: Optional[dict] = None
    executions: int = 0
    graph_exec: Any = None


class TensorRTRunner:
    """Runs one serialized engine: `run({input name: array}) -> {output name: array}` (the runner interface).

    `entry` is the engine's manifest entry: when given, the TensorRT version and GPU it was built for and the
    plan's sha256 are checked before deserializing. `cuda_graphs` turns on CUDA-graph replay (one execution context
    and one graph per distinct input shape; meant for the fixed-shape prior step).
    """

    def __init__(self, plan_path: "str | os.PathLike[str]", *, entry: Optional[dict] = None, cuda_graphs: bool = False):

        plan_path = Path(plan_path)
        trt = _import_tensorrt()
        cudart = self._cudart = _import_cudart()
        if entry is not None:
            engine_cache.check_engine_platform(entry, current_platform())
            verify_file(plan_path.parent, {**entry, "file": plan_path.name})
        elif not plan_path.is_file():
            raise FileNotFoundError(f"TensorRT engine {plan_path} does not exist")

        self.name = plan_path.name
        self.cuda_graphs = bool(cuda_graphs)
        self._trt = trt
        self._lock = threading.Lock()
        self._runtime = trt.Runtime(trt_logger(trt))
        self._engine = self._runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self._engine is None:
            raise ValueError(f"TensorRT {trt.__version__} could not deserialize {plan_path} (see its log above)")
        engine = self._engine

        # I/O specs by tensor name; the only dynamic axis is the leading batch axis, bounded by profile 0.
        self.inputs, self.outputs = [], []
        self._dynamic_inputs = []
        min_batch, max_batch = 1, None
        for index in range(engine.num_io_tensors):
            name = engine.get_tensor_name(index)
            dtype = _numpy_dtype(engine.get_tensor_dtype(name), name)
            shape = tuple(engine.get_tensor_shape(name))
            if -1 in shape[1:]:
                raise ValueError(f"{plan_path}: tensor {name!r} has shape {shape}; only the leading batch axis may be dynamic")
            batched = bool(shape) and shape[0] == -1
            spec = TensorSpec(name, dtype, ("batch", *shape[1:]) if batched else shape)
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append(spec)
                if batched:
                    self._dynamic_inputs.append(name)
                    low, _, high = engine.get_tensor_profile_shape(name, 0)
                    min_batch = max(min_batch, int(low[0]))
                    max_batch = int(high[0]) if max_batch is None else min(max_batch, int(high[0]))
            else:
                self.outputs.append(spec)
        self.min_batch, self.max_batch = min_batch, max_batch

        self._stream = cuda_check(cudart, cudart.cudaStreamCreateWithFlags(cudart.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")
        self._buffers = {
            spec.name: PinnedDeviceBuffer(cudart, spec.dtype, _concrete(spec.shape, max_batch or 1))
            for spec in self.inputs + self.outputs
        }
        # Activation scratch, allocated once and handed to every execution context (TensorRT >= 10.1 API).
        self._scratch_size = max(int(engine.device_memory_size_v2), 256)
        self._scratch = cuda_check(cudart, cudart.cudaMalloc(self._scratch_size), "cudaMalloc(scratch)")
        self._states: dict = {}

    # -- the runner interface ---------------------------------------------------------------------------------
    def run(self, feeds: "dict[str, np.ndarray]") -> "dict[str, np.ndarray]":
        with self._lock:
            batch, shapes = self._check_feeds(feeds)
            for spec in self.inputs:
                self._buffers[spec.name].upload(np.ascontiguousarray(feeds[spec.name]), self._stream)
            state = self._state_for(shapes)
            self._execute(state)
            out_shapes = {spec.name: _concrete(spec.shape, batch) for spec in self.outputs}
            for name, shape in out_shapes.items():
                self._buffers[name].download(shape, self._stream)
            cuda_check(self._cudart, self._cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            return {name: self._buffers[name].view(shape).copy() for name, shape in out_shapes.items()}

    @property
    def captured_batch_sizes(self) -> list:
        """The batch sizes with a captured CUDA graph (for tests and benchmarks)."""
        with self._lock:  # run() adds states from other threads
            return sorted(
                state.shapes[self._dynamic_inputs[0]][0]
                for state in self._states.values()
                if state.graph_exec is not None and self._dynamic_inputs
            )

    def close(self) -> None:
        """Frees the graphs, contexts, buffers and stream (also done when the runner is garbage-collected)."""
        lock = getattr(self, "_lock", None)
        if lock is None:  # __init__ failed before allocating anything
            return
        with lock:
            self._release()

    def _release(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for state in getattr(self, "_states", {}).values():
            if state.graph_exec is not None:
                cudart.cudaGraphExecDestroy(state.graph_exec)
        self._states = {}
        for buffer in getattr(self, "_buffers", {}).values():
            buffer.free()
        self._buffers = {}
        if getattr(self, "_scratch", None) is not None:
            cudart.cudaFree(self._scratch)
            self._scratch = None
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None
        self._engine = self._runtime = None
        self._cudart = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the CUDA runtime may already be gone
            pass

    # -- internals --------------------------------------------------------------------------------------------
    def _check_feeds(self, feeds: dict) -> "tuple[int, dict]":
        expected = {spec.name for spec in self.inputs}
        if set(feeds) != expected:
            raise ValueError(f"{self.name}: expected inputs {sorted(expected)}, got {sorted(feeds)}")
        batch = None
        for spec in self.inputs:
            array = feeds[spec.name]
            if array.dtype != np.dtype(spec.dtype):
                raise ValueError(f"{self.name}: input {spec.name!r} must be {spec.dtype}, got {array.dtype}")
            if len(array.shape) != len(spec.shape) or any(
                want != "batch" and want != got for want, got in zip(spec.shape, array.shape)
            ):
                raise ValueError(f"{self.name}: input {spec.name!r} must have shape {spec.shape}, got {array.shape}")
            if spec.shape and spec.shape[0] == "batch":
                if batch is not None and array.shape[0] != batch:
                    raise ValueError(f"{self.name}: inputs disagree on the batch size ({batch} vs {array.shape[0]})")
                batch = array.shape[0]
        if batch is not None and not (self.min_batch <= batch <= self.max_batch):
            raise ValueError(
                f"{self.name}: batch {batch} is outside the engine's profile [{self.min_batch}, {self.max_batch}] "
                f"(rebuild with export/build_trt.py --max-batch)"
            )
        shapes = {name: tuple(feeds[name].shape) for name in self._dynamic_inputs}
        return batch or 1, shapes

    def _new_context(self):
        trt = self._trt
        context = self._engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise RuntimeError(f"{self.name}: TensorRT could not create an execution context")
        context.set_device_memory(int(self._scratch), self._scratch_size)
        for name, buffer in self._buffers.items():
            if not context.set_tensor_address(name, int(buffer.device)):
                raise RuntimeError(f"{self.name}: set_tensor_address({name!r}) failed")
        return context

    def _state_for(self, shapes: dict) -> _ExecutionState:
        # With CUDA graphs every shape gets its own context (a captured graph is bound to its context's shapes);
        # without, one context follows the shapes.
        key = tuple(sorted(shapes.items())) if self.cuda_graphs else None
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _ExecutionState(self._new_context())
        if state.shapes != shapes:
            for name, shape in shapes.items():
                if not state.context.set_input_shape(name, shape):
                    raise ValueError(f"{self.name}: TensorRT refused input shape {shape} for {name!r}")
            state.shapes = dict(shapes)
        return state

    def _execute(self, state: _ExecutionState) -> None:
        cudart, stream = self._cudart, self._stream
        if self.cuda_graphs and state.graph_exec is None and state.executions >= 1:
            # The warm-up execution has run (TensorRT finishes its shape-dependent setup there): capture now.
            cuda_check(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
            try:
                state.graph_exec = capture_cuda_graph(cudart, stream, lambda: self._enqueue(state.context))
            except RuntimeError as error:  # some engines cannot be captured: run them without graphs
                logger.warning("%s: CUDA-graph capture failed, running without CUDA graphs (%s)", self.name, error)
                self.cuda_graphs = False
        if state.graph_exec is not None:
            cuda_check(cudart, cudart.cudaGraphLaunch(state.graph_exec, stream), "cudaGraphLaunch")
        else:
            self._enqueue(state.context)
        state.executions += 1

    def _enqueue(self, context) -> None:
        if not context.execute_async_v3(native_handle(self._stream)):
            raise RuntimeError(f"{self.name}: execute_async_v3 failed (see the TensorRT log above)")


def open_tensorrt_runners(engine_dir: EngineDir, precision: str = "auto", *, cuda_graphs: bool = True) -> dict:
    """{"encoder", "decoder", "prior"} -> TensorRTRunner for the manifest's engines of `precision`.

    "auto" picks the fastest precision whose engines match this machine (`resolve_precision`). Each engine is
    checked (TensorRT version, GPU, sha256) before it is deserialized, and its I/O names against the manifest's
    graph. CUDA graphs are used for the prior step only (its shapes repeat every step).
    """
    precision = resolve_precision(engine_dir, precision)
    runners = {}
    for graph in engine_cache.ENGINE_GRAPHS:
        entry = engine_dir.engine(precision, graph)
        if entry is None:
            raise FileNotFoundError(
                f"the manifest has no {precision} TensorRT engine for the {graph} "
                f"(run `python export/build_trt.py --engine-dir {engine_dir.path}{' --fp16' if precision == 'fp16' else ''}`)"
            )
        runner = TensorRTRunner(engine_dir.path / entry["file"], entry=entry, cuda_graphs=cuda_graphs and graph == "prior")
        _check_io_names(runner, engine_dir.graph(precision, graph), graph)
        runners[graph] = runner
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
            raise ValueError(f"{runner.name}: engine {kind} {sorted(s.name for s in specs)} differ from the {graph} graph's {expected}")


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
