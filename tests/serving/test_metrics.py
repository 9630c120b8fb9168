"""The replica's Prometheus metrics (metrics.py), scraped from Ray's metrics export on 127.0.0.1 as a Prometheus
server would, moving under load."""
from __future__ import annotations

import re
import time

import pytest

pytest.importorskip("ray", reason="the serve extra is not installed (pip install -e .[serve])")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed (pip install -e .[serve])")
from ray import serve  # noqa: E402

from movq_deploy.serving.app import ScaleConfig, build_app  # noqa: E402
from movq_deploy.serving.service import ServiceConfig  # noqa: E402

TIMEOUT = 30.0
SAMPLE = re.compile(r'^(ray_movq_\w+?)(?:\{(.*)\})? ([0-9.eE+-]+)$')


def _scrape(ray_address) -> "dict[tuple[str, str], float]":
    """{(name, reason or le or ""): value} of the movq metrics of this app, summed over the node's series."""
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    values = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=TIMEOUT).text.splitlines():
        match = SAMPLE.match(line)
        if not match or 'application="metered"' not in (match.group(2) or ""):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
        key = (match.group(1), labels.get("reason", labels.get("le", "")))
        values[key] = values.get(key, 0.0) + float(match.group(3))
    return values


def _wait_for(ray_address, condition, what: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout  # Ray's agents export every metrics_report_interval_ms (conftest: 1 s)
    while True:
        values = _scrape(ray_address)
        if condition(values):
            return values
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s; scraped {sorted(values)}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def metered(tiny_engines, serve_port):
    config = ServiceConfig(str(tiny_engines.engine_dir), backend="onnxruntime-cpu", request_timeout_s=TIMEOUT,
                           max_request_images=4)
    serve.run(build_app(config, ScaleConfig(replicas=1, num_cpus=0.5)), name="metered", route_prefix="/metered")
    yield f"http://127.0.0.1:{serve_port}/metered"
    serve.delete("metered")


def test_the_replica_s_metrics_move_under_load(metered, ray_address):
    def load(requests: int) -> None:
        for seed in range(requests):
            assert httpx.post(f"{metered}/v1/sample", json={"n": 2, "seed": seed, "steps": 3},
                              timeout=TIMEOUT).status_code == 200
        assert httpx.post(f"{metered}/v1/sample", json={"n": 99}, timeout=TIMEOUT).status_code == 400

    def served_and_refused(images: int, refused: int):
        return lambda v: (v.get(("ray_movq_images_served_total", ""), 0) >= images
                          and v.get(("ray_movq_requests_refused_total", "bad_request"), 0) >= refused)

    load(3)
    first = _wait_for(ray_address, served_and_refused(6, 1), "images served and a request refused")
    assert first[("ray_movq_prior_call_images_count", "")] >= 3 * 3  # at least one call per step of each request
    assert first[("ray_movq_prior_rows_total", "")] >= 3 * 3 * 2
    assert first[("ray_movq_prior_step_seconds_bucket", "+Inf")] == first[("ray_movq_prior_call_images_count", "")]
    assert first[("ray_movq_decode_seconds_count", "")] >= 1
    assert ("ray_movq_queue_images", "") in first and ("ray_movq_active_images", "") in first

    load(2)
    second = _wait_for(ray_address, lambda v: served_and_refused(6 + 4, 2)(v) and v.get(
        ("ray_movq_active_images", ""), 1) == 0, "more images served and refused, and the engine idle")
    for name in ("ray_movq_prior_call_images_count", "ray_movq_prior_step_seconds_count",
                 "ray_movq_decode_seconds_count", "ray_movq_prior_rows_total"):
        assert second[(name, "")] > first[(name, "")], name
    assert second[("ray_movq_active_images", "")] == 0  # idle again
