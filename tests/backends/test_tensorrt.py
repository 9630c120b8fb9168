"""The TensorRT backend.

Everywhere: the module imports without TensorRT, CUDA or torch; `tensorrt_usable` says why not; the TensorRT code
uses none of the APIs that TensorRT 10.0 / 11.0 removed (a static check).
Everywhere too: the bounded store of execution contexts (a plain dict with a capacity).
With TensorRT and a GPU: engines built from the tiny export (checked against ONNX Runtime through Polygraphy while
they are built), compared with ONNX Runtime again here; CUDA-graph replay equal to plain execution, with the
contexts bounded; Generator sample parity with the ONNX Runtime backend; mismatch refusals and the auto fallback.
(cuda-python on its own: tests/backends/test_cuda.py.)
"""
import ast
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from movq_deploy.backends import cuda
from movq_deploy.backends import tensorrt as trt_backend
from movq_deploy.export.engine_check import comparison_input
from movq_deploy.manifest import EngineDir

ROOT = Path(__file__).resolve().parents[2]
TENSORRT_SOURCES = [ROOT / "movq_deploy/backends/tensorrt.py", ROOT / "movq_deploy/backends/cuda.py",
                    ROOT / "movq_deploy/export/tensorrt_build.py", ROOT / "movq_deploy/engine_cache.py"]

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None


def _gpu():
    try:
        return cuda.cuda_gpu()
    except (ImportError, RuntimeError):
        return None


GPU = _gpu()
needs_tensorrt = pytest.mark.skipif(
    not (HAS_TENSORRT and GPU), reason="needs TensorRT and a CUDA GPU (pip install 'movq-deploy[gpu]' on a GPU machine)"
)


