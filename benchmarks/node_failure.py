"""A node lost under load, on a real two-node Ray cluster on this machine (ray.cluster_utils.Cluster, 127.0.0.1 only).

    python benchmarks/node_failure.py [--engine-dir runs/demo/engines] [--rate 10] [--out runs/node_failure]

1. Serving: a head node and a worker node of one CPU each, one replica per node, Ray Serve's proxy on the head.
   Open-loop Poisson n=1 PNG requests at --rate; after --before seconds the worker node is lost the way
   Cluster.remove_node loses it (its raylet and every process of the node killed with SIGKILL at the same instant, as
   when a machine goes), and the load goes on for --after seconds. Every answer is recorded (status, content type,
   Retry-After, seconds, the PNG's digest). Then a node is added back and the time until the deployment is again 2
   healthy replicas is measured.
2. Bulk generation: `generate` on two actors (one per node); when a shard is complete the worker node is lost, and a
   node is added back --readd-after seconds later (as an autoscaler would); the run ends with every image written.

Writes results.json (the raw records and the figures) to --out; tests/serving/test_node_failure.py runs it small and
asserts on the records. The cluster's processes share this machine: read the seconds as an order of magnitude.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Every Ray process of the cluster on 127.0.0.1 (Ray's own switch for single-machine clusters); nodes declared dead
# 3 s after their last answer to the GCS's health check instead of 15 s (docs/SERVING.md, "Node failures"); and the
# head's proxy spreading requests over both replicas instead of preferring the one on its own node, so that the lost
# node has requests in flight (with a proxy on every node behind a load balancer, each prefers its own).
CLUSTER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_health_check_period_ms": "1000",
               "RAY_health_check_failure_threshold": "3", "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0"}
LONG_REQUEST = {"n": 2, "steps": 32}  # to be in flight when the node is lost
CLIENT_SLACK_S = 5.0  # a client waits this much longer than the service's timeout: the service must answer first
APP = "movq"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir", default="runs/demo/engines")
    parser.add_argument("--rate", type=float, default=10.0, help="requests per second (open loop, Poisson)")
    parser.add_argument("--before", type=float, default=4.0, help="seconds of load before the node is lost")
    parser.add_argument("--after", type=float, default=8.0, help="seconds of load after it")
    parser.add_argument("--timeout", type=float, default=10.0, help="the service's request timeout (s); each "
                        f"client waits {CLIENT_SLACK_S:g} s longer")
    parser.add_argument("--burst", type=int, default=16, help="long requests (n=2, 32 steps) sent over the 0.5 s "
                        "before the node is lost, so that the router spreads them and some are in flight on it")
    parser.add_argument("--recovery-timeout", type=float, default=120.0, help="most seconds to wait for 2 replicas")
    parser.add_argument("--bulk-images", type=int, default=24)
    parser.add_argument("--bulk-shard-size", type=int, default=2)
    parser.add_argument("--bulk-steps", type=int, default=None, help="default: the engine directory's")
    parser.add_argument("--readd-after", type=float, default=3.0, help="seconds between losing and re-adding a node")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/node_failure")
    return parser.parse_args(argv)


# ---- the cluster -----------------------------------------------------------------------------------------------

def start_cluster():
    from ray.cluster_utils import Cluster

    from movq_deploy.serving.app import RAY_NODE_ENV

    os.environ.update(RAY_NODE_ENV)  # inherited by every node's processes
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1)
    return cluster, worker


def lose_node(cluster, node) -> float:
    """Kills the node's raylet and every process under it, and its other processes, at once (SIGKILL); returns when."""
    import psutil

    pids = set()
    for processes in node.all_processes.values():
        for info in processes:
            pids.add(info.process.pid)
            try:
                pids.update(child.pid for child in psutil.Process(info.process.pid).children(recursive=True))
            except psutil.NoSuchProcess:
                pass
    lost_at = time.monotonic()
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)  # the bookkeeping; its processes are gone already
    return lost_at


def replica_states() -> "list[str]":
    from ray import serve

    status = serve.status().applications.get(APP)
    if status is None:
        return []
    deployment = next(iter(status.deployments.values()))
    return [state for state, count in deployment.replica_states.items() for _ in range(count)]


