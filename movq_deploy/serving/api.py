"""The HTTP API (FastAPI) over an ImageService: JSON and multipart in, PNG out; no pickles, no file paths.

    POST /v1/sample   JSON {n, seed, class_labels, steps, temperature, choice_temperature, guidance_scale,
                            format: "json" | "png"}
    POST /v1/edit     multipart: image, mask (files) + the same fields as form fields, plus paste_original, feather
    GET  /v1/info     model, grid, classes, backend, precision, batching
    GET  /healthz
    GET  /ui/         the web page (movq_deploy.ui) over the same service, when ServiceConfig.page is set

Every error is JSON {"detail": one line}: 400 bad values, 401 a missing or wrong key (when the service has one),
413 body too large, 422 malformed JSON or wrong field types, 503 overloaded (with Retry-After from the queue's
estimate), 504 timed out. A request may say how long its client waits (header X-Request-Timeout-Seconds, the one Ray
Serve's proxy reads too); answers carry Server-Timing (queue and engine milliseconds). The same seed gives the same
images as the library.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
from typing import List, Literal, Optional, Union

import numpy as np
from fastapi import FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt

from movq_deploy.serving.auth import KeyRequired
from movq_deploy.serving.proxy import REFUSING_HEADER, is_generation
from movq_deploy.serving.scheduler import Overloaded
from movq_deploy.serving.service import ImageService, Served

logger = logging.getLogger("movq_deploy")

Label = Union[StrictInt, str, None]
Number = Union[StrictInt, StrictFloat]
TIMEOUT_HEADER = "X-Request-Timeout-Seconds"  # Ray Serve's proxy name for a request's own timeout


class SampleBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: StrictInt = 1
    seed: Optional[StrictInt] = None
    class_labels: Union[Label, List[Label]] = None
    steps: Optional[StrictInt] = None
    temperature: Union[Number, List[Number], None] = None  # one, or one per image; None: the engine dir's default
    choice_temperature: Union[Number, List[Number], None] = None
    guidance_scale: Union[Number, List[Number], None] = None  # classifier-free guidance w >= 0 (conditional models)
    format: Literal["json", "png"] = "json"


def build_api(service: ImageService) -> FastAPI:
    """The FastAPI app of one replica (Ray Serve's ingress; also runs on its own, e.g. under a test client)."""
    app = FastAPI(title="movq-deploy", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=service.config.max_body_bytes, metrics=service.metrics)
    app.add_middleware(EarlyRefusal, service=service)
    if service.config.api_key is not None:
        app.add_middleware(KeyRequired, api_key=service.config.api_key)  # added last: runs first
    _add_error_handlers(app, service)

    @app.get("/healthz")
    async def healthz():
        if not service.healthy():
            raise HTTPException(503, "the engine loop has stopped")
        return {"status": "ok"}

    @app.get("/v1/info")
    async def info():
        return service.info()

    @app.post("/v1/sample")
    async def sample(body: SampleBody, timeout: Optional[float] = Header(None, alias=TIMEOUT_HEADER)):
        _check_png_request(body.format, body.n)
        served = await service.sample(body.n, body.seed, body.class_labels, body.steps, body.temperature,
                                      body.choice_temperature, body.guidance_scale, timeout_s=timeout)
        return await _respond(served, body.format)

    @app.post("/v1/edit")
    async def edit(
        image: UploadFile = File(...),
        mask: UploadFile = File(...),
        n: int = Form(1),
        seed: Optional[int] = Form(None),
        class_label: Optional[str] = Form(None),
        steps: Optional[int] = Form(None),
        temperature: Optional[float] = Form(None),
        choice_temperature: Optional[float] = Form(None),
        guidance_scale: Optional[float] = Form(None),
        paste_original: bool = Form(False),
        feather: int = Form(2),
        format: Literal["json", "png"] = Form("json"),
        timeout: Optional[float] = Header(None, alias=TIMEOUT_HEADER),
    ):
        _check_png_request(format, n)
        n = service.check_count(n)
        size = service.generator.image_size
        pixels = np.asarray(_read_image(await image.read(), "image", size).convert("RGB"))
        pixel_mask = np.asarray(_read_image(await mask.read(), "mask", size).convert("L")) >= 128
        label = int(class_label) if class_label is not None and class_label.lstrip("-").isdigit() else class_label
        # n fills of one image: fill i uses noise stream (seed, i), as `movq-deploy edit -n` does.
        served = await service.edit(np.repeat(pixels[None], n, axis=0), np.repeat(pixel_mask[None], n, axis=0),
                                    seed, label, steps, temperature, choice_temperature, paste_original, feather,
                                    guidance_scale, timeout_s=timeout)
        return await _respond(served, format)

    if service.config.page:
        from movq_deploy.ui.app import mount  # the ui extra (gradio), only when the page is asked for
        from movq_deploy.ui.service import ServedService

        mount(app, ServedService(service), "/ui")
    return app


def _check_png_request(format: str, n: int) -> None:
    if format == "png" and n != 1:
        raise ValueError(f"format 'png' returns one image: ask for n=1 (got n={n}) or for format 'json'")


def _read_image(data: bytes, field: str, size: int) -> Image.Image:
    """An uploaded image of size x size pixels; its size is checked before its pixels are decoded."""
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError):
        raise ValueError(f"{field}: not a readable image file (send a PNG or JPEG)") from None
    if image.size != (size, size):
        raise ValueError(f"{field} is {image.size[0]}x{image.size[1]} pixels; this model takes {size}x{size} images")
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{field}: the image file is damaged ({error})") from None
    return image


