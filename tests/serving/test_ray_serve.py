"""The Ray Serve application over HTTP on 127.0.0.1: the library's images, 4xx that keep it serving, and faults
(a replica's process killed mid-request). One local Ray for the session (conftest.serve_port); loops are bounded."""
from __future__ import annotations

import base64
import io
import os
import signal
import threading
import time

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray", reason="the serve extra is not installed (pip install -e .[serve])")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed (pip install -e .[serve])")
from ray import serve  # noqa: E402

from movq_deploy.serving.app import ScaleConfig, build_app  # noqa: E402
from movq_deploy.serving.service import ServiceConfig  # noqa: E402

TIMEOUT = 30.0  # the client's timeout per request: no request may hang past it


def _deploy(tiny_engines, serve_port: int, name: str, replicas: int) -> str:
    config = ServiceConfig(str(tiny_engines.engine_dir), backend="onnxruntime-cpu", request_timeout_s=TIMEOUT)
    serve.run(build_app(config, ScaleConfig(replicas=replicas, num_cpus=0.5)), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{serve_port}/{name}"


@pytest.fixture(scope="module")
def two_replicas(tiny_engines, serve_port):
    url = _deploy(tiny_engines, serve_port, "two", replicas=2)
    yield url
    serve.delete("two")


def _images(response) -> np.ndarray:
    return np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(t)))) for t in response.json()["images"]])


def _replica_pids(url: str, count: int) -> "set[int]":
    pids = set()
    for _ in range(100):  # requests spread over replicas; bounded
        pids.add(httpx.get(f"{url}/v1/info", timeout=TIMEOUT).json()["pid"])
        if len(pids) == count:
            return pids
    raise AssertionError(f"saw only replicas {pids} of {count}")


