"""The Ray Serve application: each replica owns one ImageService (one Generator + its scheduler), FastAPI its ingress.

    movq-deploy serve --engine-dir engines/ [--replicas N] [--host 127.0.0.1] [--port 8000] [--address ADDR]

Ray runs embedded on this machine by default, and joins a cluster through --address or RAY_ADDRESS (`ray start
--head` on one node, `ray start --address` on the others, or KubeRay). On a machine with GPUs each replica asks for
one. See docs/SERVING.md.
"""
from __future__ import annotations

import logging
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from ray import serve

from movq_deploy.serving.api import build_api
from movq_deploy.serving.service import ImageService, ServiceConfig

logger = logging.getLogger("movq_deploy")
APP_NAME = "movq"


@dataclass(frozen=True)
class ScaleConfig:
    """How many replicas, and what each asks Ray for."""

    replicas: int = 1
    min_replicas: Optional[int] = None  # min/max given: Ray Serve autoscales between them
    max_replicas: Optional[int] = None
    target_ongoing_requests: float = 16.0  # autoscaling target per replica
    num_cpus: float = 1.0  # per replica
    num_gpus: Optional[float] = None  # per replica; None: 1 when the Ray cluster has GPUs, else 0

    def __post_init__(self):
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both --min-replicas and --max-replicas to autoscale, or neither")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if self.replicas < 1 or self.num_cpus < 0 or (self.num_gpus is not None and self.num_gpus < 0):
            raise ValueError("replicas must be >= 1, and num_cpus / num_gpus >= 0")


@serve.deployment(name="MovqDeploy")
@serve.ingress()
class MovqDeployment:
    """One replica: opens the engine directory fixed at start; requests never name files."""

    def __init__(self, service_config: dict):
        self.service = ImageService(ServiceConfig(**service_config))
        logger.info("movq-deploy replica ready: %s", self.service.generator)

    def __serve_build_asgi_app__(self):  # called by Ray Serve after __init__
        return build_api(self.service)

    def check_health(self) -> None:  # Ray Serve restarts a replica whose check fails
        if not self.service.healthy():
            raise RuntimeError("the engine loop has stopped")

    def __del__(self):
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


def build_app(service: ServiceConfig, scale: ScaleConfig = ScaleConfig(), cluster_gpus: float = 0.0):
    """The bound Ray Serve application (for serve.run). The engine dir is made absolute here, once."""
    service = ServiceConfig(**{**service.to_dict(), "engine_dir": str(Path(service.engine_dir).resolve())})
    num_gpus = scale.num_gpus if scale.num_gpus is not None else (1.0 if cluster_gpus > 0 else 0.0)
    # Every request a replica can hold reaches it (its own queue refuses the excess with 503 at once); beyond that,
    # Ray Serve's router holds a few more and refuses the rest with 503 too.
    ongoing = service.max_queued_images + service.capacity
    options = dict(
        max_ongoing_requests=ongoing,
        max_queued_requests=ongoing,
        ray_actor_options={"num_cpus": scale.num_cpus, "num_gpus": num_gpus},
        health_check_period_s=2.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=5.0,
    )
    if scale.min_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": scale.min_replicas, "max_replicas": scale.max_replicas,
                                         "target_ongoing_requests": scale.target_ongoing_requests}
    else:
        options["num_replicas"] = scale.replicas
    return MovqDeployment.options(**options).bind(service.to_dict())


def app_builder(args: dict):
    """Ray Serve's application builder, for `serve run` and KubeRay's serveConfigV2 (args are strings there):

        serve run movq_deploy.serving.app:app_builder engine_dir=/models/engines replicas=2
    """
    import ray

    known = _names(ServiceConfig) | _names(ScaleConfig)
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    service = _from_strings(ServiceConfig, {k: v for k, v in args.items() if k in _names(ServiceConfig)})
    scale = _from_strings(ScaleConfig, {k: v for k, v in args.items() if k in _names(ScaleConfig)})
    return build_app(service, scale, ray.cluster_resources().get("GPU", 0.0))


def _names(cls) -> "set[str]":
    return {field.name for field in fields(cls)}


def _from_strings(cls, args: dict):
    """cls(**args) with string values converted to each field's type (int, float, str, or Optional of them)."""
    hints = typing.get_type_hints(cls)
    converted = {}
    for name, value in args.items():
        kind = hints[name]
        kind = next((arg for arg in typing.get_args(kind) if arg is not type(None)), kind)  # Optional[X] -> X
        converted[name] = kind(value) if isinstance(value, str) and kind in (int, float) else value
    return cls(**converted)


def start(service: ServiceConfig, scale: ScaleConfig = ScaleConfig(), host: str = "127.0.0.1", port: int = 8000,
          address: Optional[str] = None, blocking: bool = False):
    """Starts (or joins) Ray, then Ray Serve's HTTP proxy on host:port, then the app; returns its handle."""
    import ray

    if not ray.is_initialized():
        # address None: RAY_ADDRESS if set, else a local Ray (the embedded default).
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": service.request_timeout_s + 30})
    app = build_app(service, scale, ray.cluster_resources().get("GPU", 0.0))
    handle = serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    logger.info("movq-deploy serving %s on http://%s:%d (batching: %s)", service.engine_dir, host, port,
                service.batching)
    if blocking:
        _wait_forever()
    return handle


def _wait_forever() -> None:
    import time

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
