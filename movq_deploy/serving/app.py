"""The Ray Serve application: each replica owns one ImageService (one Generator + its scheduler), FastAPI its ingress.

    movq-deploy serve --engine-dir engines/ [--replicas N] [--host 127.0.0.1] [--port 8000] [--address ADDR]

Ray runs embedded on this machine by default, and joins a cluster through --address or RAY_ADDRESS (`ray start
--head` on one node, `ray start --address` on the others, or KubeRay). On a machine with GPUs each replica asks for
one. See docs/SERVING.md.
"""
from __future__ import annotations

import logging
import os
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.schema import LoggingConfig

from movq_deploy.serving.api import build_api
from movq_deploy.serving.proxy import PROXY_CALLBACK, PROXY_CALLBACK_ENV
from movq_deploy.serving.service import ImageService, ServiceConfig

logger = logging.getLogger("movq_deploy")
APP_NAME = "movq"
# The environment of the Ray nodes: each node's HTTP proxy answers its own errors in JSON (proxy.py). start() sets it
# for the Ray it starts; on a cluster started with `ray start`, export it on every node first (docs/SERVING.md).
RAY_NODE_ENV = {PROXY_CALLBACK_ENV: PROXY_CALLBACK}
# Node failures (docs/SERVING.md, "Node failures"): how often the controller asks a replica whether it is healthy,
# how long it waits for the answer; three failed checks in a row and Ray Serve replaces the replica.
HEALTH_CHECK_PERIOD_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class ScaleConfig:
    """How many replicas, and what each asks Ray for."""

    replicas: int = 1
    min_replicas: Optional[int] = None  # min/max given: Ray Serve autoscales between them
    max_replicas: Optional[int] = None
    target_ongoing_requests: float = 16.0  # autoscaling target per replica
    num_cpus: float = 1.0  # per replica
    num_gpus: Optional[float] = None  # per replica; None: 1 when the Ray cluster has GPUs, else 0
    max_replicas_per_node: Optional[int] = None  # e.g. 1: a node's loss takes one replica, not all of them

    def __post_init__(self):
        if (self.min_replicas is None) != (self.max_replicas is None):
            raise ValueError("give both --min-replicas and --max-replicas to autoscale, or neither")
        if self.min_replicas is not None and not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 0 <= min_replicas <= max_replicas, got {self.min_replicas}, {self.max_replicas}")
        if self.replicas < 1 or self.num_cpus < 0 or (self.num_gpus is not None and self.num_gpus < 0):
            raise ValueError("replicas must be >= 1, and num_cpus / num_gpus >= 0")
        if self.max_replicas_per_node is not None and self.max_replicas_per_node < 1:
            raise ValueError(f"max_replicas_per_node must be >= 1, got {self.max_replicas_per_node}")


@serve.deployment(name="MovqDeploy")
@serve.ingress()
class MovqDeployment:
    """One replica: opens the engine directory fixed at start; requests never name files."""

    def __init__(self, service_config: dict):
        from movq_deploy.serving.metrics import ReplicaMetrics  # made here, in the replica: Ray Serve tags them

        self.service = ImageService(ServiceConfig(**service_config), metrics=ReplicaMetrics())
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
    holds = service.max_queued_images + service.capacity  # the most requests a replica can hold (n >= 1 each)
    options = dict(
        # Every request a replica can hold reaches it: its admission refuses the excess at once (503, by deadline
        # or by its queue's bound) and knows how long the wait is; Ray Serve's router does not.
        max_ongoing_requests=holds,
        # So a request waits in a proxy's router only while every replica holds all it can, and then each refuses
        # what exceeds its deadline at once, which empties the router's queue as fast as the replicas answer. Its
        # bound keeps what waits there to one replica's worth (Ray counts a request as queued while it is being
        # routed, so a bound near 0 would refuse simultaneous arrivals); beyond it the router refuses at once with
        # 503 + Retry-After (answered in JSON by proxy.py).
        max_queued_requests=holds,
        backpressure_config=BackpressureConfig(status_code=503, retry_after_s=service.retry_after_s),
        ray_actor_options={"num_cpus": scale.num_cpus, "num_gpus": num_gpus},
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        graceful_shutdown_timeout_s=5.0,
        logging_config=logging_config(service),
    )
    if scale.max_replicas_per_node is not None:
        options["max_replicas_per_node"] = scale.max_replicas_per_node
    if scale.min_replicas is not None:
        options["autoscaling_config"] = {"min_replicas": scale.min_replicas, "max_replicas": scale.max_replicas,
                                         "target_ongoing_requests": scale.target_ongoing_requests}
    else:
        options["num_replicas"] = scale.replicas
    return MovqDeployment.options(**options).bind(service.to_dict())


def logging_config(service: ServiceConfig) -> LoggingConfig:
    """Ray Serve's logging of a replica or a proxy: no access-log line per request unless asked for (each costs CPU
    on the request path and a line on stderr); warnings and errors are logged either way."""
    return LoggingConfig(enable_access_log=service.access_log)


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
        for name, value in RAY_NODE_ENV.items():  # inherited by the Ray processes this starts (not a running cluster's)
            os.environ.setdefault(name, value)
        # address None: RAY_ADDRESS if set, else a Ray of its own (the embedded default; Ray's own default would join
        # any other Ray running on this machine).
        address = address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": service.request_timeout_s + 30},
                logging_config=logging_config(service))
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
