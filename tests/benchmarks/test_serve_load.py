"""benchmarks/serve_load.py's bookkeeping (the load itself needs Ray and minutes: it is run by hand)."""
from __future__ import annotations

import math

from benchmarks.serve_load import _summary, label, table, targets, variant


def _row(images_per_s, p99, **extra):
    return {"requests": 10, "ok": 10, "rejected": 0, "errors": 0, "offered_per_s": None,
            "images_per_s": images_per_s, "p50_ms": p99 / 2, "p90_ms": p99 * 0.9, "p99_ms": p99, **extra}


def test_summary_counts_outcomes_and_percentiles():
    summary = _summary([("ok", 0.1), ("ok", 0.3), ("rejected", 0.01), ("ReadTimeout", 60.0)], elapsed=2.0)
    assert (summary["ok"], summary["rejected"], summary["errors"]) == (2, 1, 1)
    assert summary["images_per_s"] == 1.0 and math.isclose(summary["p50_ms"], 200.0)
    assert math.isnan(_summary([("rejected", 0.01)], elapsed=1.0)["p99_ms"])


def test_targets_are_ratios_of_the_same_run():
    open_loop = lambda p99: [{"fraction_of_b": 0.7, "rate_per_s": 7.0, **_row(7.0, p99)}]  # noqa: E731
    report = {
        "library": {"sample_n64_images_per_s": 100.0, "sample_n1_p50_ms": 20.0, "sample_n1_p99_ms": 25.0},
        "modes": {
            "continuous": {"isolated": _row(40, 50.0), "saturated": _row(95.0, 900.0), "open_loop": open_loop(40.0)},
            "request": {"isolated": _row(30, 60.0), "saturated": _row(10.0, 900.0), "open_loop": open_loop(100.0)},
        },
    }
    report["targets"] = targets(report)
    verdicts = {row["target"].split(" ")[0]: (round(row["ratio"], 3), row["met"]) for row in report["targets"]}
    assert verdicts == {"(a)": (0.95, True), "isolated": (1.25, True), "at": (0.4, True)}
    assert "(a) continuous batching" in table(report) and "| 0.95 | 0.9 | yes |" in table(report)


def test_pool_variants_are_named_and_labelled_apart():
    assert variant("continuous", "per-session") == "continuous"
    assert variant("continuous", "shared") == "continuous+shared-pool"
    assert label("continuous") == "(a) continuous batching"
    assert label("continuous+shared-pool") == "(a) continuous batching, shared-pool"
