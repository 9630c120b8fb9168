"""One local Ray (and Ray Serve's HTTP proxy on a free 127.0.0.1 port) for the whole test session."""
from __future__ import annotations

import logging
import socket

import pytest


@pytest.fixture(scope="session")
def serve_port():
    """Starts Ray locally once and Ray Serve on 127.0.0.1:<free port>; yields the port; shuts both down at the end."""
    ray = pytest.importorskip("ray", reason="the serve extra is not installed (pip install -e .[serve])")
    from ray import serve

    with socket.socket() as probe:  # a free port: other Ray Serve instances may hold 8000 on a shared machine
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()
    ray.shutdown()
