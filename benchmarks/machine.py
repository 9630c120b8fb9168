"""What the benchmark ran on, and how fast this machine multiplies dense matrices (the physical limit it is held to).

The GEMM rate is measured in the same run as the model timings, so "fraction of the GEMM rate" compares numbers
taken under the same load (on a shared machine the absolute numbers move; the ratio moves much less).
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from typing import Optional

import numpy as np

from benchmarks.timing import time_calls
from movq_deploy.backends import cpu_features

LIBRARIES = ("numpy", "torch", "onnx", "onnxruntime", "onnxruntime-gpu", "openvino", "nncf", "tensorrt", "cuda-python",
             "movq-deploy")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector extensions that decide GEMM speed (AVX2, AVX-512, VNNI for int8, BF16, AMX)."""
    return [flag for flag in cpu_features.REPORTED_FLAGS if flag in cpu_features.cpu_flags()]


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, which containers narrow; os.cpu_count() ignores it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def gpu_names() -> list[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def load_average() -> Optional[list[float]]:
    """The 1/5/15-minute load average: how busy the machine was while we timed (other processes steal cores)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def serving_report(script: str, engine_dir: str, cores: int) -> dict:
    """What a serving benchmark's report opens with: the engine directory, the CPU and the cores the servers get,
    the library versions, the command that ran and the load before it."""
    return {"engine_dir": engine_dir, "cpu": cpu_model(), "cores": cores, "versions": library_versions(),
            "command": " ".join(["python", script, *sys.argv[1:]]), "load_before": load_average()}


def machine_info() -> dict:
    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cores": usable_cores(),
        "gpus": gpu_names(),
        "platform": platform.platform(),
        "libraries": library_versions(),
        "load_average_at_start": load_average(),
    }


def _best_rate(fn, flops: float, budget_s: float) -> float:
    """FLOP/s of `fn`, from the median of repeated runs within `budget_s` (after one warm-up)."""
    return flops / float(np.median(time_calls(fn, budget_s, warmup=1, min_repeats=3, max_repeats=200)))


def _onnxruntime_matmul(a: np.ndarray, b: np.ndarray, threads: int):
    """A call running a @ b as a one-node ONNX graph on ONNX Runtime's CPU provider (its MLAS GEMM kernels)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def value(name, shape):
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))

    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "gemm",
                              [value("a", a.shape), value("b", b.shape)], [value("c", (a.shape[0], b.shape[1]))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"a": a, "b": b})


