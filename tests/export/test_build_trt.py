"""export/build_trt.py and movq_deploy/export/tensorrt_build.py: clean failure without TensorRT / a GPU, argument
checks, per-graph profiles, and (with TensorRT) parser errors.

The engine-building path itself is exercised by tests/backends/test_tensorrt.py where TensorRT and a GPU exist.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from export.build_trt import main
from movq_deploy.engine_cache import BatchProfile
from movq_deploy.export.tensorrt_build import BuildOptions, build_serialized_engine

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "export" / "build_trt.py"


def _environment_problem():
    """What build_trt.py must report on this machine, or None where TensorRT and a GPU are both present."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed"
    try:
        from movq_deploy.backends.cuda import cuda_gpu

        cuda_gpu()
    except ImportError:
        return "cuda-python is not installed"
    except RuntimeError:
        return "no CUDA GPU is available"
    return None


PROBLEM = _environment_problem()
needs_trt = pytest.mark.skipif(PROBLEM is not None, reason=f"needs TensorRT and a CUDA GPU ({PROBLEM})")


def _snapshot(directory: Path) -> dict:
    """Every file under `directory` (hidden ones too) with its bytes and modification time."""
    return {
        str(path.relative_to(directory)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _run(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.skipif(PROBLEM is None, reason="TensorRT and a GPU are present: the real build tests run instead")
def test_without_tensorrt_or_gpu_it_fails_in_one_line_and_writes_nothing(tmp_path, make_engine_dir):
    engine_dir = tmp_path / "engines"
    engine_dir.mkdir()
    (engine_dir / "prior.fp16.onnx").write_bytes(b"not really onnx")
    make_engine_dir(engine_dir, graphs={"fp16": {"prior": {"file": "prior.fp16.onnx", "sha256": "0" * 64}}}).write()
    before = _snapshot(engine_dir)

    result = _run("--engine-dir", str(engine_dir), "--fp16", "--timing-cache", str(tmp_path / "timing.cache"))

    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("build_trt.py: ") and PROBLEM in lines[0], result.stderr
    assert _snapshot(engine_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]  # no timing cache either


def test_missing_engine_dir_fails_and_is_not_created(tmp_path):
    result = _run("--engine-dir", str(tmp_path / "nope"), "--fp16")
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nope").exists()


def test_bad_batch_profile_is_a_one_line_error(capsys):
    assert main(["--min-batch", "8", "--opt-batch", "8", "--max-batch", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "min <= opt <= max" in err


def test_each_graph_is_tuned_for_the_batch_the_generator_calls_it_with():
    from movq_deploy.generator import DEFAULT_IMAGE_BATCH, DEFAULT_PRIOR_BATCH

    options = BuildOptions(min_batch=1, max_batch=64)
    assert [options.profile(g).opt for g in ("encoder", "decoder", "prior")] == [
        DEFAULT_IMAGE_BATCH, DEFAULT_IMAGE_BATCH, DEFAULT_PRIOR_BATCH]
    assert BuildOptions(min_batch=1, max_batch=8).profile("prior") == BatchProfile(1, 8, 8)  # clamped to the range
    assert BuildOptions(min_batch=32, max_batch=64).profile("decoder") == BatchProfile(32, 32, 64)
    assert BuildOptions(opt_batch=4).profile("prior").opt == 4  # --opt-batch: the same for every graph
    assert BuildOptions(workspace_gb=0.5).workspace_bytes == 1 << 29


@needs_trt
def test_parser_error_names_the_failing_node(tmp_path):
    """An op TensorRT cannot parse (Multinomial) must be reported with the node's name and op type."""
    import onnx
    import tensorrt as trt
    from onnx import TensorProto, helper

    node = helper.make_node("Multinomial", ["logits"], ["draw"], name="the_bad_sampler", sample_size=1)
    graph = helper.make_graph(
        [node], "bad",
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("draw", TensorProto.INT32, [2, 1])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    with pytest.raises(ValueError, match="the_bad_sampler") as error:
        build_serialized_engine(trt, path, BuildOptions(precision="fp32", workspace_gb=0.25), BatchProfile(1, 1, 2),
                                b"", log=lambda s: None)
    assert "Multinomial" in str(error.value) and "\n" not in str(error.value)
