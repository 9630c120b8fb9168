"""The web page mounted on the Ray Serve app (`movq-deploy serve --ui`): served at /ui beside the HTTP API, over the
replica's batching service, and its samples are the library's (checked in headless Chromium when there is one)."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ray", reason="the serve extra is not installed (pip install -e .[serve])")
pytest.importorskip("gradio", reason="the ui extra (gradio) is not installed (pip install -e .[ui])")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed (pip install -e .[serve])")
from ray import serve  # noqa: E402

from movq_deploy.images import make_grid  # noqa: E402
from movq_deploy.serving.app import ScaleConfig, build_app  # noqa: E402
from movq_deploy.serving.service import ServiceConfig  # noqa: E402
from movq_deploy.ui.browser import PageDriver, find_chromium  # noqa: E402

TIMEOUT = 30.0


@pytest.fixture(scope="module")
def served(tiny_engines, serve_port):
    config = ServiceConfig(str(tiny_engines.engine_dir), backend="onnxruntime-cpu", request_timeout_s=TIMEOUT,
                           page=True)
    serve.run(build_app(config, ScaleConfig(replicas=1, num_cpus=0.5)), name="page", route_prefix="/page")
    yield f"http://127.0.0.1:{serve_port}/page"
    serve.delete("page")


def test_the_page_is_served_beside_the_api(served):
    config = httpx.get(f"{served}/ui/config", timeout=TIMEOUT)
    assert config.status_code == 200, config.text
    assert "Inpaint / outpaint" in config.text and "onnxruntime-cpu (fp32)" in config.text
    assert httpx.get(f"{served}/v1/info", timeout=TIMEOUT).json()["backend"] == "onnxruntime-cpu"


@pytest.mark.skipif(bool(find_chromium()[2]), reason=find_chromium()[2])
def test_the_served_page_samples_what_the_library_samples(served, tiny_generator):
    browser = PageDriver(f"{served}/ui/")
    try:
        browser.set_number("count", 3)
        browser.set_number("seed", 9)
        browser.click("sample")
        browser.wait_until(lambda: "seed 9" in browser.text("#sample-status"), "the sampling to finish")
        shown = browser.fetch_image(browser.image_sources("#grid")[0])
        assert np.array_equal(shown, np.asarray(make_grid(tiny_generator.sample(3, seed=9, output_type="np"))))
    finally:
        browser.close()