def gemm_rate(threads: int, budget_s: float = 1.0, size: int = 1024) -> dict:
    """Dense GEMM rate of this machine, in GFLOP/s, measured with the libraries the backends use.

    CPU: fp32 square matmul of `size` with numpy (its BLAS), torch (`threads` threads) and ONNX Runtime (MLAS,
    `threads` intra-op threads); the fastest is the reference (BENCHMARKS.md has the readings). GPU (when torch
    sees CUDA): fp16 matmul on the tensor cores, size 8192.
    """
    result: dict = {"size": size, "threads": threads}
    flops = 2.0 * size**3
    a = np.random.default_rng(0).standard_normal((size, size), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((size, size), dtype=np.float32)
    result["numpy_fp32_gflops"] = round(_best_rate(lambda: a @ b, flops, budget_s / 3) / 1e9, 1)
    result["onnxruntime_fp32_gflops"] = round(_best_rate(_onnxruntime_matmul(a, b, threads), flops, budget_s / 3)
                                              / 1e9, 1)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        with torch.inference_mode():
            result["torch_fp32_gflops"] = round(_best_rate(lambda: ta @ tb, flops, budget_s / 3) / 1e9, 1)
        torch.set_num_threads(previous)
    result["cpu_fp32_gflops"] = max(result["numpy_fp32_gflops"], result["onnxruntime_fp32_gflops"],
                                    result.get("torch_fp32_gflops", 0.0))
    if torch is not None and torch.cuda.is_available():
        gpu_size = 8192
        ga = torch.randn(gpu_size, gpu_size, device="cuda", dtype=torch.float16)
        gb = torch.randn(gpu_size, gpu_size, device="cuda", dtype=torch.float16)

        def gpu_matmul():
            ga @ gb
            torch.cuda.synchronize()

        result["gpu_fp16_gflops"] = round(_best_rate(gpu_matmul, 2.0 * gpu_size**3, budget_s) / 1e9, 1)
    return result


def one_node_session(node_op: str, a: np.ndarray, b: np.ndarray, threads: int, extra_inputs=()):
    """An ONNX Runtime CPU session of `node_op`(a, b constant, *extra constants): a -> output."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    out_type = TensorProto.INT32 if node_op == "MatMulInteger" else TensorProto.FLOAT
    in_type = helper.np_dtype_to_tensor_dtype(a.dtype)
    constants = [numpy_helper.from_array(b, "b")] + [numpy_helper.from_array(v, n) for n, v in extra_inputs]
    node = helper.make_node(node_op, ["a", "b", *(n for n, _ in extra_inputs)], ["c"])
    graph = helper.make_graph([node], "gemm", [helper.make_tensor_value_info("a", in_type, list(a.shape))],
                              [helper.make_tensor_value_info("c", out_type, [a.shape[0], b.shape[1]])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as the package's sessions
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda: session.run(None, {"a": a})


def mlas_int8_gemm(size: int, threads: int):
    """A call of MLAS's u8s8 GEMM of `size`^3 (a one-node MatMulInteger graph, constant s8 weights)."""
    rng = np.random.default_rng(0)
    a8 = rng.integers(0, 256, (size, size), dtype=np.uint8)
    b8 = rng.integers(-128, 128, (size, size), dtype=np.int8)
    zero_points = [("a_zero_point", np.array(128, np.uint8)), ("b_zero_point", np.array(0, np.int8))]
    return one_node_session("MatMulInteger", a8, b8, threads, zero_points)


def _openvino_matmul(a: np.ndarray, b: np.ndarray, threads: int, int8: bool):
    """A call running a @ b on OpenVINO's CPU plugin with b a constant (prepacked, as a model's weights are): in
    bf16, or in int8 (u8 activations through a FakeQuantize, s8 weights dequantized per tensor: the pattern NNCF's
    graphs hold, which the plugin runs as an int8 GEMM)."""
    import openvino as ov
    from openvino import opset13 as ops

    from movq_deploy.backends.openvino import shared_core

    a_in = ops.parameter(a.shape, np.float32, name="a")
    x = a_in.output(0)
    if int8:
        low, high = ops.constant(np.float32(0.0)), ops.constant(np.float32(4.0))
        x = ops.fake_quantize(x, low, high, low, high, 256).output(0)
        weights = ops.multiply(ops.convert(ops.constant(np.clip(np.round(b * 32), -128, 127).astype(np.int8)),
                                           np.float32), ops.constant(np.float32(1 / 32)))
    else:
        weights = ops.constant(b)
    model = ov.Model([ops.result(ops.matmul(x, weights, False, False))], [a_in], "gemm")
    compiled = shared_core().compile_model(model, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                      "INFERENCE_PRECISION_HINT": "bf16"})
    request = compiled.create_infer_request()
    return lambda: request.infer({"a": a})


def reduced_precision_rates(threads: int, budget_s: float = 1.0, size: int = 2048) -> dict:
    """This CPU's bf16 GEMM rate (GFLOP/s) and int8 GEMM rate (GOP/s; 2 ops per multiply-add) at `size`^3, each the
    best of the libraries that can do it here: bf16 with torch (oneDNN) and OpenVINO, int8 with ONNX Runtime's MLAS
    (u8s8 MatMulInteger, constant weights) and OpenVINO. What the bf16 and int8 paths are held to."""
    import importlib.util

    rng = np.random.default_rng(0)
    a = rng.uniform(0, 4, (size, size)).astype(np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    flops, share = 2.0 * size**3, budget_s / 4
    result: dict = {"reduced_size": size}
    result["onnxruntime_int8_gops"] = round(_best_rate(mlas_int8_gemm(size, threads), flops, share) / 1e9, 1)
    try:
        import torch

        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        ta, tb = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
        with torch.inference_mode():
            result["torch_bf16_gflops"] = round(_best_rate(lambda: ta @ tb, flops, share) / 1e9, 1)
        torch.set_num_threads(previous)
    except ImportError:
        pass
    if importlib.util.find_spec("openvino") is not None:
        result["openvino_bf16_gflops"] = round(_best_rate(_openvino_matmul(a, b, threads, False), flops, share)
                                               / 1e9, 1)
        result["openvino_int8_gops"] = round(_best_rate(_openvino_matmul(a, b, threads, True), flops, share) / 1e9, 1)
    bf16 = [v for k, v in result.items() if k.endswith("_bf16_gflops")]
    result["cpu_bf16_gflops"] = max(bf16) if bf16 else None
    result["cpu_int8_gops"] = max(v for k, v in result.items() if k.endswith("_int8_gops"))
    return result
