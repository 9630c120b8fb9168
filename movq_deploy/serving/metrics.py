"""A replica's Prometheus metrics through ray.serve.metrics: each node's Ray metrics agent exports them (with the
deployment, replica and application tags Ray Serve adds) at the node's metrics export port, as `ray_movq_*`.

What each one means and which alerts to set: docs/SERVING.md, "Metrics".
"""
from __future__ import annotations

from ray.serve import metrics

from movq_deploy.serving.scheduler import EngineMetrics

# Seconds, as Prometheus names them; from a tiny model's prior step on a fast CPU to a paper-size decode on a slow one.
LATENCY_BUCKETS_S = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]
ROWS_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]  # images per prior call, up to the largest prior batches


class ReplicaMetrics(EngineMetrics):
    """EngineMetrics exported from a Ray Serve replica (create it inside the replica: Ray Serve adds its tags)."""

    def __init__(self):
        self._queued = metrics.Gauge("movq_queue_images", "images waiting for a slot in the engine")
        self._active = metrics.Gauge("movq_active_images", "images in the engine's slots (of its capacity)")
        self._rows = metrics.Histogram("movq_prior_call_images", "images per prior-step call (batch occupancy)",
                                       boundaries=ROWS_BUCKETS)
        # Ray approximates a histogram's _sum from its buckets' midpoints: the exact mean occupancy is this counter's
        # rate over the histogram's _count rate.
        self._rows_total = metrics.Counter("movq_prior_rows", "image rows of all prior-step calls")
        self._step = metrics.Histogram("movq_prior_step_seconds", "wall time of one prior step (call and its numpy)",
                                       boundaries=LATENCY_BUCKETS_S)
        self._decode = metrics.Histogram("movq_decode_seconds", "wall time of one decoder call",
                                         boundaries=LATENCY_BUCKETS_S)
        self._served = metrics.Counter("movq_images_served", "images answered")
        self._refused = metrics.Counter("movq_requests_refused", "requests refused, by reason: overload (queue full), "
                                        "deadline (estimated wait too long), bad_request (4xx)", tag_keys=("reason",))
        # A counter appears in the export at its first increment: an alert on a rate should read a missing series
        # as 0 (PromQL `or vector(0)`).
        self.occupancy(0, 0)

    def prior_call(self, rows: int, seconds: float) -> None:
        self._rows.observe(rows)
        self._rows_total.inc(rows)
        self._step.observe(seconds)

    def decode_call(self, images: int, seconds: float) -> None:
        self._decode.observe(seconds)

    def served(self, images: int) -> None:
        self._served.inc(images)

    def refused(self, reason: str) -> None:
        self._refused.inc(tags={"reason": reason})

    def occupancy(self, queued_images: int, active_images: int) -> None:
        self._queued.set(queued_images)
        self._active.set(active_images)
