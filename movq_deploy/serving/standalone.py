"""The service without Ray: one process, the same ImageService (scheduler + Generator) and HTTP API under uvicorn.

    movq-deploy serve --engine-dir engines/ --no-ray [--host 127.0.0.1] [--port 8000]

What a request costs with no proxy and no process hop: the bound the Ray Serve service is measured against
(benchmarks/serve_overload.py). It has what one replica has (admission by deadline, timeouts, the API key, the page)
but no replicas, no cluster, no restart of a dead process and no metrics export; and uvicorn does not cancel a
request whose client disconnects (Ray Serve's proxy does), so such a request is dropped only once its timeout passes.
"""
from __future__ import annotations

import logging

from movq_deploy.serving.api import build_api
from movq_deploy.serving.service import ImageService, ServiceConfig

logger = logging.getLogger("movq_deploy")


def serve_standalone(config: ServiceConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serves until interrupted (Ctrl+C or SIGTERM), then stops the engine loop."""
    import uvicorn

    service = ImageService(config)
    try:
        logger.info("movq-deploy serving %s on http://%s:%d without Ray (batching: %s)", config.engine_dir, host, port,
                    config.batching)
        uvicorn.run(build_api(service), host=host, port=port, access_log=config.access_log, log_level="warning")
    finally:
        service.close()