def healthy_replicas() -> int:
    from ray import serve

    status = serve.status().applications.get(APP)
    if status is None:
        return 0
    deployment = next(iter(status.deployments.values()))
    return deployment.replica_states.get("RUNNING", 0) if deployment.status == "HEALTHY" else 0


# ---- the load -----------------------------------------------------------------------------------------------------

async def _request(client, url: str, seed: int, timeout: float, started: float, body: dict = None) -> dict:
    sent = time.monotonic()
    body = body or {"n": 1, "seed": seed, "format": "png"}
    record = {"seed": seed, "sent_s": sent - started, "long": body.get("n", 1) > 1}
    try:
        response = await client.post(url, json=body, timeout=timeout)
        record.update(status=response.status_code, content_type=response.headers.get("content-type", ""),
                      retry_after=response.headers.get("retry-after"))
        if response.status_code == 200:
            record["png_sha256"] = hashlib.sha256(response.content).hexdigest()
        else:
            try:
                record["detail"] = response.json()["detail"]
            except (ValueError, KeyError, TypeError):
                record["body"] = response.text[:200]
    except Exception as error:  # noqa: BLE001 - recorded: a connection error or a client timeout
        record["error"] = type(error).__name__
    record["seconds"] = time.monotonic() - sent
    return record


async def open_loop(url: str, rate: float, seconds: float, timeout: float, seed: int, started: float,
                    burst_from: float, burst_to: float, burst: int) -> list:
    """Poisson arrivals from `started` (time.monotonic) for `seconds`, whatever the answers, plus `burst` long
    requests evenly from `burst_from` to `burst_to` seconds; the records."""
    import httpx

    rng = np.random.default_rng(seed)
    times = [(t, None) for t in np.cumsum(rng.exponential(1.0 / rate, int(rate * seconds * 2) + 10)) if t <= seconds]
    times += [(t, {**LONG_REQUEST, "seed": 10**6 + i}) for i, t in enumerate(np.linspace(burst_from, burst_to, burst))]
    tasks = []
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=None)) as client:
        for arrival, body in sorted(times, key=lambda item: item[0]):
            await asyncio.sleep(max(0.0, started + arrival - time.monotonic()))
            seed = body["seed"] if body else len(tasks)
            tasks.append(asyncio.create_task(_request(client, url, seed, timeout, started, body)))
        return list(await asyncio.gather(*tasks))


# ---- the scenarios ------------------------------------------------------------------------------------------------

