"""The wheel as a user installs it: built with `python -m build`, installed with only the `cpu` extra into a fresh
virtual environment, `movq-deploy info` and `movq-deploy sample` on an engine directory; torch is neither installed
nor imported. Needs the package index (PyPI) for the wheel's dependencies, as CI has."""
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(argv, **kwargs):
    result = subprocess.run(argv, capture_output=True, text=True, timeout=900, **kwargs)
    assert result.returncode == 0, f"{' '.join(map(str, argv))}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("build", reason="the build package is not installed (pip install 'movq-deploy[dev]')")
    # from a copy of the sources: setuptools builds in the project's own build/, which the checkout keeps clean of
    source = tmp_path_factory.mktemp("source") / "movq-deploy"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache"))
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(out), str(source)])
    (found,) = out.glob("movq_deploy-*.whl")
    return found


def test_the_wheel_with_the_cpu_extra_samples_without_torch(wheel, tiny_engines, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python, cli = env_dir / "bin" / "python", env_dir / "bin" / "movq-deploy"
    _run([str(python), "-m", "pip", "install", "-q", f"{wheel}[cpu]"])
    installed = _run([str(python), "-m", "pip", "list", "--format", "freeze"]).lower()
    assert "movq-deploy==" in installed and "onnxruntime==" in installed
    assert "torch" not in installed and "openvino" not in installed  # only the runtime: numpy, pillow, onnxruntime
    outside = {"cwd": tmp_path}  # not the checkout: the installed package, not the sources
    info = _run([str(cli), "info", "--engine-dir", str(tiny_engines.engine_dir)], **outside)
    assert "onnxruntime-cpu" in info
    _run([str(cli), "sample", "--engine-dir", str(tiny_engines.engine_dir), "-n", "2", "--seed", "0",
          "--out", str(tmp_path / "samples.png")], **outside)
    assert (tmp_path / "samples.png").stat().st_size > 0
    # the same sampling in one interpreter, watching what it imports
    script = (f"import sys, movq_deploy; g = movq_deploy.Generator({str(tiny_engines.engine_dir)!r}); "
              f"g.sample(n=1, seed=0); print(movq_deploy.__file__); "
              f"print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'openvino')))")
    lines = _run([str(python), "-c", script], **outside).splitlines()
    assert lines[-2].startswith(str(env_dir)) and lines[-1] == "[]"
