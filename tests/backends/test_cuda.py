"""movq_deploy.backends.cuda: cuda-python buffers, stream copies and CUDA-graph capture. Everywhere: the module
imports without cuda-python. With cuda-python and a GPU (TensorRT not needed): the rest."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from movq_deploy.backends import cuda

ROOT = Path(__file__).resolve().parents[2]


def _gpu():
    try:
        return cuda.cuda_gpu()
    except (ImportError, RuntimeError):
        return None


GPU = _gpu()
needs_gpu = pytest.mark.skipif(GPU is None, reason="needs cuda-python (pip install 'movq-deploy[gpu]') and a CUDA GPU")


def test_module_imports_without_cuda():
    code = "import sys, movq_deploy.backends.cuda; print('cuda' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


@pytest.fixture
def cuda_stream():
    runtime = cuda.cudart()
    stream = cuda.cuda_check(runtime, runtime.cudaStreamCreateWithFlags(runtime.cudaStreamNonBlocking), "stream")
    yield runtime, stream
    runtime.cudaStreamDestroy(stream)


def _sync(runtime, stream):
    cuda.cuda_check(runtime, runtime.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


@needs_gpu
def test_gpu_and_stream_are_described(cuda_stream):
    name, capability = GPU
    assert name and re.fullmatch(r"\d+\.\d+", capability)
    handle = cuda.native_handle(cuda_stream[1])  # what execute_async_v3 is given
    assert isinstance(handle, int) and handle != 0


@needs_gpu
def test_pinned_buffer_round_trip(cuda_stream):
    runtime, stream = cuda_stream
    buffer = cuda.PinnedDeviceBuffer(runtime, "int32", (8, 16))
    try:
        x = np.arange(3 * 16, dtype=np.int32).reshape(3, 16)
        buffer.upload(x, stream)
        _sync(runtime, stream)
        buffer.host[:] = -1  # the answer must come back from the device, not from the host mirror
        buffer.download((3, 16), stream)
        _sync(runtime, stream)
        np.testing.assert_array_equal(buffer.view((3, 16)), x)
        with pytest.raises(ValueError, match="do not fit"):
            buffer.upload(np.zeros((9, 16), np.int32), stream)
    finally:
        buffer.free()


@needs_gpu
def test_cuda_graph_replays_with_new_data_at_the_same_addresses(cuda_stream):
    """The mechanism of the prior's replay: a captured graph reads whatever the fixed buffers hold at launch."""
    runtime, stream = cuda_stream
    source = cuda.PinnedDeviceBuffer(runtime, "float32", (4, 32))
    target = cuda.PinnedDeviceBuffer(runtime, "float32", (4, 32))
    kind = runtime.cudaMemcpyKind.cudaMemcpyDeviceToDevice

    def enqueue():
        cuda.cuda_check(runtime, runtime.cudaMemcpyAsync(target.device, source.device, 4 * 32 * 4, kind, stream), "D2D")

    graph = cuda.capture_cuda_graph(runtime, stream, enqueue)
    try:
        rng = np.random.default_rng(0)
        for _ in range(3):
            x = rng.random((4, 32), dtype=np.float32)
            source.upload(x, stream)
            cuda.cuda_check(runtime, runtime.cudaGraphLaunch(graph, stream), "cudaGraphLaunch")
            target.download((4, 32), stream)
            _sync(runtime, stream)
            np.testing.assert_array_equal(target.view((4, 32)), x)
    finally:
        runtime.cudaGraphExecDestroy(graph)
        source.free()
        target.free()


@needs_gpu
@pytest.mark.parametrize("failure", ["exception", "illegal call"])
def test_failed_capture_leaves_the_stream_usable_and_no_error_behind(cuda_stream, failure):
    """As trtexec's endCaptureOnError: after a failed capture the stream works and CUDA's last error is clear."""
    runtime, stream = cuda_stream

    def enqueue():
        if failure == "exception":
            raise RuntimeError("planted")
        runtime.cudaStreamSynchronize(stream)  # not allowed while capturing: invalidates the capture

    with pytest.raises(RuntimeError):
        cuda.capture_cuda_graph(runtime, stream, enqueue)
    assert runtime.cudaGetLastError()[0] == runtime.cudaError_t.cudaSuccess
    buffer = cuda.PinnedDeviceBuffer(runtime, "uint8", (16,))
    try:
        buffer.upload(np.arange(16, dtype=np.uint8), stream)
        buffer.download((16,), stream)
        _sync(runtime, stream)
        np.testing.assert_array_equal(buffer.view((16,)), np.arange(16, dtype=np.uint8))
    finally:
        buffer.free()
