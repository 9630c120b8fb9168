"""The cost of classifier-free guidance per sampling step: the guided prior step against the plain one.

    python benchmarks/studies/guidance_step.py --engine-dir runs/demo/engines [--batch-sizes 1,16] [--precisions fp32,int8]
                                       [--out runs/benchmarks]

Both graphs of an engine directory (prior and prior_guided, ONNX Runtime on the CPU, as the Generator opens them) on
the same first-step feeds (every slot masked, a class per row, w = 3 for the guided graph). The two are timed in
alternating rounds, so that a shared machine's load falls on both alike; the ratio guided / plain is per round's
medians, then the median of the rounds. The guided graph runs the prior on 2B rows, so ~2x is expected where the
transformer dominates. Writes <out>/guidance_step.json and .md (benchmarks/report.py).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from benchmarks.machine import load_average, machine_info  # noqa: E402
from benchmarks.report import write_report  # noqa: E402
from benchmarks.subject import stage_feeds  # noqa: E402
from benchmarks.timing import summarize, time_calls  # noqa: E402
from movq_deploy import contract  # noqa: E402
from movq_deploy.backends import open_runners  # noqa: E402
from movq_deploy.manifest import EngineDir  # noqa: E402

GUIDANCE = 3.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir", default="runs/demo/engines", help="a class-conditional export")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--precisions", default="fp32", help="comma-separated: fp32, int8 (ONNX Runtime CPU)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds per batch size")
    parser.add_argument("--budget-s", type=float, default=0.5, help="timing budget per graph and round")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: physical cores)")
    parser.add_argument("--out", default="runs/benchmarks")
    return parser.parse_args(argv)


def step_feeds(engines: EngineDir, batch: int) -> "tuple[dict, dict]":
    """(plain feeds, guided feeds) of a first step: every slot masked, classes 0, 1, ... per row, w = GUIDANCE."""
    feeds = stage_feeds("prior_step", batch, engines, np.random.default_rng(batch))
    feeds["class_labels"] = (np.arange(batch) % engines.num_classes).astype(np.int32)
    guided = contract.prior_step_feeds(feeds["tokens"], feeds["class_labels"], feeds["uniform"], feeds["gumbel"],
                                       feeds["temperature"], feeds["choice_scale"], guidance_scale=GUIDANCE)
    return feeds, guided


def measure_precision(engines: EngineDir, precision: str, args) -> list:
    runners = open_runners(engines, backend="onnxruntime-cpu", precision=precision, threads=args.threads).runners
    rows = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        plain_feeds, guided_feeds = step_feeds(engines, batch)
        times = {"prior": [], "prior_guided": []}
        ratios = []
        for _ in range(args.rounds):
            medians = {}
            for graph, feeds in (("prior", plain_feeds), ("prior_guided", guided_feeds)):
                seconds = time_calls(lambda: runners[graph].run(feeds), args.budget_s, warmup=1)
                times[graph].append(seconds)
                medians[graph] = float(np.median(seconds))
            ratios.append(medians["prior_guided"] / medians["prior"])
        plain, guided = (summarize(np.concatenate(times[g]), batch) for g in ("prior", "prior_guided"))
        rows.append({"precision": precision, "batch": batch, "plain": plain, "guided": guided,
                     "ratio": float(np.median(ratios)), "ratio_per_round": ratios})
    return rows


def table(rows: list, engines: EngineDir, load) -> str:
    lines = [f"Guided (w = {GUIDANCE:g}) vs plain prior step, ONNX Runtime CPU, {engines.path} "
             f"(grid {'x'.join(map(str, engines.grid.shape))}, K = {engines.codebook_size}); load average {load}",
             "", "| precision | batch | plain p50 ms | guided p50 ms | guided / plain (median of rounds) |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['precision']} | {row['batch']} | {row['plain']['p50_ms']:.2f} | "
                     f"{row['guided']['p50_ms']:.2f} | {row['ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    engines = EngineDir.load(args.engine_dir)
    if not engines.guided:
        raise SystemExit(f"error: {engines.path} has no prior_guided graph (a class-conditional export has one)")
    rows = [row for precision in args.precisions.split(",") for row in measure_precision(engines, precision, args)]
    machine = machine_info()
    report = {"engine_dir": str(engines.path), "guidance_scale": GUIDANCE, "rows": rows, "machine": machine}
    return write_report(args.out, "guidance_step", report, table(rows, engines, load_average()))


if __name__ == "__main__":
    main()