def test_http_images_equal_the_library_and_bad_requests_keep_it_serving(two_replicas, tiny_generator):
    body = {"n": 2, "seed": 21, "steps": 4, "class_labels": ["red", 2], "temperature": 1.1}
    want = tiny_generator.sample(n=2, seed=21, steps=4, class_labels=["red", 2], temperature=1.1, output_type="np")
    for _ in range(3):  # whichever replica answers
        response = httpx.post(f"{two_replicas}/v1/sample", json=body, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        assert np.array_equal(_images(response), want)
    bad = httpx.post(f"{two_replicas}/v1/sample", content=b"{oops", timeout=TIMEOUT,
                     headers={"content-type": "application/json"})
    assert bad.status_code == 422 and "malformed JSON" in bad.json()["detail"]
    assert httpx.post(f"{two_replicas}/v1/sample", json={"n": 10**6}, timeout=TIMEOUT).status_code == 400
    assert httpx.get(f"{two_replicas}/healthz", timeout=TIMEOUT).json() == {"status": "ok"}
    info = httpx.get(f"{two_replicas}/v1/info", timeout=TIMEOUT).json()
    assert info["backend"] == "onnxruntime-cpu" and info["class_names"] == ["red", "green", "blue"]


def test_a_killed_replica_fails_no_request_past_its_timeout_and_the_other_keeps_answering(two_replicas):
    victim, survivor = sorted(_replica_pids(two_replicas, 2))
    outcomes, lock = [], threading.Lock()

    def slow_request():  # 16 images x 64 steps: long enough to be in flight when the replica dies
        started = time.monotonic()
        try:
            status = httpx.post(f"{two_replicas}/v1/sample", json={"n": 16, "steps": 64}, timeout=TIMEOUT).status_code
        except httpx.HTTPError as error:
            status = type(error).__name__
        with lock:
            outcomes.append((status, time.monotonic() - started))

    clients = [threading.Thread(target=slow_request) for _ in range(6)]
    for client in clients:
        client.start()
    time.sleep(0.5)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    answered = []  # meanwhile: quick requests, for about 5 s
    while time.monotonic() - killed_at < 5:
        response = httpx.post(f"{two_replicas}/v1/sample", json={"n": 1, "steps": 2}, timeout=TIMEOUT)
        answered.append(response.status_code)
    for client in clients:
        client.join(TIMEOUT + 5)
    assert len(outcomes) == 6 and all(seconds < TIMEOUT + 1 for _, seconds in outcomes), outcomes
    assert any(status == 200 for status, _ in outcomes)  # the survivor's share finished
    assert answered.count(200) >= max(1, len(answered) // 2), answered  # the survivor kept answering

    deadline = time.monotonic() + 30  # Ray Serve replaces the dead replica
    while time.monotonic() < deadline:
        try:
            pids = _replica_pids(two_replicas, 2)
        except (AssertionError, httpx.HTTPError):
            continue
        assert survivor in pids and victim not in pids
        break
    else:
        raise AssertionError("no second replica within 30 s of the kill")


def test_the_only_replica_killed_answers_again_within_30_s(tiny_engines, serve_port):
    url = _deploy(tiny_engines, serve_port, "one", replicas=1)
    try:
        (pid,) = _replica_pids(url, 1)
        os.kill(pid, signal.SIGKILL)
        killed_at, status = time.monotonic(), None
        while time.monotonic() - killed_at < 30:
            try:
                status = httpx.post(f"{url}/v1/sample", json={"n": 1, "steps": 2}, timeout=5).status_code
            except httpx.HTTPError:
                status = None
            if status == 200:
                break
            time.sleep(0.2)
        assert status == 200, f"no answer within 30 s of the kill (last status {status})"
        assert httpx.get(f"{url}/v1/info", timeout=TIMEOUT).json()["pid"] != pid
    finally:
        serve.delete("one")


def test_the_application_builder_takes_string_settings(tiny_engines, ray_address):
    from movq_deploy.serving.app import app_builder

    app = app_builder({"engine_dir": str(tiny_engines.engine_dir), "replicas": "2", "request_timeout_s": "5",
                       "num_cpus": "0.5"})
    assert type(app).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown argument.*path"):
        app_builder({"engine_dir": str(tiny_engines.engine_dir), "path": "/etc"})
    with pytest.raises(ValueError, match="min-replicas"):
        app_builder({"engine_dir": str(tiny_engines.engine_dir), "min_replicas": "1"})


def _info(url: str) -> dict:
    return httpx.get(f"{url}/v1/info", timeout=TIMEOUT).json()


def _deploy_config(serve_port: int, name: str, config: ServiceConfig) -> str:
    serve.run(build_app(config, ScaleConfig(replicas=1, num_cpus=0.5)), name=name, route_prefix=f"/{name}")
    return f"http://127.0.0.1:{serve_port}/{name}"


def _post_in_thread(url: str, body: dict, results: list, timeout: float = TIMEOUT) -> threading.Thread:
    def post():
        try:
            results.append(httpx.post(f"{url}/v1/sample", json=body, timeout=timeout))
        except httpx.HTTPError as error:
            results.append(error)

    thread = threading.Thread(target=post)
    thread.start()
    return thread


def test_a_request_whose_client_has_gone_uses_no_engine_call(tiny_engines, serve_port):
    # One slot and long requests: each waits for the ones before it.
    config = ServiceConfig(str(tiny_engines.engine_dir), backend="onnxruntime-cpu", capacity=1, max_request_images=1,
                           max_steps=300, max_queue_wait_s=600.0, request_timeout_s=TIMEOUT)
    url = _deploy_config(serve_port, "gone", config)
    try:
        results = []
        blockers = [_post_in_thread(url, {"n": 1, "steps": 300, "seed": seed}, results) for seed in range(3)]
        deadline = time.monotonic() + TIMEOUT
        while _info(url)["scheduler"]["queued_images"] < 2:  # one in the engine, two waiting
            assert time.monotonic() < deadline, (_info(url), results)
        with pytest.raises(httpx.TimeoutException):  # this client gives up while its request waits, and goes
            httpx.post(f"{url}/v1/sample", json={"n": 1, "steps": 300, "seed": 9}, timeout=0.2)
        for blocker in blockers:
            blocker.join(TIMEOUT + 5)
        assert [r.status_code for r in results] == [200] * 3, results
        stats = _info(url)["scheduler"]
        assert stats["requests"] == 4 and stats["images"] == 3
        assert stats["prior_rows"] == 3 * 300  # the gone client's request took no engine call
    finally:
        serve.delete("gone")


def test_a_full_router_queue_refuses_in_json_with_retry_after(tiny_engines, serve_port):
    # The replica holds 2 requests (max_ongoing_requests = 1 queued image + 1 slot), its router queues 2 more.
    config = ServiceConfig(str(tiny_engines.engine_dir), backend="onnxruntime-cpu", capacity=1, max_queued_images=1,
                           max_request_images=1, max_steps=2000, max_queue_wait_s=600.0, request_timeout_s=TIMEOUT)
    url = _deploy_config(serve_port, "tight", config)
    try:
        long_results, short_results = [], []
        threads = [_post_in_thread(url, {"n": 1, "steps": 1000}, long_results)]  # in the engine for 0.3 s at least
        time.sleep(0.05)
        threads.append(_post_in_thread(url, {"n": 1, "steps": 1000}, long_results))  # queued in the replica
        time.sleep(0.1)
        # 8 more at once: 2 wait in the router's queue, the others are refused there (whoever comes first)
        threads += [_post_in_thread(url, {"n": 1, "steps": 1}, short_results) for _ in range(8)]
        for thread in threads:
            thread.join(TIMEOUT + 5)
        assert [r.status_code for r in long_results] == [200, 200], long_results
        refused = [r for r in short_results if r.status_code != 200]
        assert refused and all(r.status_code == 503 for r in refused), short_results
        for response in refused:
            assert response.headers["content-type"] == "application/json" and response.headers["retry-after"]
        assert any("backpressure" in r.json()["detail"] for r in refused)  # Ray's router's words, in JSON
    finally:
        serve.delete("tight")
