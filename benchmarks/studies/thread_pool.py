"""sample(n=1) on ONNX Runtime CPU: today's per-session thread pools vs one process-wide pool, in one run.

    python benchmarks/studies/thread_pool.py [--engine-dir runs/demo/engines] [--rounds 3] [--budget-s 5]

`Generator(..., shared_pool=True)` makes ONNX Runtime's intra-op pool process-wide (set once per process), so each
setting runs in its own child process; the children alternate (A B A B ...) so that a change in the machine's load
hits both. Reports the median of the per-round p50 latencies and the ratio.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.machine import load_average  # noqa: E402
from benchmarks.timing import summarize, time_calls  # noqa: E402

SETTINGS = {"per-session pools (today)": False, "one process-wide pool": True}


def child(engine_dir: str, shared_pool: bool, budget_s: float, batch: int) -> dict:
    from movq_deploy.generator import Generator

    generator = Generator(engine_dir, backend="onnxruntime-cpu", shared_pool=shared_pool)
    single = summarize(time_calls(lambda: generator.sample(n=1, seed=0, output_type="np"), budget_s), 1)
    many = summarize(time_calls(lambda: generator.sample(n=batch, seed=0, output_type="np"), budget_s, warmup=1), batch)
    return {"n1_p50_ms": single["p50_ms"], "n1_p90_ms": single["p90_ms"], f"n{batch}_p50_ms": many["p50_ms"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir", default="runs/demo/engines")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=16, help="a second, batched sample(n) timed beside n=1")
    parser.add_argument("--child", choices=["shared", "per-session"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.engine_dir, args.child == "shared", args.budget_s, args.batch)))
        return {}
    runs = {name: [] for name in SETTINGS}
    load_before = load_average()
    for _ in range(args.rounds):
        for name, shared in SETTINGS.items():
            command = [sys.executable, __file__, "--engine-dir", args.engine_dir, "--budget-s", str(args.budget_s),
                       "--batch", str(args.batch), "--child", "shared" if shared else "per-session"]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    report = {"load_before": load_before, "load_after": load_average(), "rounds": runs, "median": {}}
    for name, rows in runs.items():
        report["median"][name] = {key: float(np.median([row[key] for row in rows])) for key in rows[0]}
    today, shared = (report["median"][name] for name in SETTINGS)
    report["speedup_n1"] = today["n1_p50_ms"] / shared["n1_p50_ms"]
    report[f"speedup_n{args.batch}"] = today[f"n{args.batch}_p50_ms"] / shared[f"n{args.batch}_p50_ms"]
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
