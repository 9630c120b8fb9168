"""The API key: bearer tokens (and HTTP Basic for the page) compared in constant time, JSON 401s, /healthz open, and
no listening beyond loopback without a key unless --no-auth."""
from __future__ import annotations

import base64
import hmac

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install -e .[serve])")
from fastapi import FastAPI  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from movq_deploy.serving import auth  # noqa: E402
from movq_deploy.serving.auth import KeyRequired, check_exposure, key_from, presented_key  # noqa: E402

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def client():
    app = FastAPI()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info():
        return {"model": "tiny"}

    @app.get("/ui/")
    async def page():
        return {"page": True}

    app.add_middleware(KeyRequired, api_key=KEY)
    with TestClient(app) as client:
        yield client


def test_the_right_key_passes_as_a_bearer_token_or_basic_password(client):
    assert client.get("/v1/info", headers={"Authorization": f"Bearer {KEY}"}).json() == {"model": "tiny"}
    basic = base64.b64encode(f"anyone:{KEY}".encode()).decode()
    assert client.get("/ui/", headers={"Authorization": f"Basic {basic}"}).json() == {"page": True}


@pytest.mark.parametrize("headers, detail", [
    ({}, "needs an API key"),
    ({"Authorization": "Bearer wrong"}, "wrong API key"),
    ({"Authorization": f"Bearer {KEY}x"}, "wrong API key"),
    ({"Authorization": KEY}, "needs an API key"),  # no scheme
    ({"Authorization": "Basic !!notbase64"}, "needs an API key"),
])
def test_a_missing_or_wrong_key_gets_a_json_401(client, headers, detail):
    response = client.get("/v1/info", headers=headers)
    assert response.status_code == 401 and response.headers["content-type"] == "application/json"
    assert detail in response.json()["detail"]
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_the_page_asks_a_browser_for_the_key_and_health_checks_need_none(client):
    response = client.get("/ui/")
    assert response.status_code == 401 and response.headers["www-authenticate"] == 'Basic realm="movq-deploy"'
    assert client.get("/healthz").json() == {"status": "ok"}


def test_keys_are_compared_in_constant_time(client, monkeypatch):
    compared = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert client.get("/v1/info", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert compared == [(b"nope", KEY.encode())]


def test_presented_keys():
    assert presented_key(b"Bearer abc") == b"abc" and presented_key(b"bearer  abc ") == b"abc"
    assert presented_key(b"Basic " + base64.b64encode(b"u:p:q")) == b"p:q"  # the password may hold colons
    assert presented_key(b"Digest abc") is None and presented_key(b"") is None


def test_listening_beyond_loopback_needs_a_key_or_no_auth(monkeypatch):
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        check_exposure(host, None, no_auth=False)
    for host in ("0.0.0.0", "192.0.2.7", "::", "myhost"):
        with pytest.raises(ValueError, match=f"--host {host} opens the service to the network: give --api-key"):
            check_exposure(host, None, no_auth=False)
        check_exposure(host, KEY, no_auth=False)
        check_exposure(host, None, no_auth=True)
    monkeypatch.setenv("MOVQ_API_KEY", "from-env")
    assert key_from(None) == "from-env" and key_from("given") == "given"
    monkeypatch.setenv("MOVQ_API_KEY", " ")
    with pytest.raises(ValueError, match="the API key is empty"):
        key_from(None)
    monkeypatch.delenv("MOVQ_API_KEY")
    assert key_from(None) is None


def test_the_service_with_a_key_serves_only_requests_that_carry_it(tiny_engines):
    from movq_deploy.serving.api import build_api
    from movq_deploy.serving.service import ImageService, ServiceConfig

    service = ImageService(ServiceConfig(str(tiny_engines.engine_dir), backend="onnxruntime-cpu", api_key=KEY))
    assert KEY not in repr(service.config)
    try:
        with TestClient(build_api(service)) as client:
            body = {"n": 1, "steps": 1, "format": "png"}
            refused = client.post("/v1/sample", json=body)
            assert refused.status_code == 401 and "needs an API key" in refused.json()["detail"]
            assert client.post("/v1/sample", json=body, headers={"Authorization": "Bearer x"}).status_code == 401
            served = client.post("/v1/sample", json=body, headers={"Authorization": f"Bearer {KEY}"})
            assert served.status_code == 200 and served.headers["content-type"] == "image/png"
            assert client.get("/healthz").status_code == 200
            assert service.scheduler.stats()["requests"] == 1  # the refused ones never reached the engine
    finally:
        service.close()
