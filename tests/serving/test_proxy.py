"""Ray Serve's proxy answering in JSON (proxy.py): its plain-text errors become JSON with their status and
Retry-After, an answer that never started (the replica died) a JSON 502; the app's own answers pass untouched."""
from __future__ import annotations

import pytest

pytest.importorskip("starlette", reason="the serve extra is not installed (pip install -e .[serve])")
from starlette.testclient import TestClient  # noqa: E402

from movq_deploy.serving.proxy import (LOST_REPLICA_DETAIL, MAX_SHED_S, REFUSING_HEADER, JsonErrors,  # noqa: E402
                                      ShedWhileRefusing, middlewares)


def _app(*messages, fail: bool = False):
    async def app(scope, receive, send):
        for message in messages:
            await send(message)
        if fail:
            raise RuntimeError("the proxy broke")
    return app


def _start(status: int, content_type: bytes, *extra):
    return {"type": "http.response.start", "status": status, "headers": [[b"content-type", content_type], *extra]}


def _body(data: bytes, more: bool = False):
    return {"type": "http.response.body", "body": data, "more_body": more}


def _get(app):
    return TestClient(JsonErrors(app), raise_server_exceptions=False).get("/v1/sample")  # no lifespan: no `with`


def test_the_proxy_s_plain_text_errors_become_json_with_their_headers():
    response = _get(_app(_start(503, b"text/plain; charset=utf-8", [b"retry-after", b"1"]),
                         _body(b"Request dropped due to backpressure ", more=True), _body(b"(num_queued_requests=1).")))
    assert response.status_code == 503 and response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "1"
    assert response.json() == {"detail": "Request dropped due to backpressure (num_queued_requests=1)."}
    timeout = _get(_app(_start(408, b"text/plain"), _body(b"Request abc timed out after 60.0s.")))
    assert timeout.status_code == 408 and timeout.json()["detail"].startswith("Request abc timed out")


@pytest.mark.parametrize("fail", [False, True])
def test_an_answer_that_never_started_is_a_json_502_to_retry(fail):
    response = _get(_app(fail=fail))
    assert response.status_code == 502 and response.headers["retry-after"] == "1"
    assert response.json() == {"detail": LOST_REPLICA_DETAIL}


def test_the_app_s_own_answers_pass_untouched():
    error = _get(_app(_start(400, b"application/json"), _body(b'{"detail": "n must be an int"}')))
    assert error.status_code == 400 and error.json() == {"detail": "n must be an int"}
    png = _get(_app(_start(200, b"image/png"), _body(b"\x89PNG", more=True), _body(b"rest")))
    assert png.status_code == 200 and png.content == b"\x89PNGrest"
    page = _get(_app(_start(404, b"text/html"), _body(b"<html>not here</html>")))
    assert page.status_code == 404 and page.text == "<html>not here</html>"


def test_the_callback_gives_ray_serve_its_starlette_middlewares():
    from starlette.middleware import Middleware

    shed, errors = middlewares()
    assert isinstance(shed, Middleware) and shed.cls is ShedWhileRefusing and errors.cls is JsonErrors


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_proxy_refuses_while_a_replica_refuses_every_request():
    calls, refusing_for = [], {"value": None}

    async def replica(scope, receive, send):  # a POST: 503 + the header while refusing_for is set; else 200
        calls.append(scope["path"])
        if refusing_for["value"] is not None and scope["method"] == "POST":
            await send(_start(503, b"application/json", [b"retry-after", b"1"],
                              [REFUSING_HEADER, refusing_for["value"].encode()]))
            await send(_body(b'{"detail": "overloaded"}'))
        else:
            await send(_start(200, b"image/png"))
            await send(_body(b"png"))

    clock = _Clock()
    client = TestClient(ShedWhileRefusing(replica, clock=clock), raise_server_exceptions=False)
    assert client.post("/app/v1/sample").status_code == 200
    refusing_for["value"] = "3.5"  # the replica: every request refused for 3.5 s
    assert client.post("/app/v1/sample").status_code == 503 and len(calls) == 2
    shed = client.post("/app/v1/edit")  # the same application: refused by the proxy, the replica not called
    assert shed.status_code == 503 and len(calls) == 2 and shed.headers["content-type"] == "application/json"
    assert shed.headers["retry-after"] == "1" and "overloaded" in shed.json()["detail"]
    assert client.get("/app/v1/info").status_code == 200 and len(calls) == 3  # only generation requests are shed
    assert client.post("/other/v1/sample").status_code == 503 and len(calls) == 4  # another application: asked
    clock.now += MAX_SHED_S + 0.01  # at most MAX_SHED_S on a replica's word, then it is asked again
    refusing_for["value"] = None
    assert client.post("/app/v1/sample").status_code == 200 and len(calls) == 5


def test_the_shedding_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("MOVQ_PROXY_MAX_SHED_S", "0")
    calls = []

    async def replica(scope, receive, send):
        calls.append(scope["path"])
        await send(_start(503, b"application/json", [REFUSING_HEADER, b"5"]))
        await send(_body(b'{"detail": "overloaded"}'))

    client = TestClient(ShedWhileRefusing(replica), raise_server_exceptions=False)
    for _ in range(3):
        assert client.post("/v1/sample").status_code == 503
    assert len(calls) == 3
