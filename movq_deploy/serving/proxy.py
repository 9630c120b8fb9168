"""Ray Serve's HTTP proxy, refusing cheaply and answering in JSON like the app: ASGI middlewares loaded into each proxy
through Ray Serve's hook RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (an environment variable of the Ray nodes;
app.start sets it for the Ray it starts).

ShedWhileRefusing: when a replica answers a new request "503, and I will refuse every request for the next t
seconds" (REFUSING_HEADER, from the replica's early refusal, api.EarlyRefusal), the proxy answers the generation
requests of that application itself meanwhile (503 + Retry-After, in JSON), for at most MAX_SHED_S: such a refusal
costs the proxy's HTTP parsing only, not the router, a call to the replica and its answer relayed. Each proxy learns
from the answers it relays; with several replicas the window is short (MAX_SHED_S), since another replica may have
room before the refusing one does.

JsonErrors: two kinds of answers come from the proxy itself, not from a replica's app:
- its own error answers, in plain text: 503 when the router's queue is full (max_queued_requests), 408 when its
  request timeout passed, 404 for a path no application serves;
- nothing at all when the replica died with the request (its process or its node lost): the proxy logs the actor's
  death and ends the response unstarted, and uvicorn then answers a plain-text "500 Internal Server Error".
This middleware turns the first into JSON {"detail": ...} with the same status and headers (Retry-After kept), and the
second into a JSON 502 with Retry-After: the request may be retried, and a surviving replica will take it.
Answers of the app (JSON errors, images, the page) pass through untouched.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import List

logger = logging.getLogger("movq_deploy")

PROXY_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
PROXY_CALLBACK = "movq_deploy.serving.proxy:middlewares"
REFUSING_HEADER = b"x-movq-refusing-for"  # seconds (the replica's estimate) during which it refuses every request
# The longest a proxy refuses on a replica's word (the estimate may be pessimistic, the replicas many); the Ray nodes'
# environment variable MAX_SHED_ENV overrides it, 0 turns the shedding off.
MAX_SHED_S = 0.25
MAX_SHED_ENV = "MOVQ_PROXY_MAX_SHED_S"
GENERATION_PATHS = ("/v1/sample", "/v1/edit")
LOST_REPLICA_DETAIL = ("the replica serving this request was lost (its process or node died) before it answered; "
                       "retry the request")
LOST_REPLICA_RETRY_AFTER_S = 1  # Ray Serve routes the retry to a live replica at once


def middlewares() -> List:
    """Ray Serve's proxy callback: the middlewares to wrap the proxy's ASGI app in (the first outermost)."""
    from starlette.middleware import Middleware

    return [Middleware(ShedWhileRefusing), Middleware(JsonErrors)]


def is_generation(scope) -> bool:
    """A new sample or edit request (the requests that queue for the engine)."""
    return scope["type"] == "http" and scope.get("method") == "POST" and scope.get("path", "").endswith(
        GENERATION_PATHS)


class ShedWhileRefusing:
    """ASGI middleware over Ray Serve's proxy: refuses an application's generation requests for as long as (at most
    MAX_SHED_S) one of its replicas said it refuses every request."""

    def __init__(self, app, clock=time.monotonic):
        self.app, self.clock = app, clock
        self.max_shed_s = float(os.environ.get(MAX_SHED_ENV, MAX_SHED_S))
        self.refusing_until = {}  # the application's path prefix -> clock time

    async def __call__(self, scope, receive, send):
        if self.max_shed_s <= 0 or not is_generation(scope):
            return await self.app(scope, receive, send)
        prefix = _prefix(scope["path"])
        left = self.refusing_until.get(prefix, 0.0) - self.clock()
        if left > 0:
            return await _send_json(send, 503, "overloaded: every replica's queue is beyond its deadline; retry later",
                                    [(b"retry-after", str(max(1, math.ceil(left))).encode())])

        async def watching_send(message):
            if message["type"] == "http.response.start" and message["status"] == 503:
                refusing = next((bytes(v) for k, v in message.get("headers") or [] if bytes(k) == REFUSING_HEADER),
                                None)
                if refusing is not None:
                    self.refusing_until[prefix] = self.clock() + min(self.max_shed_s, float(refusing))
            await send(message)

        await self.app(scope, receive, watching_send)


class JsonErrors:
    """ASGI middleware over Ray Serve's proxy: plain-text error answers become JSON, an unanswered request a 502."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False
        held = None  # the start of a plain-text error answer, until its body is known
        body: List[bytes] = []

        async def rewriting_send(message):
            nonlocal started, held
            if message["type"] == "http.response.start":
                if message["status"] >= 400 and _is_plain_text(message.get("headers") or []):
                    held = message
                    return
                started = True
            elif held is not None and message["type"] == "http.response.body":
                body.append(message.get("body", b""))
                if message.get("more_body", False):
                    return
                status, headers = held["status"], _kept_headers(held.get("headers") or [])
                held = None
                started = True
                return await _send_json(send, status, b"".join(body).decode("utf-8", "replace"), headers)
            await send(message)

        try:
            await self.app(scope, receive, rewriting_send)
        except Exception:  # noqa: BLE001 - after an answer is sent, the error is logged, not answered in plain text
            if started:
                raise
            logger.exception("movq-deploy: the proxy failed before answering")
        if not started:
            await _send_json(send, 502, LOST_REPLICA_DETAIL,
                             [(b"retry-after", str(LOST_REPLICA_RETRY_AFTER_S).encode())])


def _prefix(path: str) -> str:
    """The path an application is mounted at, from the path of one of its generation requests."""
    return next((path[:-len(suffix)] for suffix in GENERATION_PATHS if path.endswith(suffix)), path)


def _is_plain_text(headers) -> bool:
    content_type = next((bytes(v) for k, v in headers if bytes(k).lower() == b"content-type"), b"text/plain")
    return content_type.split(b";")[0].strip().lower() == b"text/plain"


def _kept_headers(headers) -> list:
    """The headers of the proxy's answer worth keeping in the JSON one (Retry-After, Ray's request id)."""
    return [(bytes(k), bytes(v)) for k, v in headers if bytes(k).lower() in (b"retry-after", b"x-request-id")]


async def _send_json(send, status: int, detail: str, headers: list) -> None:
    body = json.dumps({"detail": " ".join(detail.split()) or f"HTTP {status}"}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})
