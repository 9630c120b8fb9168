"""Goodput under overload, on 127.0.0.1: the Ray Serve service and its lower bound (the same scheduler and API in one
uvicorn process without Ray, `serve --no-ray`), one after the other in one run, one replica each.

    python benchmarks/serve_overload.py [--engine-dir runs/demo/engines] [--multiples 1,2,4] [--seconds 10]

For each server: its capacity (a closed loop of --clients concurrent n=1 clients for --saturation-seconds: images
answered per second), then open-loop Poisson arrivals of n=1 `format: "png"` requests at --multiples of that
capacity for --seconds each: goodput (images answered 200 per second of the run, within the client's --timeout),
503s and their p99, the admitted requests' p99 beside --max-queue-wait plus their own engine time (Server-Timing).
The targets of issue 21 are checked on the figures of this run. Writes results.json and table.md to --out. The client
shares the machine with the server: on a small machine, read the ratios (one run, same load), not the absolutes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.http_load import (StandaloneServer, closed_loop, free_port, one, open_loop, run, session,  # noqa: E402
                                  summarize)
from benchmarks.machine import load_average, serving_report, usable_cores  # noqa: E402

SERVERS = {"ray": "Ray Serve (proxy + replica)", "no-ray": "one uvicorn process, no Ray (the bound)"}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir", default="runs/demo/engines")
    parser.add_argument("--servers", default="no-ray,ray")
    parser.add_argument("--multiples", default="1,2,4", help="offered loads, x each server's measured capacity")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of arrivals per load")
    parser.add_argument("--saturation-seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients of the capacity measurement")
    parser.add_argument("--timeout", type=float, default=10.0, help="the client's timeout: later answers are lost")
    parser.add_argument("--max-queue-wait", type=float, default=2.0, help="the servers' --max-queue-wait (s)")
    parser.add_argument("--format", default="png", choices=("png", "json"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/serve_overload")
    return parser.parse_args(argv)


class RayServer:
    """The Ray Serve service as `movq-deploy serve` runs it (a Ray of its own, access logs off), in this process."""

    def __init__(self, engine_dir: str, port: int, max_queue_wait: float, cores: int):
        import ray
        from ray import serve

        from movq_deploy.serving.app import RAY_NODE_ENV, ScaleConfig, build_app, logging_config
        from movq_deploy.serving.service import ServiceConfig

        os.environ.update(RAY_NODE_ENV)
        ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
        config = ServiceConfig(engine_dir, max_queue_wait_s=max_queue_wait)
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config(config))
        serve.run(build_app(config, ScaleConfig(replicas=1, num_cpus=cores)), name="movq", route_prefix="/")
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def start(name: str, args, engine_dir: str, cores: int):
    port = free_port()
    if name == "no-ray":
        return StandaloneServer(engine_dir, port, "--max-queue-wait", str(args.max_queue_wait)).wait_ready()
    return RayServer(engine_dir, port, args.max_queue_wait, cores)


def measure(server, args) -> dict:
    url = f"{server.url}/v1/sample"

    async def warm_up():
        async with session() as client:
            for i in range(10):
                await one(client, url, {"n": 1, "seed": i, "format": args.format}, args.timeout)

    run(warm_up())
    (answers, seconds), cpu = run(closed_loop(url, args.clients, args.saturation_seconds, args.timeout, args.seed,
                                              args.format))
    result = {"saturated": summarize(answers, seconds, cpu)}
    capacity = result["saturated"]["goodput_images_per_s"]
    result["capacity_images_per_s"] = capacity
    result["loads"] = []
    for multiple in map(float, args.multiples.split(",")):
        (answers, seconds), cpu = run(open_loop(url, multiple * capacity, args.seconds, args.timeout,
                                                args.seed + int(multiple * 10), args.format))
        row = {"multiple": multiple, "offered_per_s": multiple * capacity, **summarize(answers, seconds, cpu)}
        result["loads"].append(row)
        print(f"  {multiple:g}x: {json.dumps(row)}", flush=True)
    return result


def targets(report: dict, max_queue_wait: float) -> list:
    rows = []
    ray_result, bound = report["servers"].get("ray"), report["servers"].get("no-ray")
    if ray_result:
        capacity = ray_result["capacity_images_per_s"]
        for row in ray_result["loads"]:
            if row["multiple"] == 4:
                rows.append(("at 4x, goodput >= 0.85 x capacity", row["goodput_images_per_s"] / capacity, 0.85, ">="))
            if row["refused_503"]:
                rows.append((f"at {row['multiple']:g}x, 503 p99 <= 100 ms", row["refused_p99_ms"], 100.0, "<="))
            bound_ms = max_queue_wait * 1e3 + row["engine_p99_ms"]
            rows.append((f"at {row['multiple']:g}x, admitted p99 <= max-queue-wait + engine p99 "
                         f"({bound_ms:.0f} ms)", row["ok_p99_ms"], bound_ms, "<="))
    if ray_result and bound:
        rows.append(("Ray Serve saturated goodput >= 0.7 x the no-Ray bound's",
                     ray_result["saturated"]["goodput_images_per_s"] / bound["saturated"]["goodput_images_per_s"],
                     0.7, ">="))
    return [{"target": name, "value": value, "bound": limit,
             "met": bool(value >= limit if sense == ">=" else value <= limit)} for name, value, limit, sense in rows]


def table(report: dict) -> str:
    lines = ["| server | load | offered req/s | goodput images/s | 200 | 503 | other | no answer | 200 p50 ms | "
             "200 p99 ms | 503 p99 ms | queue p99 ms | engine p99 ms | client CPU (cores) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, result in report["servers"].items():
        for label, row in [("saturated (closed loop)", result["saturated"])] + [
                (f"{r['multiple']:g}x capacity", r) for r in result["loads"]]:
            offered = f"{row['offered_per_s']:.0f}" if "offered_per_s" in row else "-"
            lines.append(f"| {SERVERS[name]} | {label} | {offered} | {row['goodput_images_per_s']:.1f} | {row['ok']} | "
                         f"{row['refused_503']} | {row['other_status']} | {row['no_answer']} | "
                         f"{row['ok_p50_ms']:.0f} | {row['ok_p99_ms']:.0f} | {row['refused_p99_ms']:.0f} | "
                         f"{row['queue_p99_ms']:.0f} | {row['engine_p99_ms']:.0f} | "
                         f"{row['client_cpu_share_of_a_core']:.2f} |")
    lines += ["", "| target | value | bound | met |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {t['target']} | {t['value']:.2f} | {t['bound']:g} | {'yes' if t['met'] else 'no'} |"
              for t in report["targets"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine_dir = str(Path(args.engine_dir).resolve())
    cores = usable_cores()
    report = {**serving_report("benchmarks/serve_overload.py", engine_dir, cores),
              "max_queue_wait_s": args.max_queue_wait, "client_timeout_s": args.timeout, "format": args.format,
              "servers": {}}
    for name in args.servers.split(","):
        if name not in SERVERS:
            raise ValueError(f"--servers takes {', '.join(SERVERS)}, got {name!r}")
        print(f"{SERVERS[name]} ...", flush=True)
        server = start(name, args, engine_dir, cores)
        try:
            report["servers"][name] = measure(server, args)
        finally:
            server.stop()
        time.sleep(1.0)  # the next server starts on a quiet machine
    report["load_after"] = load_average()
    report["targets"] = targets(report, args.max_queue_wait)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table.md").write_text(table(report))
    print(table(report))
    return report


if __name__ == "__main__":
    main()
