"""The backend interface on ONNX Runtime: runner specs, session settings, the backend choice, hash checks."""
from __future__ import annotations

import os
import shutil
import sys
import threading
import types

import numpy as np
import onnxruntime as ort
import pytest

from movq_deploy import contract
from movq_deploy.backends import TensorSpec, open_runners
from movq_deploy.backends import onnxruntime as ort_backend
from movq_deploy.manifest import EngineDir


def _tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def cpu_backend(tiny_engines):
    return open_runners(EngineDir.load(tiny_engines.engine_dir), backend="onnxruntime-cpu")


def _prior_feeds(engine_dir: EngineDir, batch, seed=0, temperature=1.0, choice_scale=2.0):
    rng = np.random.default_rng(seed)
    slots = engine_dir.grid.num_slots
    return contract.prior_step_feeds(
        rng.integers(0, engine_dir.mask_id + 1, (batch, slots)), rng.integers(0, engine_dir.num_classes + 1, batch),
        rng.random((batch, slots), dtype=np.float32), rng.gumbel(size=(batch, slots)), temperature, choice_scale)


def test_runner_specs_name_the_graph_io(cpu_backend, tiny_engines):
    manifest = EngineDir.load(tiny_engines.engine_dir)
    size, (h, w, c) = manifest.image_size, manifest.grid.shape
    encoder, decoder, prior = (cpu_backend.runners[name] for name in ("encoder", "decoder", "prior"))
    assert encoder.inputs == [TensorSpec("image", "uint8", ("batch", size, size, 3))]
    assert encoder.outputs == [TensorSpec("indices", "int32", ("batch", h, w, c))]
    assert decoder.inputs == [TensorSpec("indices", "int32", ("batch", h, w, c))]
    assert decoder.outputs == [TensorSpec("image", "uint8", ("batch", size, size, 3))]
    assert [spec.name for spec in prior.inputs] == ["tokens", "class_labels", "uniform", "gumbel", "temperature",
                                                    "choice_scale"]
    assert [(spec.name, spec.dtype) for spec in prior.outputs] == [("sampled", "int32"), ("confidence", "float32")]
    assert all(runner.max_batch is None for runner in cpu_backend.runners.values())


def test_prior_runner_keeps_known_tokens(cpu_backend, tiny_engines):
    manifest = EngineDir.load(tiny_engines.engine_dir)
    feeds = _prior_feeds(manifest, 3)
    out = cpu_backend.runners["prior"].run(feeds)
    known = feeds["tokens"] != manifest.mask_id
    assert out["sampled"].dtype == np.int32 and out["sampled"].shape == feeds["tokens"].shape
    assert np.array_equal(out["sampled"][known], feeds["tokens"][known])
    assert np.isposinf(out["confidence"][known]).all() and np.isfinite(out["confidence"][~known]).all()


def test_per_image_temperature_and_choice_scale_equal_one_value_per_call(cpu_backend, tiny_engines):
    """Images of different requests share a prior call: row i with its own temperature and choice scale is, bit
    for bit, row i of a call where every image has them."""
    engine_dir = EngineDir.load(tiny_engines.engine_dir)
    prior = cpu_backend.runners["prior"]
    temperatures, scales = np.array([1.0, 0.5, 2.0, 0.9]), np.array([3.9375, 0.0, 1.25, 2.0])
    mixed = prior.run(_prior_feeds(engine_dir, 4, seed=5, temperature=temperatures, choice_scale=scales))
    for i in range(4):
        same = prior.run(_prior_feeds(engine_dir, 4, seed=5, temperature=temperatures[i], choice_scale=scales[i]))
        np.testing.assert_array_equal(mixed["sampled"][i], same["sampled"][i])
        np.testing.assert_array_equal(mixed["confidence"][i], same["confidence"][i])
    cold = prior.run(_prior_feeds(engine_dir, 4, seed=5, temperature=1e-4, choice_scale=scales))
    assert not np.array_equal(cold["sampled"], mixed["sampled"])  # the temperature reaches the draw


def test_concurrent_runs_on_one_session_agree(cpu_backend, tiny_engines):
    manifest = EngineDir.load(tiny_engines.engine_dir)
    feeds = [_prior_feeds(manifest, 4, seed) for seed in range(8)]
    prior = cpu_backend.runners["prior"]
    serial = [prior.run(f)["sampled"] for f in feeds]
    results = [None] * 8
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, prior.run(feeds[i])["sampled"]))
               for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(np.array_equal(a, b) for a, b in zip(results, serial))


