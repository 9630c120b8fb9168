"""cuda-python for the TensorRT runner: error checks, the GPU's identity, pinned/device buffers, CUDA-graph capture.

Written to cuda-python's `cuda.bindings.runtime` (cuda-bindings 12.8+ and 13; the old `from cuda import cudart`
shim is gone in 13). Imported lazily, by `cudart()`, so that this module imports on machines without CUDA.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Callable

import numpy as np

from movq_deploy.backends.base import GPU_INSTALL, optional_import



@functools.lru_cache(maxsize=None)
def cudart():
    """cuda.bindings.runtime, imported once; ImportError in one line when cuda-python is missing."""
    return optional_import("cuda.bindings.runtime", "cuda-python", GPU_INSTALL)


def cuda_check(runtime, result, what: str):
    """Unpacks a cuda-python call's (error, *values) tuple: raises RuntimeError naming `what` on an error."""
    result = result if isinstance(result, tuple) else (result,)
    error, values = result[0], result[1:]
    if error != runtime.cudaError_t.cudaSuccess:
        _, name = runtime.cudaGetErrorName(error)
        _, text = runtime.cudaGetErrorString(error)
        raise RuntimeError(f"{what} failed: {name.decode()} ({text.decode()})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@functools.lru_cache(maxsize=None)
def _handle_getter() -> Callable[[object], int]:
    try:
        from cuda.bindings.utils import get_cuda_native_handle  # cuda-bindings >= 12.9.1 (int() is deprecated)
    except ImportError:
        return int
    return get_cuda_native_handle


def native_handle(cuda_object) -> int:
    """The address behind a cuda-python object (a stream), as TensorRT's Python API takes it (resolved once)."""
    return _handle_getter()(cuda_object)


def cuda_gpu(device: int = 0) -> "tuple[str, str]":
    """(GPU name, compute capability "major.minor") of CUDA device `device`; RuntimeError when there is none."""
    runtime = cudart()
    error, count = runtime.cudaGetDeviceCount()
    if error != runtime.cudaError_t.cudaSuccess or count <= device:
        found = f"{count} devices" if error == runtime.cudaError_t.cudaSuccess else \
            runtime.cudaGetErrorName(error)[1].decode()
        raise RuntimeError(f"no CUDA GPU is available (cudaGetDeviceCount: {found})")
    props = cuda_check(runtime, runtime.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.split(b"\0", 1)[0].decode() if isinstance(props.name, bytes) else str(props.name)
    return name, f"{props.major}.{props.minor}"


class PinnedDeviceBuffer:
    """One tensor's storage at its largest shape: device memory plus a pinned (page-locked) host mirror.

    Pinned memory is what lets cudaMemcpyAsync overlap with the host and stay legal under stream capture.
    """

    def __init__(self, runtime, dtype, max_shape):
        self._cudart = runtime
        self.dtype = np.dtype(dtype)
        self.capacity = int(np.prod(max_shape, dtype=np.int64))
        nbytes = max(self.capacity * self.dtype.itemsize, 1)
        self.device = cuda_check(runtime, runtime.cudaMalloc(nbytes), f"cudaMalloc({nbytes})")
        self.host_pointer = cuda_check(runtime, runtime.cudaMallocHost(nbytes), f"cudaMallocHost({nbytes})")
        raw = (ctypes.c_uint8 * nbytes).from_address(int(self.host_pointer))
        self.host = np.frombuffer(raw, dtype=np.uint8)[: self.capacity * self.dtype.itemsize].view(self.dtype)

    def upload(self, array: np.ndarray, stream) -> None:
        """Copies `array` to the pinned mirror, then enqueues host -> device on `stream`."""
        if array.size > self.capacity:
            raise ValueError(f"{array.size} elements do not fit a buffer of {self.capacity}")
        self.host[: array.size] = array.ravel()
        nbytes = array.size * self.dtype.itemsize
        runtime = self._cudart
        kind = runtime.cudaMemcpyKind.cudaMemcpyHostToDevice
        cuda_check(runtime, runtime.cudaMemcpyAsync(self.device, self.host_pointer, nbytes, kind, stream),
                   "cudaMemcpyAsync H2D")

    def download(self, shape, stream) -> None:
        """Enqueues device -> pinned host for the first prod(shape) elements; read `view(shape)` after a sync."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        runtime = self._cudart
        kind = runtime.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_check(runtime, runtime.cudaMemcpyAsync(self.host_pointer, self.device, nbytes, kind, stream),
                   "cudaMemcpyAsync D2H")

    def view(self, shape) -> np.ndarray:
        return self.host[: int(np.prod(shape, dtype=np.int64))].reshape(shape)

    def free(self) -> None:
        if self.device is not None:
            self._cudart.cudaFree(self.device)
            self._cudart.cudaFreeHost(self.host_pointer)
            self.device = self.host_pointer = None
            self.host = None


def capture_cuda_graph(runtime, stream, enqueue: Callable[[], None]):
    """Records the work `enqueue()` puts on `stream` into an executable CUDA graph (launch with cudaGraphLaunch).

    Thread-local capture mode: other threads' CUDA calls neither join nor break the capture. On any failure the
    capture is ended and CUDA's last error cleared (as trtexec's endCaptureOnError does), so that the stream works
    and the next CUDA call does not report this error as its own; then RuntimeError.
    """
    mode = runtime.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    cuda_check(runtime, runtime.cudaStreamBeginCapture(stream, mode), "cudaStreamBeginCapture")
    try:
        enqueue()
    except BaseException:
        _discard(runtime, runtime.cudaStreamEndCapture(stream)[1])
        raise
    error, graph = runtime.cudaStreamEndCapture(stream)
    if error != runtime.cudaError_t.cudaSuccess:
        _discard(runtime, graph)
        cuda_check(runtime, (error,), "cudaStreamEndCapture")
    try:
        result = runtime.cudaGraphInstantiate(graph, 0)
    finally:
        runtime.cudaGraphDestroy(graph)  # the executable graph keeps what it needs
    if result[0] != runtime.cudaError_t.cudaSuccess:
        runtime.cudaGetLastError()
    return cuda_check(runtime, result, "cudaGraphInstantiate")


def _discard(runtime, graph) -> None:
    """Destroys a capture's partial graph (if any) and clears CUDA's last error, which the failed capture set."""
    if graph is not None:
        runtime.cudaGraphDestroy(graph)
    runtime.cudaGetLastError()
