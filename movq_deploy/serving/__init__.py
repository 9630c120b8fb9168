"""Serving: step-level continuous batching (scheduler.py, numpy + the backends only) and, on top of it, the Ray Serve
HTTP service (app.py) and bulk generation on Ray Data (bulk.py), which need the `serve` extra.

Importing this package loads neither Ray nor FastAPI.
"""
from movq_deploy.serving.scheduler import Overloaded, Scheduler, SchedulerConfig

__all__ = ["Overloaded", "Scheduler", "SchedulerConfig"]
