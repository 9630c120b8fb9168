"""The HTTP API on its own (FastAPI under Starlette's test client, no Ray): answers, bad requests, overload."""
from __future__ import annotations

import base64
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e .[serve])")
from fastapi.testclient import TestClient  # noqa: E402

from movq_deploy.serving.api import build_api  # noqa: E402
from movq_deploy.serving.scheduler import EngineMetrics  # noqa: E402
from movq_deploy.serving.service import ImageService, ServiceConfig  # noqa: E402


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _decoded(payload: dict) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(text)))) for text in payload["images"]])


@pytest.fixture(scope="module")
def client(tiny_engines):
    config = ServiceConfig(str(tiny_engines.engine_dir), backend="onnxruntime-cpu", max_request_images=4,
                           max_body_bytes=64 * 1024, request_timeout_s=60)
    service = ImageService(config)
    with TestClient(build_api(service), raise_server_exceptions=False) as client:
        yield client
    service.close()


def test_sample_equals_the_library(client, tiny_generator):
    response = client.post("/v1/sample", json={"n": 3, "seed": 5, "steps": 3, "class_labels": [0, "blue", None],
                                               "temperature": [0.9, 0.9, 0.9]})
    assert response.status_code == 200, response.text
    assert response.json()["seed"] == 5
    want = tiny_generator.sample(n=3, seed=5, steps=3, class_labels=[0, "blue", None], temperature=0.9,
                                 output_type="np")
    assert np.array_equal(_decoded(response.json()), want)

    png = client.post("/v1/sample", json={"n": 1, "seed": 5, "steps": 3, "class_labels": 0, "format": "png",
                                          "temperature": 0.9})
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.headers["x-seed"] == "5"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.content))), want[0])


