"""Load test of the HTTP service on 127.0.0.1: open-loop Poisson arrivals of n=1 requests, three batching modes.

    python benchmarks/serve_load.py [--engine-dir runs/demo/engines] [--fractions 0.3,0.7,0.9] [--requests 200]

Modes, side by side in one run, each one replica on this machine:
  (a) continuous: step-level continuous batching (the service's default);
  (b) request:    request-level dynamic batching with Ray Serve's @serve.batch (the conventional way);
  (c) none:       one request at a time.
For each mode: an isolated request's latency (sequential requests), the saturated throughput (closed loop, as many
concurrent clients as the replica's batch), then open-loop Poisson arrivals at fractions of (b)'s saturated
throughput, bounded by --requests and --max-seconds per rate: achieved images/s, p50/p90/p99 latency, rejections.
`--pools per-session,shared` deploys each mode twice: with one ONNX Runtime pool per graph, and with one process-wide
pool in the replica (ServiceConfig.shared_pool). In the same run and process, before Ray starts: Generator.sample(n=64) images/s and Generator.sample(n=1) latency.
Writes results.json, table.md and latency_vs_load.png to --out. The client shares the machine's cores with the
replica and Ray's proxy: on a small machine, read the numbers as ratios from one run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.machine import load_average, serving_report, usable_cores  # noqa: E402
from benchmarks.timing import summarize, time_calls  # noqa: E402

MODES = {"continuous": "(a) continuous batching", "request": "(b) @serve.batch", "none": "(c) one at a time"}
POOLS = {"per-session": False, "shared": True}  # the replica's ONNX Runtime pools: one per graph, or one per process


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir", default=None, help="default: runs/demo/engines, else a fresh tiny model")
    parser.add_argument("--modes", default="continuous,request,none")
    parser.add_argument("--fractions", default="0.3,0.5,0.7,0.9", help="offered loads, x (b)'s saturated images/s")
    parser.add_argument("--requests", type=int, default=200, help="most requests per rate")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="most seconds of arrivals per rate")
    parser.add_argument("--saturation-seconds", type=float, default=10.0)
    parser.add_argument("--pools", default="per-session",
                        help="per-session,shared: one deployment of each mode per setting of the replica's ONNX "
                             "Runtime thread pools (ServiceConfig.shared_pool)")
    parser.add_argument("--capacity", type=int, default=64, help="images per prior call / per @serve.batch batch")
    parser.add_argument("--timeout", type=float, default=60.0, help="client timeout per request (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/serve_load")
    return parser.parse_args(argv)


# ---- the client ----------------------------------------------------------------------------------------------

async def _one(client, url: str, seed: int, timeout: float) -> "tuple[str, float]":
    started = time.perf_counter()
    try:
        response = await client.post(url, json={"n": 1, "seed": seed}, timeout=timeout)
        outcome = "ok" if response.status_code == 200 else ("rejected" if response.status_code == 503 else
                                                            f"http {response.status_code}")
    except Exception as error:  # noqa: BLE001 - counted as an error of this request
        outcome = type(error).__name__
    return outcome, time.perf_counter() - started


async def open_loop(url: str, rate: float, requests: int, max_seconds: float, timeout: float, seed: int) -> dict:
    """Poisson arrivals at `rate` requests/s, each n=1, whatever the answers (open loop); bounded in count and time."""
    import httpx

    rng = np.random.default_rng(seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=256)
    async with httpx.AsyncClient(limits=limits) as client:
        tasks, start = [], time.perf_counter()
        arrival = 0.0
        for i in range(requests):
            arrival += rng.exponential(1.0 / rate)
            if arrival > max_seconds:
                break
            await asyncio.sleep(max(0.0, start + arrival - time.perf_counter()))
            tasks.append(asyncio.create_task(_one(client, url, seed * 1_000_003 + i, timeout)))
        sent_for = time.perf_counter() - start
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return _summary(results, elapsed, offered=len(tasks) / max(sent_for, 1e-9))


async def closed_loop(url: str, clients: int, seconds: float, timeout: float, seed: int) -> dict:
    """`clients` clients each sending n=1 requests back to back for `seconds`: the saturated throughput."""
    import httpx

    results, deadline = [], time.perf_counter() + seconds

    async def client_loop(client, index: int):
        sent = 0
        while time.perf_counter() < deadline:
            results.append(await _one(client, url, seed * 1_000_003 + index * 100_000 + sent, timeout))
            sent += 1

    start = time.perf_counter()
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None)) as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
    return _summary(results, time.perf_counter() - start)


def _summary(results: list, elapsed: float, offered: float = None) -> dict:
    latencies = np.array([seconds for outcome, seconds in results if outcome == "ok"]) * 1e3
    outcomes = [outcome for outcome, _ in results]
    percentile = (lambda q: float(np.percentile(latencies, q))) if latencies.size else (lambda q: float("nan"))
    return {
        "requests": len(results), "ok": int(latencies.size), "rejected": outcomes.count("rejected"),
        "errors": len(outcomes) - int(latencies.size) - outcomes.count("rejected"),
        "offered_per_s": offered, "images_per_s": latencies.size / elapsed,
        "p50_ms": percentile(50), "p90_ms": percentile(90), "p99_ms": percentile(99),
    }


# ---- the run -------------------------------------------------------------------------------------------------

def library_baselines(engine_dir: str, capacity: int) -> dict:
    """Generator.sample(n=64) images/s and sample(n=1) latency, in this process (before Ray takes any core)."""
    from movq_deploy.generator import Generator

    generator = Generator(engine_dir, backend="onnxruntime-cpu")
    batch = summarize(time_calls(lambda: generator.sample(n=capacity, seed=0, output_type="np"), budget_s=10.0), capacity)
    single = summarize(time_calls(lambda: generator.sample(n=1, seed=0, output_type="np"), budget_s=5.0), 1)
    return {f"sample_n{capacity}_images_per_s": batch["images_per_s"], "sample_n1_p50_ms": single["p50_ms"],
            "sample_n1_p99_ms": single["p99_ms"]}


def variant(mode: str, pool: str) -> str:
    """The name of a deployment of batching `mode` with thread-pool setting `pool` (a key of POOLS)."""
    return mode if pool == "per-session" else f"{mode}+{pool}-pool"


def label(name: str) -> str:
    mode, _, pool = name.partition("+")
    return MODES[mode] + (f", {pool}" if pool else "")


def deploy(name: str, engine_dir: str, capacity: int, timeout: float, cores: int) -> None:
    from ray import serve

    from movq_deploy.serving.app import ScaleConfig, build_app
    from movq_deploy.serving.service import ServiceConfig

    mode, _, pool = name.partition("+")
    config = ServiceConfig(engine_dir, backend="onnxruntime-cpu", batching=mode, capacity=capacity,
                           max_queued_images=4 * capacity, max_request_images=1, request_timeout_s=timeout,
                           shared_pool=bool(pool))
    serve.run(build_app(config, ScaleConfig(replicas=1, num_cpus=cores)), name=name, route_prefix=f"/{name}")


def isolated_latency(url: str, timeout: float, count: int = 20) -> dict:
    async def run():
        import httpx

        async with httpx.AsyncClient() as client:
            for i in range(3):  # warm-up
                await _one(client, url, i, timeout)
            return [await _one(client, url, 100 + i, timeout) for i in range(count)]

    results = asyncio.run(run())
    return _summary(results, sum(seconds for _, seconds in results))


def run(args) -> dict:
    import ray
    from ray import serve

    engine_dir = resolve_engine_dir(args.engine_dir, Path(args.out))
    cores = usable_cores()
    report = serving_report("benchmarks/serve_load.py", engine_dir, cores)
    print("library baselines ...", flush=True)
    report["library"] = library_baselines(engine_dir, args.capacity)
    print(json.dumps(report["library"]), flush=True)

    ray.init(num_cpus=cores, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    pools = args.pools.split(",")
    unknown = sorted(set(pools) - set(POOLS))
    if unknown:
        raise ValueError(f"--pools takes {', '.join(POOLS)}, got {', '.join(unknown)}")
    # (b) first: its saturated throughput sets the offered loads of every mode.
    order = sorted(args.modes.split(","), key=lambda mode: mode != "request")
    names = [variant(mode, pool) for mode in order for pool in pools]
    report["modes"], rates = {}, None
    try:
        for name in names:
            url = f"http://127.0.0.1:{port}/{name}/v1/sample"
            deploy(name, engine_dir, args.capacity, args.timeout, cores)
            result = {"isolated": isolated_latency(url, args.timeout)}
            result["saturated"] = asyncio.run(closed_loop(url, args.capacity, args.saturation_seconds, args.timeout,
                                                          args.seed))
            if rates is None:
                saturated = result["saturated"]["images_per_s"]
                rates = [float(f) * saturated for f in args.fractions.split(",")]
            result["open_loop"] = []
            for fraction, rate in zip(args.fractions.split(","), rates):
                row = asyncio.run(open_loop(url, rate, args.requests, args.max_seconds, args.timeout, args.seed))
                result["open_loop"].append({"fraction_of_b": float(fraction), "rate_per_s": rate, **row})
                print(f"{name:>10} {float(fraction):.2f} x (b): {json.dumps(row)}", flush=True)
            report["modes"][name] = result
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    report["load_after"] = load_average()
    report["targets"] = targets(report)
    return report


def resolve_engine_dir(engine_dir, out: Path) -> str:
    if engine_dir is not None:
        return str(Path(engine_dir).resolve())
    if (Path("runs/demo/engines") / "manifest.json").is_file():
        return str(Path("runs/demo/engines").resolve())
    from benchmarks.subject import export_fresh_models  # a fresh tiny model: the demo's size, random weights

    print("no runs/demo/engines: exporting a fresh tiny model (the demo's size) ...", flush=True)
    (out / "tiny").mkdir(parents=True, exist_ok=True)
    return str(export_fresh_models("tiny", out / "tiny")[0].resolve())


# ---- the verdicts, the table, the plot -------------------------------------------------------------------------

def targets(report: dict) -> list:
    modes, library, rows = report["modes"], report["library"], []
    batch_rate = next(v for k, v in library.items() if k.startswith("sample_n") and k.endswith("images_per_s"))
    if "continuous" in modes:
        a = modes["continuous"]
        rows.append(("(a) saturated images/s >= 0.9 x Generator.sample(n=64) images/s",
                     a["saturated"]["images_per_s"] / batch_rate, 0.9, ">="))
        rows.append(("isolated request p50 <= 1.5 x Generator.sample(n=1) p50",
                     a["isolated"]["p50_ms"] / library["sample_n1_p50_ms"], 1.5, "<="))
    if "continuous" in modes and "request" in modes:
        pairs = [(ra, rb) for ra in modes["continuous"]["open_loop"] for rb in modes["request"]["open_loop"]
                 if ra["fraction_of_b"] == rb["fraction_of_b"] == 0.7]
        if pairs:
            ra, rb = pairs[0]
            rows.append(("at 0.7 x (b)'s saturated load, (a) p99 <= 0.5 x (b) p99", ra["p99_ms"] / rb["p99_ms"], 0.5,
                         "<="))
    return [{"target": name, "ratio": ratio, "bound": bound,
             "met": bool(ratio >= bound if sense == ">=" else ratio <= bound)} for name, ratio, bound, sense in rows]


def table(report: dict) -> str:
    lines = ["| mode | load | offered req/s | achieved images/s | p50 ms | p90 ms | p99 ms | rejected | errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode, result in report["modes"].items():
        for name, row in [("isolated", result["isolated"]), ("saturated (closed loop)", result["saturated"])] + [
                (f"{r['fraction_of_b']:.2f} x (b) sat.", r) for r in result["open_loop"]]:
            offered = "-" if row.get("offered_per_s") is None else f"{row['offered_per_s']:.1f}"
            lines.append(f"| {label(mode)} | {name} | {offered} | {row['images_per_s']:.1f} | {row['p50_ms']:.0f} | "
                         f"{row['p90_ms']:.0f} | {row['p99_ms']:.0f} | {row['rejected']} | {row['errors']} |")
    lib = report["library"]
    lines += ["", f"Library, same run: Generator.sample(n=64) "
              f"{next(v for k, v in lib.items() if k.endswith('images_per_s')):.1f} images/s; sample(n=1) p50 "
              f"{lib['sample_n1_p50_ms']:.1f} ms.", "", "| target | ratio | bound | met |", "| --- | --- | --- | --- |"]
    lines += [f"| {t['target']} | {t['ratio']:.2f} | {t['bound']} | {'yes' if t['met'] else 'no'} |"
              for t in report["targets"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode, result in report["modes"].items():
        rows = result["open_loop"]
        x = [row["images_per_s"] for row in rows]
        line, = ax.plot(x, [row["p99_ms"] for row in rows], "o-", label=f"{label(mode)} p99")
        ax.plot(x, [row["p50_ms"] for row in rows], "s--", color=line.get_color(), alpha=0.6, label=f"{label(mode)} p50")
    ax.set_xlabel("achieved images/s (n=1 requests, Poisson arrivals)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.set_title(f"movq-deploy serving on {report['cores']} cores (one replica)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = run(args)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table.md").write_text(table(report))
    plot(report, out / "latency_vs_load.png")
    print(table(report))
    return report


if __name__ == "__main__":
    main()
