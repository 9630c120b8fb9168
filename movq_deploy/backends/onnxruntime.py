"""ONNX Runtime runners: the embedded default (CPU provider) and the CUDA provider where onnxruntime-gpu is installed.

One InferenceSession per graph. `InferenceSession.run` may be called from several threads at once (ONNX Runtime
documents Run as thread-safe), so the runners need no lock.

CPU session settings, measured on the tiny prior step and decoder (2-core AVX-512 EPYC shared with other jobs):
ORT_ENABLE_ALL graph optimizations (decoder at batch 16: 107 ms vs 137 ms BASIC and 159 ms DISABLE_ALL), sequential
execution, one intra-op thread per physical core (SMT siblings counted once, as ONNX Runtime's own default does, but
honouring the process's CPU affinity), and no thread spinning (decoder at batch 16: 51 ms vs 107 ms spinning; prior
step at batch 64: 117 ms vs 207 ms).
I/O binding with preallocated outputs gained nothing on the CPU (1.69 vs 1.66 ms at batch 1), nor did the
transformer optimizer's attention/LayerNorm fusions for the fp32 prior, so neither is used there.

The CUDA path binds inputs from host memory and outputs to the device, then copies them back: the per-step traffic
of the prior is O(B*N) by design (logits never leave the graph), so there is nothing more to keep on the device.
It could not be run on the development machine (no GPU); it is kept deliberately thin.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import onnxruntime as ort

from movq_deploy.backends.base import BaseRunner, TensorSpec
from movq_deploy.manifest import EngineDir

_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(int32)": "int32", "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


def cuda_available() -> bool:
    """Whether this onnxruntime was built with the CUDA provider: not whether it starts (see OnnxRuntimeRunner)."""
    return "CUDAExecutionProvider" in ort.get_available_providers()


def physical_cores() -> int:
    """Physical cores this process may run on (SMT siblings counted once); 0 where unknown (ONNX Runtime decides)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux: ONNX Runtime's own default is physical cores too
        return 0
    cores = set()
    for cpu in cpus:
        siblings = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
        try:
            cores.add(siblings.read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


_shared_pool_threads: Optional[int] = None  # the size of this process's shared pool, once made
_shared_pool_lock = threading.Lock()


def use_shared_thread_pool(threads: Optional[int] = None) -> int:
    """Makes ONNX Runtime's process-wide intra-op thread pool (`threads`, default: the physical cores), which every
    session opened with shared_pool=True then uses instead of a pool of its own; returns its size.

    A process-wide setting: ONNX Runtime takes it once per process, so a later call asking for another size raises
    ValueError. Its workers spin while waiting (ONNX Runtime's default), which the per-session pools do not: one
    pool for the three graphs means no two pools spin against each other.
    """
    global _shared_pool_threads
    threads = threads or physical_cores() or os.cpu_count() or 1
    with _shared_pool_lock:
        if _shared_pool_threads is None:
            ort.set_global_thread_pool_sizes(threads, 1)
            _shared_pool_threads = threads
        elif _shared_pool_threads != threads:
            raise ValueError(f"this process's shared ONNX Runtime thread pool already has {_shared_pool_threads} "
                             f"threads; it is set once per process (asked for {threads})")
    return threads


def cpu_session_options(threads: Optional[int] = None, shared_pool: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL  # the graphs are chains: nothing to run in parallel
    if shared_pool:
        use_shared_thread_pool(threads)
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = threads or physical_cores()
        options.inter_op_num_threads = 1
        # Idle intra-op threads sleep instead of spinning: on a busy or shared CPU, the spinning workers of the
        # three sessions' pools steal the cores the other threads need (BENCHMARKS.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: the default prints a warning per unused initializer
    return options


class CudaProviderUnavailable(RuntimeError):
    """ONNX Runtime created the session without the CUDA provider (it falls back to the CPU silently)."""


class OnnxRuntimeRunner(BaseRunner):
    """One ONNX graph in one InferenceSession; `run(feeds) -> {output name: array}`.

    device="cuda" asks for the CUDA provider and checks, once the session exists, that it is really in use:
    `get_available_providers()` only says what the wheel was built with, and a session whose CUDA provider fails
    to start (no GPU, missing CUDA/cuDNN libraries) runs on the CPU without a word. Binding outputs to "cuda" on
    such a session can crash (onnxruntime#21865), so it raises CudaProviderUnavailable instead.
    """

    def __init__(self, path: "str | os.PathLike[str]", device: str = "cpu", threads: Optional[int] = None,
                 shared_pool: bool = False):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        options = cpu_session_options(threads, shared_pool)
        providers = ["CPUExecutionProvider"]
        if device == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
        self.path = Path(path)
        self.name = self.path.name
        self.device = device
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        if device == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            in_use = self.session.get_providers()
            self.session = None
            raise CudaProviderUnavailable(f"ONNX Runtime's CUDA provider did not start for {self.name} (the session "
                                          f"runs on {', '.join(in_use)}: no GPU, or its CUDA/cuDNN libraries did "
                                          f"not load)")
        self.io_binding = device == "cuda"  # inputs from host memory, outputs bound on the device
        self.inputs = [_spec(arg) for arg in self.session.get_inputs()]
        self.outputs = [_spec(arg) for arg in self.session.get_outputs()]
        self._output_names = [spec.name for spec in self.outputs]

    def run_impl(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        session = self.session
        if session is None:
            raise RuntimeError(f"{self.name}: the runner is closed")
        if not self.io_binding:
            return dict(zip(self._output_names, session.run(self._output_names, feeds)))
        binding = session.io_binding()  # one per call: a binding is not shared between threads
        for name, array in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self._output_names:
            binding.bind_output(name, "cuda", 0)
        session.run_with_iobinding(binding)
        return dict(zip(self._output_names, binding.copy_outputs_to_cpu()))

    def close(self) -> None:
        """Drops the session (its memory, device memory with the CUDA provider, goes with it)."""
        self.session = None


def open_onnxruntime_runners(
    engine_dir: EngineDir, entries: Dict[str, dict], device: str = "cpu", threads: Optional[int] = None,
    shared_pool: bool = False,
) -> Dict[str, OnnxRuntimeRunner]:
    """{graph name: runner} for the manifest entries {graph name: {"file", "sha256", ...}}, each file verified first;
    threads / shared_pool: see `cpu_session_options` and `use_shared_thread_pool`."""
    return {name: OnnxRuntimeRunner(engine_dir.verify(entry), device, threads, shared_pool)
            for name, entry in entries.items()}


def _spec(arg) -> TensorSpec:
    shape = tuple(dim if isinstance(dim, int) else (dim or "batch") for dim in arg.shape)
    return TensorSpec(arg.name, _ORT_DTYPES.get(arg.type, arg.type), shape)