def test_edit_equals_the_library(client, tiny_generator):
    size = tiny_generator.image_size
    image = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[:, size // 2:] = 255
    response = client.post("/v1/edit", files={"image": ("in.png", _png(image)), "mask": ("m.png", _png(mask))},
                           data={"seed": "3", "steps": "3", "n": "2", "class_label": "1"})
    assert response.status_code == 200, response.text
    want = tiny_generator.edit([image] * 2, [mask > 127] * 2, seed=3, steps=3, class_labels=1, output_type="np")
    assert np.array_equal(_decoded(response.json()), want)


def test_guided_sample_and_edit_equal_the_library(client, tiny_generator):
    response = client.post("/v1/sample", json={"n": 2, "seed": 6, "steps": 3, "class_labels": [0, 1],
                                               "guidance_scale": [0, 3.5]})
    assert response.status_code == 200, response.text
    want = tiny_generator.sample(n=2, seed=6, steps=3, class_labels=[0, 1], guidance_scale=[0, 3.5],
                                 output_type="np")
    assert np.array_equal(_decoded(response.json()), want)
    size = tiny_generator.image_size
    image = np.random.default_rng(2).integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.full((size, size), 255, dtype=np.uint8)
    response = client.post("/v1/edit", files={"image": ("in.png", _png(image)), "mask": ("m.png", _png(mask))},
                           data={"seed": "3", "steps": "3", "class_label": "2", "guidance_scale": "2.5"})
    assert response.status_code == 200, response.text
    want = tiny_generator.edit([image], [mask > 127], seed=3, steps=3, class_labels=2, guidance_scale=2.5,
                               output_type="np")
    assert np.array_equal(_decoded(response.json()), want)
    bad = client.post("/v1/edit", files={"image": ("in.png", _png(image)), "mask": ("m.png", _png(mask))},
                      data={"seed": "3", "guidance_scale": "-2"})
    assert bad.status_code == 400 and "guidance_scale must be >= 0" in bad.json()["detail"]


def test_info_and_health(client, tiny_engines):
    info = client.get("/v1/info").json()
    assert info["class_names"] == tiny_engines.class_names and info["backend"] == "onnxruntime-cpu"
    assert info["batching"] == "continuous" and set(info["grid"]) == {"h", "w", "c"}
    assert info["guidance"] is True  # a class-conditional export: guidance_scale may be other than 0
    assert client.get("/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize("body, status, detail", [
    (b"{not json", 422, "malformed JSON"),
    (b'{"n": 0}', 400, r"n must be an int in [1, 4]"),
    (b'{"n": 5}', 400, r"n must be an int in [1, 4]"),
    (b'{"n": "two"}', 422, "n:"),
    (b'{"class_labels": "purple"}', 400, "unknown class name 'purple'"),
    (b'{"class_labels": 7}', 400, "out of range"),
    (b'{"steps": -1}', 400, "steps must be a positive int"),
    (b'{"guidance_scale": -1}', 400, "guidance_scale must be >= 0"),
    (b'{"n": 2, "guidance_scale": [1, 2, 3]}', 400, "guidance_scale must be one number or 2 (one per image)"),
    (b'{"guidance_scale": "strong"}', 422, "guidance_scale"),
    (b'{"n": 2, "format": "png"}', 400, "format 'png' returns one image"),
    (b'{"path": "/etc/passwd"}', 422, "path: Extra inputs are not permitted"),
    (b'{"n": 1, "pad": "' + b"x" * 70000 + b'"}', 413, "larger than 65536 bytes"),
])
def test_bad_sample_requests_get_a_4xx_with_one_line(client, body, status, detail):
    response = client.post("/v1/sample", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"] and "\n" not in response.json()["detail"]


def test_bad_edit_uploads_get_a_4xx(client, tiny_generator):
    size = tiny_generator.image_size
    good = _png(np.zeros((size, size, 3), np.uint8))
    mask = _png(np.full((size, size), 255, np.uint8))
    cases = [
        ({"image": ("x.png", _png(np.zeros((size, size + 8, 3), np.uint8))), "mask": ("m.png", mask)},
         400, f"pixels; this model takes {size}x{size}"),
        ({"image": ("x.txt", b"hello, not an image"), "mask": ("m.png", mask)}, 400, "not a readable image"),
        ({"image": ("x.png", good)}, 422, "mask"),
        ({"image": ("x.png", good), "mask": ("m.png", b"\x89PNG" + b"\0" * 70000)}, 413, "larger than"),
    ]
    for files, status, detail in cases:
        response = client.post("/v1/edit", files=files, data={"seed": "1"})
        assert response.status_code == status, (detail, response.text)
        assert detail in response.json()["detail"]
    # Still serving after all of the above.
    assert client.post("/v1/sample", json={"n": 1, "steps": 1}).status_code == 200


class CountingMetrics(EngineMetrics):
    def __init__(self):
        self.refusals = []

    def refused(self, reason: str) -> None:
        self.refusals.append(reason)


def _held(service: ImageService) -> threading.Event:
    """The engine is busy in its prior call until the returned event is set."""
    runner = service.generator.backend.runners["prior"]
    real_run, release = runner.run, threading.Event()

    def held_run(feeds):
        release.wait(60)
        return real_run(feeds)

    runner.run = held_run
    return release


def test_overload_gets_503_with_retry_after(tiny_engines):
    config = ServiceConfig(str(tiny_engines.engine_dir), backend="onnxruntime-cpu", capacity=1,
                           max_request_images=2, max_queued_images=2)
    metrics = CountingMetrics()
    service = ImageService(config, metrics)
    release = _held(service)
    try:
        with TestClient(build_api(service), raise_server_exceptions=False) as client:
            busy = service.scheduler.submit_sample(n=2, steps=1)  # 1 image in the engine, 1 queued
            deadline = time.monotonic() + 60
            while service.scheduler.stats()["active_images"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            response = client.post("/v1/sample", json={"n": 2})  # 1 + 2 > 2 queued images
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1" and "overloaded" in response.json()["detail"]
            assert client.post("/v1/sample", content=b"{oops").status_code == 422
            release.set()
            busy.future.result(60)
            assert client.post("/v1/sample", json={"n": 2, "steps": 1}).status_code == 200
        assert metrics.refusals == ["overload", "bad_request"]
    finally:
        release.set()
        service.close()


def test_a_request_over_the_deadline_gets_503_with_the_estimated_retry_after(tiny_engines):
    config = ServiceConfig(str(tiny_engines.engine_dir), backend="onnxruntime-cpu", capacity=1,
                           max_request_images=3, max_queue_wait_s=12.0)
    metrics = CountingMetrics()
    service = ImageService(config, metrics)
    service.scheduler.costs.record_step(rows=1, seconds=2.0)  # as measured: 2 s per image row, decoding free
    service.scheduler.costs.record_decode(images=1, seconds=0.0)
    release = _held(service)
    try:
        with TestClient(build_api(service), raise_server_exceptions=False) as client:
            # Its own timeout first: 2 steps of 2 s do not fit in 0.5 s, even with nothing ahead.
            response = client.post("/v1/sample", json={"n": 1, "steps": 2},
                                   headers={"X-Request-Timeout-Seconds": "0.5"})
            assert response.status_code == 503 and "timeout of 0.5 s" in response.json()["detail"]
            busy = [service.scheduler.submit_sample(n=2, steps=2)]  # 1 image in the (held) engine, 1 queued
            deadline = time.monotonic() + 60
            while service.scheduler.stats()["active_images"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.001)
            # 3 more images: 4 must leave the one slot first, at 4 s each: a 16 s wait, 4 s beyond the limit (one
            # more image would wait 8 s: it would pass).
            response = client.post("/v1/sample", json={"n": 3, "steps": 2})
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "4"
            assert "estimated wait of 16.0 s exceeds the server's limit of 12 s" in response.json()["detail"]
            for value, status in (("soon", 422), ("-1", 400)):
                bad = client.post("/v1/sample", json={"n": 1}, headers={"X-Request-Timeout-Seconds": value})
                assert bad.status_code == status, bad.text
            # 2 more (a 12 s wait: admitted); then not even one image fits in 12 s: new requests are refused before
            # their bodies are read.
            busy.append(service.scheduler.submit_sample(n=2, steps=2))
            unread = client.post("/v1/sample", content=b"{not even JSON", headers={"content-type": "application/json"})
            assert unread.status_code == 503 and unread.headers["retry-after"] == "4", unread.text
            release.set()
            for job in busy:
                job.future.result(60)
        assert metrics.refusals == ["deadline", "deadline", "bad_request", "bad_request", "deadline"]
    finally:
        release.set()
        service.close()


def test_answers_say_where_their_time_went(client):
    response = client.post("/v1/sample", json={"n": 1, "steps": 2, "format": "png"})
    assert response.status_code == 200
    timing = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
    assert set(timing) == {"queue", "engine"} and all(float(ms) >= 0 for ms in timing.values())
    assert float(timing["engine"]) > 0