def test_cpu_session_settings(cpu_backend):
    options = cpu_backend.runners["prior"].session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.intra_op_num_threads == ort_backend.physical_cores()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert 1 <= ort_backend.physical_cores() <= len(os.sched_getaffinity(0))
    assert cpu_backend.runners["prior"].session.get_providers() == ["CPUExecutionProvider"]


def test_precision_picks_the_graphs(tiny_engines):
    manifest = EngineDir.load(tiny_engines.engine_dir)
    fp32 = manifest.graph_entries("fp32")
    int8 = manifest.graph_entries("int8")
    assert [fp32[name]["file"] for name in ("encoder", "decoder", "prior")] == [
        "encoder.onnx", "decoder.onnx", "prior.onnx"]
    assert [int8[name]["file"] for name in ("encoder", "decoder", "prior")] == [
        "encoder.int8.onnx", "decoder.int8.onnx", "prior.int8.onnx"]
    with pytest.raises(FileNotFoundError, match="no fp16 encoder graph"):
        manifest.graph_entries("fp16")


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(backend="tensorflow"), ValueError, "backend must be one of"),
    (dict(precision="fp8"), ValueError, "precision must be one of"),
])
def test_bad_backend_arguments(tiny_engines, kwargs, error, words):
    with pytest.raises(error, match=words):
        open_runners(EngineDir.load(tiny_engines.engine_dir), **kwargs)


def _fake_tensorrt(monkeypatch, usable, reason):
    """Stands in for movq_deploy.backends.tensorrt , to test the choice without a GPU."""
    opened = {}
    fake = types.ModuleType("movq_deploy.backends.tensorrt")
    fake.tensorrt_usable = lambda engine_dir, precision="auto": (usable, reason)
    fake.resolve_precision = lambda engine_dir, precision="auto": "fp16" if precision == "auto" else precision
    fake.open_tensorrt_runners = lambda engine_dir, precision: opened.setdefault(
        precision, {"encoder": "E", "decoder": "D", "prior": "P"})
    monkeypatch.setitem(sys.modules, "movq_deploy.backends.tensorrt", fake)
    return opened


def test_auto_prefers_usable_tensorrt_engines_in_fp16(tiny_engines, monkeypatch, caplog):
    opened = _fake_tensorrt(monkeypatch, True, "fp16 engines built for this GPU")
    with caplog.at_level("INFO", logger="movq_deploy"):
        backend = open_runners(EngineDir.load(tiny_engines.engine_dir))
    assert (backend.name, backend.precision, list(opened)) == ("tensorrt", "fp16", ["fp16"])
    assert "fp16 engines built for this GPU" in backend.reason
    assert [r.getMessage() for r in caplog.records if r.name == "movq_deploy"] == [
        "movq-deploy backend: tensorrt (fp16) - TensorRT engines usable: fp16 engines built for this GPU"]


@pytest.mark.skipif(ort_backend.cuda_available(), reason="this onnxruntime has the CUDA provider")
def test_auto_falls_back_to_onnxruntime_and_says_why(tiny_engines, monkeypatch):
    opened = _fake_tensorrt(monkeypatch, False, "the manifest has no TensorRT engines")
    backend = open_runners(EngineDir.load(tiny_engines.engine_dir), precision="int8")
    assert (backend.name, backend.precision, opened) == ("onnxruntime-cpu", "int8", {})
    assert "the manifest has no TensorRT engines" in backend.reason and "CUDAExecutionProvider" in backend.reason
    assert backend.runners["prior"].path.name == "prior.int8.onnx"


@pytest.mark.skipif(ort_backend.cuda_available(), reason="this onnxruntime has the CUDA provider")
def test_onnxruntime_cuda_refused_without_the_cuda_provider(tiny_engines):
    with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
        open_runners(EngineDir.load(tiny_engines.engine_dir), backend="onnxruntime-cuda")