def serving_scenario(args, cluster, worker, engine_dir: str) -> dict:
    import httpx
    from ray import serve
    from ray.serve.schema import LoggingConfig

    from movq_deploy.serving.app import ScaleConfig, build_app
    from movq_deploy.serving.service import ServiceConfig

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port},
                logging_config=LoggingConfig(enable_access_log=False))
    config = ServiceConfig(engine_dir, backend="onnxruntime-cpu", request_timeout_s=args.timeout)
    serve.run(build_app(config, ScaleConfig(replicas=2, num_cpus=1, max_replicas_per_node=1)), name=APP,
              route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/sample"
    reference = httpx.post(url, json={"n": 1, "seed": 0, "format": "png"}, timeout=args.timeout)
    reference.raise_for_status()
    lost = {}

    def fault():
        lost["at"] = lose_node(cluster, worker)

    started = time.monotonic()
    fault_timer = threading.Timer(args.before, fault)  # in its own thread: the arrivals go on meanwhile
    fault_timer.start()
    records = asyncio.run(open_loop(url, args.rate, args.before + args.after, args.timeout + CLIENT_SLACK_S, args.seed,
                                    started, burst_from=args.before - 0.6, burst_to=args.before - 0.1,
                                    burst=args.burst))
    fault_timer.join()
    survivor = [httpx.post(url, json={"n": 1, "seed": 0, "format": "png"}, timeout=args.timeout) for _ in range(3)]
    replicas_after_loss = replica_states()

    cluster.add_node(num_cpus=1)
    added_at, recovered_s = time.monotonic(), None
    while time.monotonic() - added_at < args.recovery_timeout:
        if healthy_replicas() == 2:
            recovered_s = time.monotonic() - added_at
            break
        time.sleep(0.1)
    pids = set()
    for _ in range(50):  # both replicas answer
        pids.add(httpx.get(url.replace("/v1/sample", "/v1/info"), timeout=args.timeout).json()["pid"])
        if len(pids) == 2:
            break
    again = httpx.post(url, json={"n": 1, "seed": 0, "format": "png"}, timeout=args.timeout)
    serve.shutdown()
    return {
        "rate": args.rate, "timeout_s": args.timeout, "lost_at_s": lost["at"] - started, "records": records,
        "reference_png_sha256": hashlib.sha256(reference.content).hexdigest(),
        "survivor": [{"status": r.status_code, "png_sha256": hashlib.sha256(r.content).hexdigest()} for r in survivor],
        "replica_states_after_loss": replicas_after_loss, "recovered_to_2_replicas_s": recovered_s,
        "replicas_answering_after_recovery": len(pids),
        "after_recovery_png_sha256": hashlib.sha256(again.content).hexdigest() if again.status_code == 200 else None,
    }


def bulk_scenario(args, cluster, engine_dir: str, out: Path) -> dict:
    from movq_deploy.serving.bulk import BulkConfig, generate

    node = next(iter(cluster.worker_nodes))  # the node added back after the serving scenario
    config = BulkConfig(engine_dir, str(out / "bulk"), num_images=args.bulk_images, seed=args.seed,
                        steps=args.bulk_steps, shard_size=args.bulk_shard_size, backend="onnxruntime-cpu")
    events, result = {}, {}

    def run():
        try:
            result["index"] = generate(config, workers=2, cpus_per_worker=1.0)
        except Exception as error:  # noqa: BLE001 - reported in the results
            result["error"] = f"{type(error).__name__}: {error}"

    started = time.monotonic()
    generation = threading.Thread(target=run)  # the fault runs here: Ray adds nodes from the main thread only
    generation.start()
    while not list((out / "bulk").glob("shard-*")) and generation.is_alive():
        time.sleep(0.005)
    if generation.is_alive():  # a shard is complete: lose the node mid-run, add one back a little later
        events["shards_complete_at_loss"] = len(list((out / "bulk").glob("shard-*")))
        lose_node(cluster, node)
        time.sleep(args.readd_after)
        cluster.add_node(num_cpus=1)
    generation.join()
    if "error" in result:
        return {**events, "error": result["error"]}
    index = result["index"]
    rows = list(csv.DictReader(index.open()))
    return {**events, "num_shards": config.num_shards, "seconds": time.monotonic() - started,
            "index": str(index), "files": [str(out / "bulk" / row["file"]) for row in rows],
            "leftover_partials": [p.name for p in (out / "bulk").glob(".shard-*")]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.environ.update(CLUSTER_ENV)  # before Ray is imported: it reads them then, and its nodes inherit them
    import ray

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine_dir = str(Path(args.engine_dir).resolve())
    cluster, worker = start_cluster()
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        report = {"engine_dir": engine_dir, "node_addresses": sorted({n["NodeManagerAddress"] for n in ray.nodes()}),
                  "serving": serving_scenario(args, cluster, worker, engine_dir)}
        report["bulk"] = bulk_scenario(args, cluster, engine_dir, out)
    finally:
        ray.shutdown()
        cluster.shutdown()
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary(report), indent=2))
    return report


def summary(report: dict) -> dict:
    """The figures: answers before / after the loss by outcome, the slowest answer, the recovery time."""
    serving = report["serving"]
    lost_at = serving["lost_at_s"]

    def outcome(record):
        return str(record.get("status", record.get("error")))

    counts = {}
    for record in serving["records"]:
        phase = "before" if record["sent_s"] < lost_at else "after"
        key = f"{phase} {outcome(record)}"
        counts[key] = counts.get(key, 0) + 1
    return {"answers": counts, "slowest_s": max(r["seconds"] for r in serving["records"]),
            "recovered_to_2_replicas_s": serving["recovered_to_2_replicas_s"],
            "bulk_shards_complete_at_loss": report["bulk"].get("shards_complete_at_loss"),
            "bulk_seconds": report["bulk"]["seconds"]}


if __name__ == "__main__":
    main()
