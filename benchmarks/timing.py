"""Wall-clock timing: warm-up, then repeat until a time budget; percentiles of the per-call latency."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def time_calls(
    fn: Callable[[], object], budget_s: float, warmup: int = 2, min_repeats: int = 3, max_repeats: int = 10_000
) -> np.ndarray:
    """Seconds per call of `fn` (float64 [n]): `warmup` untimed calls (first-call allocation, compilation,
    autotuning), then timed calls until `budget_s` has passed, at least `min_repeats` and at most `max_repeats`."""
    if budget_s <= 0:
        raise ValueError(f"budget_s must be positive, got {budget_s}")
    for _ in range(warmup):
        fn()
    times = []
    deadline = time.perf_counter() + budget_s
    while len(times) < min_repeats or (time.perf_counter() < deadline and len(times) < max_repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return np.asarray(times, dtype=np.float64)


def summarize(times_s: np.ndarray, batch: int) -> dict:
    """p50/p90/p99/mean/min in ms, the number of timed calls, and images/s at the median.

    With fewer than 100 calls p99 is interpolated between the largest samples: read it with `repeats` in view.
    """
    ms = times_s * 1e3
    p50 = float(np.percentile(ms, 50))
    return {
        "p50_ms": p50,
        "p90_ms": float(np.percentile(ms, 90)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "repeats": int(ms.size),
        "images_per_s": batch / (p50 / 1e3),
    }


class CallTimer:
    """Wraps a callable and adds up the wall time spent inside it (to split a loop's time into engine calls and
    everything else)."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1