def test_auto_falls_back_when_usable_engines_fail_to_open(tiny_engines, monkeypatch):
    """Engines that match this machine but do not open (a plan missing, altered, undeserializable): auto runs
    ONNX Runtime and says why; backend="tensorrt" raises the error itself."""
    _fake_tensorrt(monkeypatch, True, "fp16 engines match")

    def fail(engine_dir, precision):
        raise ValueError("prior.fp16.plan does not match its sha256 in manifest.json: rebuild it")

    sys.modules["movq_deploy.backends.tensorrt"].open_tensorrt_runners = fail
    engine_dir = EngineDir.load(tiny_engines.engine_dir)
    backend = open_runners(engine_dir, backend="auto")
    assert backend.name.startswith("onnxruntime")
    assert "TensorRT not used (its engines did not open: prior.fp16.plan does not match" in backend.reason
    with pytest.raises(ValueError, match="prior.fp16.plan does not match"):
        open_runners(engine_dir, backend="tensorrt")


@pytest.mark.skipif(ort_backend.cuda_available(), reason="this onnxruntime has the CUDA provider")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_a_cuda_session_that_runs_on_the_cpu_is_refused(tiny_engines):
    """The CPU onnxruntime here creates a session asked for CUDA and silently runs it on the CPU: exactly the case
    of a GPU wheel whose CUDA libraries fail to load. The runner checks get_providers() and refuses it."""
    engine_dir = EngineDir.load(tiny_engines.engine_dir)
    path = engine_dir.verify(engine_dir.graph("fp32", "decoder"))
    with pytest.raises(ort_backend.CudaProviderUnavailable,
                       match=r"CUDA provider did not start for decoder.onnx \(the session runs on CPUExecutionProvider"):
        ort_backend.OnnxRuntimeRunner(path, device="cuda")


@pytest.mark.skipif(ort_backend.cuda_available(), reason="this onnxruntime has the CUDA provider")
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
def test_a_cuda_provider_that_does_not_start_falls_back_or_fails_in_one_line(tiny_engines, monkeypatch):
    """As a GPU wheel on a machine whose CUDA does not load: the provider is listed but does not start."""
    monkeypatch.setattr(ort_backend, "cuda_available", lambda: True)  # what get_available_providers() would claim
    engine_dir = EngineDir.load(tiny_engines.engine_dir)
    backend = open_runners(engine_dir, backend="auto")
    assert backend.name == "onnxruntime-cpu"
    assert "ONNX Runtime CUDA not used (ONNX Runtime's CUDA provider did not start" in backend.reason
    assert all(r.session.get_providers() == ["CPUExecutionProvider"] and not r.io_binding
               for r in backend.runners.values())
    with pytest.raises(RuntimeError, match=r"^backend 'onnxruntime-cuda' is not usable here: ONNX Runtime's CUDA "
                                           r"provider did not start") as error:
        open_runners(engine_dir, backend="onnxruntime-cuda")
    assert "\n" not in str(error.value)


@pytest.mark.skipif(_tensorrt_importable(), reason="TensorRT is installed here")
def test_tensorrt_refused_without_tensorrt(tiny_engines):
    with pytest.raises(RuntimeError, match="not usable here"):
        open_runners(EngineDir.load(tiny_engines.engine_dir), backend="tensorrt")


def test_files_are_verified_before_loading(tiny_engines, tmp_path):
    engine_dir = tmp_path / "engines"
    shutil.copytree(tiny_engines.engine_dir, engine_dir)
    manifest = EngineDir.load(engine_dir)
    data = bytearray((engine_dir / "prior.onnx").read_bytes())
    data[-1] ^= 1  # one flipped bit: still loadable by ONNX Runtime, but not the exported graph
    (engine_dir / "prior.onnx").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="prior.onnx"):
        open_runners(manifest, backend="onnxruntime-cpu")


@pytest.mark.skipif(not ort_backend.cuda_available(), reason="needs onnxruntime-gpu and a CUDA GPU")
def test_cuda_runner_matches_cpu(cpu_backend, tiny_engines):
    manifest = EngineDir.load(tiny_engines.engine_dir)
    cuda = open_runners(manifest, backend="onnxruntime-cuda")
    assert cuda.name == "onnxruntime-cuda" and "CUDAExecutionProvider is in use" in cuda.reason
    assert all(r.session.get_providers()[0] == "CUDAExecutionProvider" and r.io_binding for r in cuda.runners.values())
    feeds = _prior_feeds(manifest, 4)
    ours, theirs = cuda.runners["prior"].run(feeds), cpu_backend.runners["prior"].run(feeds)
    assert (ours["sampled"] == theirs["sampled"]).mean() > 0.99
