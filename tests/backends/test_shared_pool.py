"""The opt-in process-wide ONNX Runtime thread pool: same images, one size per process. Each case runs in its own
Python process, because the pool is a setting of the whole process."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np


def _run(code: str, tmp_path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))


def test_shared_pool_gives_the_same_images_and_refuses_a_second_size(tiny_engines, tiny_generator, tmp_path):
    out = tmp_path / "shared.npy"
    result = _run(f"""
        import numpy as np
        from movq_deploy.generator import Generator
        gen = Generator({str(tiny_engines.engine_dir)!r}, backend="onnxruntime-cpu", threads=2, shared_pool=True)
        np.save({str(out)!r}, gen.sample(n=3, steps=4, seed=5, output_type="np"))
        Generator({str(tiny_engines.engine_dir)!r}, backend="onnxruntime-cpu", threads=2, shared_pool=True)  # same
        try:
            Generator({str(tiny_engines.engine_dir)!r}, backend="onnxruntime-cpu", threads=1, shared_pool=True)
        except ValueError as error:
            print("refused:", error)
    """, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "refused: this process's shared ONNX Runtime thread pool already has 2 threads" in result.stdout
    assert np.array_equal(np.load(out), tiny_generator.sample(n=3, steps=4, seed=5, output_type="np"))