async def _respond(served: Served, format: str) -> Response:
    headers = {"X-Seed": str(served.seed)}
    if served.queue_s is not None:  # https://www.w3.org/TR/server-timing/
        headers["Server-Timing"] = f"queue;dur={served.queue_s * 1e3:.1f}, engine;dur={served.engine_s * 1e3:.1f}"
    images = served.images
    if format == "png":
        png = await asyncio.to_thread(_png, images[0])
        return Response(png, media_type="image/png", headers=headers)
    encoded = await asyncio.to_thread(lambda: [base64.b64encode(_png(image)).decode("ascii") for image in images])
    return JSONResponse({"seed": served.seed, "n": len(images), "images": encoded}, headers=headers)


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _add_error_handlers(app: FastAPI, service: ImageService) -> None:
    def error(status: int, detail: str, headers: Optional[dict] = None) -> JSONResponse:
        if 400 <= status < 500 and status != 401:  # 401s are answered by KeyRequired, before any of this
            service.metrics.refused("bad_request")
        return JSONResponse({"detail": " ".join(detail.split())}, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        problems = []
        for problem in exc.errors():
            where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body") or "body"
            if problem.get("type") == "json_invalid":
                problems.append(f"malformed JSON body ({problem.get('ctx', {}).get('error', 'invalid')})")
            else:
                problems.append(f"{where}: {problem.get('msg')}")
        return error(422, "; ".join(problems))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), exc.headers)

    @app.exception_handler(ValueError)
    async def bad_value(_: Request, exc: ValueError):
        return error(400, str(exc))

    @app.exception_handler(TypeError)
    async def bad_type(_: Request, exc: TypeError):
        return error(400, str(exc))

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded):  # counted by reason where it was refused
        return error(503, str(exc), {"Retry-After": exc.retry_after_header})

    @app.exception_handler(TimeoutError)
    async def timed_out(_: Request, exc: TimeoutError):
        return error(504, str(exc))

    @app.exception_handler(RuntimeError)
    async def failed(_: Request, exc: RuntimeError):
        logger.error("movq-deploy request failed: %s", exc)
        return error(500, str(exc))


class EarlyRefusal:
    """ASGI middleware: while the engine could not take even a one-image request in time, a new sample or edit is
    answered 503 (with Retry-After) before its body is read, let alone parsed: under overload a refusal costs little
    (under Ray Serve, reading a body is a call back to the proxy). Other requests pass. The answer's REFUSING_HEADER
    says for how many more seconds (the queue's estimate) every request would be refused: Ray Serve's proxies read it
    to refuse meanwhile themselves, at less cost still (proxy.py)."""

    def __init__(self, app, service: ImageService):
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send):
        if is_generation(scope):
            refusal = self.service.refusal()
            if refusal is not None:
                body = json.dumps({"detail": str(refusal)}).encode()
                await send({"type": "http.response.start", "status": 503,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"retry-after", refusal.retry_after_header.encode()),
                                        (REFUSING_HEADER, f"{refusal.retry_after_s:.3f}".encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """ASGI middleware: a body larger than max_bytes gets 413, by its Content-Length or while it streams in."""

    def __init__(self, app, max_bytes: int, metrics):
        self.app, self.max_bytes, self.metrics = app, max_bytes, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            self.metrics.refused("bad_request")
            body = json.dumps({"detail": f"request body larger than {self.max_bytes} bytes"}).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # raised inside the route's body parsing: answered as a 413
                raise HTTPException(413, f"request body larger than {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)