# ---- everywhere -------------------------------------------------------------------------------------------------
def test_module_imports_without_tensorrt_cuda_or_torch():
    code = (
        "import sys, movq_deploy.backends.tensorrt, movq_deploy.engine_cache; "
        "print(sorted(m for m in ('tensorrt', 'cuda', 'torch') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.skipif(HAS_TENSORRT, reason="TensorRT is installed here")
def test_tensorrt_usable_says_tensorrt_is_missing():
    usable, reason = trt_backend.tensorrt_usable({"engines": {}})
    assert not usable
    assert "TensorRT is not installed" in reason and "pip install 'movq-deploy[gpu]'" in reason and "\n" not in reason


def test_precision_outside_fp32_fp16_is_refused_before_touching_tensorrt():
    with pytest.raises(ValueError, match="fp32/fp16, not 'int8'"):
        trt_backend.resolve_precision({"engines": {}}, "int8")
    assert trt_backend.resolve_precision({"engines": {}}, "fp32") == "fp32"


def test_execution_contexts_are_bounded_to_the_most_recently_used():
    released = []
    store = trt_backend.LeastRecentlyUsed(2, on_evict=released.append)
    for key in (16, 4, 16, 7):  # a sample call's full chunks (16) and remainder (4), then an edit's 7
        assert store.get_or_create(key, lambda key=key: f"context {key}") == f"context {key}"
    assert store.keys() == [16, 7] and released == ["context 4"]
    store.clear()
    assert store.keys() == [] and released == ["context 4", "context 16", "context 7"]


# APIs removed in TensorRT 10.0 (implicit batch, bindings, execute v1/v2, build_engine, max_workspace_size) and in
# 11.0 (weak typing: precision builder flags, calibrators; device_memory_size without _v2), plus the old
# `from cuda import cudart` shim that cuda-bindings 13 dropped.
REMOVED_ATTRIBUTES = {
    "build_engine", "build_cuda_engine", "max_workspace_size", "max_batch_size", "execute", "execute_async",
    "execute_async_v2", "num_bindings", "binding_is_input", "set_binding_shape", "all_binding_shapes_specified",
    "device_memory_size", "EXPLICIT_BATCH", "int8_calibrator", "set_calibration_profile", "get_profile_shape",
}
REMOVED_BUILDER_FLAGS = {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "STRICT_TYPES", "OBEY_PRECISION_CONSTRAINTS",
                         "PREFER_PRECISION_CONSTRAINTS"}
REQUIRED_ATTRIBUTES = {
    "execute_async_v3", "set_input_shape", "set_tensor_address", "num_io_tensors", "get_tensor_name",
    "get_tensor_mode", "get_tensor_dtype", "get_tensor_shape", "get_tensor_profile_shape", "device_memory_size_v2",
    "deserialize_cuda_engine", "build_serialized_network", "set_memory_pool_limit", "create_optimization_profile",
    "parse_from_file", "create_timing_cache", "set_timing_cache", "STRONGLY_TYPED",
}


def removed_api_uses(source: str) -> "list[str]":
    """Uses of removed TensorRT/CUDA APIs in `source`: attribute names, identifier strings (getattr/hasattr),
    BuilderFlag members, `from cuda import cudart`, pycuda."""
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if node.attr in REMOVED_ATTRIBUTES or node.attr.startswith("get_binding"):
                found.append(node.attr)
            owner = node.value
            owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            if owner_name == "BuilderFlag" and node.attr in REMOVED_BUILDER_FLAGS:
                found.append(f"BuilderFlag.{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            if node.value in REMOVED_ATTRIBUTES or node.value.startswith("get_binding"):
                found.append(repr(node.value))
        elif isinstance(node, ast.ImportFrom) and node.module == "cuda" and any(a.name == "cudart" for a in node.names):
            found.append("from cuda import cudart")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [m for m in modules if m.split(".")[0] == "pycuda"]
    return found


def test_static_check_catches_removed_apis():
    planted = (
        "import pycuda.driver\nfrom cuda import cudart\n"
        "engine = builder.build_engine(network, config)\nconfig.max_workspace_size = 1\n"
        "config.set_flag(trt.BuilderFlag.FP16)\nctx.execute_async_v2(b, s)\nn = engine.num_bindings\n"
        "i = engine.get_binding_index('x')\nm = engine.device_memory_size\nok = hasattr(engine, 'device_memory_size')\n"
    )
    assert sorted(removed_api_uses(planted)) == sorted([
        "pycuda.driver", "from cuda import cudart", "build_engine", "max_workspace_size", "BuilderFlag.FP16",
        "execute_async_v2", "num_bindings", "get_binding_index", "device_memory_size", "'device_memory_size'",
    ])


@pytest.mark.parametrize("path", TENSORRT_SOURCES, ids=lambda p: p.name)
def test_tensorrt_code_uses_no_api_removed_in_10_or_11(path):
    assert removed_api_uses(path.read_text()) == []
    assert not re.search(r"BuilderFlag\.(FP16|INT8|BF16|FP8)\b", path.read_text())


def test_tensorrt_code_uses_the_10x_11x_api():
    """Guards the static check against passing vacuously: the current API is what the code calls."""
    used = set()
    for path in TENSORRT_SOURCES:
        used |= {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)}
    assert REQUIRED_ATTRIBUTES <= used, sorted(REQUIRED_ATTRIBUTES - used)


# ---- TensorRT on a GPU ------------------------------------------------------------------------------------------
PROFILE = (1, 2, 4)


@pytest.fixture(scope="module")
def trt_engine_dir(tiny_engines, tmp_path_factory):
    """tests/conftest.py's tiny checkpoint, exported here with fp16 graphs too (the shared engine dir is left
    untouched), with fp32 (TF32 off, for exact parity) and fp16 engines for batch 1..4."""
    from movq_deploy.export.pipeline import export_engine_dir
    from movq_deploy.export.tensorrt_build import BuildOptions, build_engines

    engine_dir = tmp_path_factory.mktemp("tensorrt") / "engines"
    export_engine_dir(tiny_engines.ckpt, engine_dir, steps=4, fp16=True, log=lambda line: None)
    for precision, tf32 in (("fp32", False), ("fp16", True)):
        options = BuildOptions(precision=precision, min_batch=PROFILE[0], opt_batch=PROFILE[1], max_batch=PROFILE[2],
                               workspace_gb=1.0, tf32=tf32)
        assert set(build_engines(engine_dir, options, log=lambda line: None).values()) == {"built"}
    return engine_dir


def _manifest(engine_dir) -> EngineDir:
    return EngineDir.load(engine_dir)


def _feeds(manifest: EngineDir, precision: str, graph: str, batch: int, seed: int = 0) -> dict:
    """Valid random inputs for `graph`, from its I/O specs in the manifest."""
    rng = np.random.default_rng(seed)
    return {spec["name"]: comparison_input(spec, batch, rng, manifest.codebook_size, manifest.num_classes)
            for spec in manifest.graph(precision, graph)["inputs"]}


def _onnxruntime(engine_dir, manifest, precision, graph, feeds):
    import onnxruntime as ort

    path = engine_dir / manifest.graphs[precision][graph]["file"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


@needs_tensorrt
def test_build_records_engines_and_skips_up_to_date_ones(trt_engine_dir):
    from movq_deploy.engine_cache import DEFAULT_OPT_LEVEL
    from movq_deploy.export import engine_check
    from movq_deploy.export.tensorrt_build import BuildOptions, build_engines

    manifest = _manifest(trt_engine_dir)
    platform = trt_backend.current_platform()
    assert manifest.graph_names == ("encoder", "decoder", "prior", "prior_guided")  # a class-conditional export
    for precision in ("fp32", "fp16"):
        for graph in manifest.graph_names:  # the guided prior is one more engine
            entry = manifest.engines[precision][graph]
            assert entry["tensorrt_version"] == platform.tensorrt_version and entry["gpu_name"] == platform.gpu_name
            assert entry["onnx_sha256"] == manifest.graphs[precision][graph]["sha256"]
            assert entry["profile"] == dict(zip(("min", "opt", "max"), PROFILE)) and entry["precision"] == precision
            assert entry["opt_level"] == DEFAULT_OPT_LEVEL and entry["workspace_bytes"] == 2**30
            assert engine_check.failures(precision, graph, entry["validation"]) == []  # the build-time check
    plan = trt_engine_dir / manifest.engines["fp16"]["prior"]["file"]
    mtime = plan.stat().st_mtime_ns
    options = BuildOptions(precision="fp16", min_batch=PROFILE[0], opt_batch=PROFILE[1], max_batch=PROFILE[2],
                           workspace_gb=1.0)
    assert set(build_engines(trt_engine_dir, options, log=lambda line: None).values()) == {"up to date"}
    assert plan.stat().st_mtime_ns == mtime
    usable, reason = trt_backend.tensorrt_usable(manifest)
    assert usable and "fp16/fp32 engines match" in reason


@needs_tensorrt
def test_each_graph_gets_its_own_opt_batch_by_default(trt_engine_dir, tmp_path):
    from movq_deploy.export.tensorrt_build import BuildOptions, build_engines

    copy = tmp_path / "engines"
    shutil.copytree(trt_engine_dir, copy)
    options = BuildOptions(precision="fp16", min_batch=1, max_batch=32, workspace_gb=1.0)  # opt_batch: per graph
    build_engines(copy, options, log=lambda line: None)
    engines = _manifest(copy).engines["fp16"]
    assert [engines[g]["profile"]["opt"] for g in ("encoder", "decoder", "prior")] == [16, 16, 32]


@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_match_onnxruntime(trt_engine_dir, precision):
    manifest = _manifest(trt_engine_dir)
    runners = trt_backend.open_tensorrt_runners(manifest, precision)
    exact = precision == "fp32"  # TF32 off: only summation order differs
    for graph, runner in runners.items():
        assert runner.max_batch == PROFILE[2]
        feeds = _feeds(manifest, precision, graph, batch=3)
        got, want = runner.run(feeds), _onnxruntime(trt_engine_dir, manifest, precision, graph, feeds)
        assert set(got) == set(want)
        if graph == "encoder":
            assert (got["indices"] == want["indices"]).mean() >= (0.99 if exact else 0.9)
        elif graph == "decoder":
            diff = np.abs(got["image"].astype(int) - want["image"].astype(int))
            assert diff.max() <= (2 if exact else 16) and diff.mean() <= (0.05 if exact else 1.0)
        else:
            same = got["sampled"] == want["sampled"]
            assert same.mean() >= (0.99 if exact else 0.9)
            known = feeds["tokens"] != manifest.mask_id
            assert np.all(np.isposinf(got["confidence"][known])) and np.all(got["sampled"][known] == feeds["tokens"][known])
            both = same & ~known
            np.testing.assert_allclose(got["confidence"][both], want["confidence"][both], atol=1e-3 if exact else 5e-2)


@needs_tensorrt
def test_cuda_graph_replay_equals_plain_execution(trt_engine_dir, monkeypatch):
    monkeypatch.setattr(trt_backend, "MAX_CONTEXTS", 2)  # three batch sizes below: one context is released
    manifest = _manifest(trt_engine_dir)
    entry = manifest.engines["fp32"]["prior"]
    plan = trt_engine_dir / entry["file"]
    with trt_backend.TensorRTRunner(plan, entry=entry, cuda_graphs=False) as plain, \
            trt_backend.TensorRTRunner(plan, entry=entry, cuda_graphs=True) as replay:
        for call in range(3):  # call 0 warms up, call 1 captures, call 2 replays; batch sizes interleaved
            for batch in (2, 3, 1):
                feeds = _feeds(manifest, "fp32", "prior", batch, seed=10 * call + batch)
                a, b = plain.run(feeds), replay.run(feeds)
                np.testing.assert_array_equal(a["sampled"], b["sampled"])
                np.testing.assert_array_equal(a["confidence"], b["confidence"])
        assert replay.cuda_graphs  # no capture failed
        assert len(replay._states.keys()) == 2 and len(plain._states.keys()) == 1


@needs_tensorrt
def test_generator_sample_parity_with_onnxruntime(trt_engine_dir):
    from movq_deploy import Generator

    tensorrt = Generator(trt_engine_dir, backend="tensorrt", precision="fp32")
    onnxruntime = Generator(trt_engine_dir, backend="onnxruntime-cpu", precision="fp32")
    assert tensorrt.backend_name == "tensorrt" and Generator(trt_engine_dir).backend_name == "tensorrt"
    num_classes = _manifest(trt_engine_dir).num_classes
    labels = [i % num_classes for i in range(6)] if num_classes else None
    a = tensorrt.sample_tokens(n=6, steps=4, seed=0, class_labels=labels)  # 6 > max batch 4: chunked
    b = onnxruntime.sample_tokens(n=6, steps=4, seed=0, class_labels=labels)
    assert a.shape == b.shape and (a == b).mean() >= 0.99


@needs_tensorrt
def test_mismatched_or_altered_engines_are_refused(trt_engine_dir, tmp_path):
    from movq_deploy import Generator

    copy = tmp_path / "engines"
    shutil.copytree(trt_engine_dir, copy)
    manifest = _manifest(copy)
    manifest.engines["fp16"]["decoder"]["tensorrt_version"] = "9.9.9"
    with pytest.raises(ValueError, match=r"built with TensorRT 9\.9\.9 but this is TensorRT"):
        trt_backend.open_tensorrt_runners(manifest, "fp16")
    assert trt_backend.tensorrt_usable(manifest, "fp16")[0] is False
    manifest = _manifest(copy)
    manifest.graphs["fp32"]["decoder"]["sha256"] = "0" * 64  # the manifest now lists another decoder graph
    with pytest.raises(ValueError, match="built from another ONNX graph"):
        trt_backend.open_tensorrt_runners(manifest, "fp32")
    manifest = _manifest(copy)
    (copy / manifest.engines["fp32"]["prior"]["file"]).write_bytes(b"tampered")
    with pytest.raises(ValueError, match=r"does not match its sha256.*rebuild it with `python export/build_trt.py`"):
        trt_backend.open_tensorrt_runners(manifest, "fp32")
    (copy / manifest.engines["fp16"]["prior"]["file"]).write_bytes(b"tampered")
    with Generator(copy) as generator:  # auto: the altered plans fall back to ONNX Runtime, saying why
        assert generator.backend_name.startswith("onnxruntime")
        assert "did not open" in generator.backend_reason and "sha256" in generator.backend_reason
    with pytest.raises(ValueError, match="sha256"):
        Generator(copy, backend="tensorrt")


@needs_tensorrt
def test_runner_checks_its_inputs(trt_engine_dir):
    manifest = _manifest(trt_engine_dir)
    runner = trt_backend.open_tensorrt_runners(manifest, "fp32")["decoder"]
    with pytest.raises(ValueError, match="outside the engine's profile"):
        runner.run(_feeds(manifest, "fp32", "decoder", batch=PROFILE[2] + 1))
    feeds = _feeds(manifest, "fp32", "decoder", batch=1)
    with pytest.raises(ValueError, match="must be int32"):
        runner.run({"indices": feeds["indices"].astype(np.int64)})
