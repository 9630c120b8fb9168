"""Serving: step-level continuous batching (scheduler.py, numpy + the backends only) and, on top of it, the Ray Serve
HTTP service (app.py, api.py, service.py) and bulk generation on Ray Data (bulk.py), which need the `serve` extra.

Importing this package loads neither Ray nor FastAPI, nor the runtime until a name below is used.
"""
__all__ = ["Overloaded", "Scheduler", "SchedulerConfig"]


def __getattr__(name: str):
    if name in __all__:
        from movq_deploy.serving import scheduler

        return getattr(scheduler, name)
    raise AttributeError(f"module 'movq_deploy.serving' has no attribute {name!r}")
