"""`movq-deploy serve --no-ray`: the same API in one process under uvicorn, started as a user starts it."""
from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip("httpx", reason="the serve extra is not installed (pip install -e .[serve])")
pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install -e .[serve])")

KEY = "k3y"


def test_the_server_without_ray_answers_the_library_s_images(tiny_engines, tiny_generator):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MOVQ_API_KEY": KEY}
    server = subprocess.Popen([sys.executable, "-m", "movq_deploy.cli", "serve", "--no-ray", "--engine-dir",
                               str(tiny_engines.engine_dir), "--backend", "onnxruntime-cpu", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read().decode()
            try:
                if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not come up within 120 s"
            time.sleep(0.2)
        body = {"n": 1, "seed": 3, "steps": 3, "class_labels": 1, "format": "png"}
        assert httpx.post(f"{url}/v1/sample", json=body, timeout=30).status_code == 401
        response = httpx.post(f"{url}/v1/sample", json=body, timeout=30, headers={"Authorization": f"Bearer {KEY}"})
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        want = tiny_generator.sample(n=1, seed=3, steps=3, class_labels=1, output_type="np")[0]
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(response.content))), want)
        bad = httpx.post(f"{url}/v1/sample", json={"n": 0}, timeout=30, headers={"Authorization": f"Bearer {KEY}"})
        assert bad.status_code == 400 and "n must be" in bad.json()["detail"]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
