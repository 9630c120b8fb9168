"""One local Ray for the whole test session, and Ray Serve's HTTP proxy on a free 127.0.0.1 port when asked."""
from __future__ import annotations

import logging
import os
import socket

import pytest


@pytest.fixture(scope="session")
def ray_address():
    """Starts Ray locally once (4 logical CPUs, no dashboard), with the environment `movq-deploy serve` gives the Ray
    it starts; yields its address; shuts it down at the end."""
    ray = pytest.importorskip("ray", reason="the serve extra is not installed (pip install -e .[serve])")
    from movq_deploy.serving.app import RAY_NODE_ENV

    for name, value in RAY_NODE_ENV.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # metrics exported each second, not each 10 s
    # address="local": a Ray of its own, never another one running on this (shared) machine.
    context = ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING,
                       log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield context.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_port(ray_address):
    """Ray Serve on 127.0.0.1:<free port> (another Ray Serve may hold 8000 on a shared machine); yields the port."""
    from ray import serve
    from ray.serve.schema import LoggingConfig

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=LoggingConfig(enable_access_log=False))
    yield port
    serve.shutdown()
