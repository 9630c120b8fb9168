"""A key for the HTTP service once it leaves loopback: `movq-deploy serve --api-key KEY` (or $MOVQ_API_KEY).

Every request but GET /healthz (for load balancers' health checks; it tells nothing but "ok") must carry the key:
`Authorization: Bearer KEY` for API clients, or HTTP Basic with the key as the password (any user name), which is
how a browser sends it for the web page at /ui after asking for it once. A missing or wrong key gets a JSON 401.
Keys are compared in constant time (hmac.compare_digest), so the time of an answer tells nothing about the key.

Binding to an address other than loopback without a key is refused, unless `--no-auth` says the network is trusted
(TorchServe turned token authorization on by default for the same reason). `movq-deploy ui` (the page on its own
gradio server) follows the same rule, with gradio's login page asking for the key.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import json
import os
from typing import Callable, Optional

API_KEY_ENV = "MOVQ_API_KEY"
OPEN_PATHS = ("/healthz",)


def key_from(api_key: Optional[str]) -> Optional[str]:
    """The key given on the command line, else $MOVQ_API_KEY, else None; an empty key is refused."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ValueError(f"the API key is empty: give one with --api-key or ${API_KEY_ENV}, or none")
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def check_exposure(host: str, api_key: Optional[str], no_auth: bool) -> None:
    """ValueError (one line) when the service would listen beyond this machine with no key and no --no-auth."""
    if api_key is None and not no_auth and not is_loopback(host):
        raise ValueError(f"--host {host} opens the service to the network: give --api-key (or ${API_KEY_ENV}), or "
                         f"--no-auth if the network is trusted")


def password_check(api_key: str) -> Callable[[str, str], bool]:
    """gradio's auth callable for `movq-deploy ui`: any user name, the key as the password (constant-time)."""
    key = api_key.encode()
    return lambda username, password: hmac.compare_digest(password.encode(), key)


def presented_key(authorization: bytes) -> Optional[bytes]:
    """The key an Authorization header carries (Bearer, or Basic's password), or None."""
    scheme, _, credentials = authorization.strip().partition(b" ")
    scheme = scheme.lower()
    if scheme == b"bearer":
        return credentials.strip()
    if scheme == b"basic":
        try:
            decoded = base64.b64decode(credentials.strip(), validate=True)
        except (binascii.Error, ValueError):
            return None
        return decoded.partition(b":")[2]
    return None


class KeyRequired:
    """ASGI middleware: HTTP requests (except OPEN_PATHS) without the key get a JSON 401 before anything else runs.

    The page asks a browser for HTTP Basic credentials (WWW-Authenticate: Basic), the API for a bearer token."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        path = _app_path(scope)
        if scope["type"] not in ("http", "websocket") or path in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        key = presented_key(headers.get(b"authorization", b""))
        if key is not None and hmac.compare_digest(key, self.key):
            return await self.app(scope, receive, send)
        if scope["type"] == "websocket":  # refused before the handshake completes
            return await send({"type": "websocket.close", "code": 1008})
        page = path.startswith("/ui")
        challenge = b'Basic realm="movq-deploy"' if page else b'Bearer realm="movq-deploy"'
        detail = ("wrong API key" if key is not None
                  else "this service needs an API key: send the header 'Authorization: Bearer KEY'")
        body = json.dumps({"detail": detail}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", challenge)]})
        await send({"type": "http.response.body", "body": body})


def _app_path(scope) -> str:
    """The request's path within the app (without the root path it is mounted at, e.g. a Ray Serve route prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path
