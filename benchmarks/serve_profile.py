"""What one request costs, part by part: CPU milliseconds per n=1 request of the service at saturation, on 127.0.0.1.

    python benchmarks/serve_profile.py [--engine-dir runs/demo/engines] [--seconds 10] [--clients 64]

Per server variant (the Ray Serve service with and without access logs, and the same API in one process without
Ray), a closed loop of --clients concurrent n=1 `format: "png"` clients for --seconds, while
- psutil reads the CPU seconds of each process (Ray's proxy, the replica, the controller; the server without Ray);
- py-spy samples the proxy's and the replica's thread that holds the GIL (--rate per second), and each sample is put
  in one part by the frames on its stack (PARTS, first match wins): Python's CPU time, part by part. What a process
  spends without the GIL (ONNX Runtime's calls and its worker threads, above all) is its CPU minus those samples,
  counted to the engine in the replica.
The "refusing" variants measure what a refused request costs: one engine slot (capacity 1), always busy with a long
request, and a limit on the wait far below one image's time, so that the closed loop's requests are refused (by the
replica before reading them, or by the proxy meanwhile, or, "+no-shed", by the replica only). Also, in this process:
the CPU of PNG encoding, base64 and the JSON answer of one image of this model, measured alone. Writes results.json
and table.md to --out; per request = CPU seconds / answered requests (any status).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.http_load import (StandaloneServer, closed_loop, free_port, one, run, session,  # noqa: E402
                                  summarize)
from benchmarks.machine import load_average, serving_report, usable_cores  # noqa: E402

# (part, substrings of a py-spy stack: any of them puts a sample in the part). The first part that matches wins, so
# the specific ones come first: a PNG encoded under the FastAPI route is PNG, not ingress.
PARTS = [
    ("logging", ("logging/__init__.py", "logging/handlers.py", "logging_utils.py")),
    ("PNG", ("PngImagePlugin.py", "ImageFile.py", "_png (movq_deploy/serving/api.py")),
    ("base64", ("base64.py",)),
    ("JSON", ("json/encoder.py", "json/__init__.py", "render (starlette/responses.py", "jsonable_encoder")),
    ("engine: prior steps", ("_step (movq_deploy/serving/scheduler.py",)),
    ("engine: decode", ("_decode (movq_deploy/serving/scheduler.py",)),
    ("engine: admission, noise, loop", ("movq_deploy/serving/scheduler.py",)),
    ("thread handoffs (futures, call_soon_threadsafe)", ("wrap_future", "concurrent/futures", "call_soon_threadsafe")),
    ("ingress: FastAPI, Starlette, pydantic", ("fastapi/", "starlette/", "pydantic", "movq_deploy/serving/")),
    ("HTTP server: uvicorn, h11, httptools", ("uvicorn/", "h11/", "httptools")),
    ("Ray Serve (proxy, router, replica wrapper)", ("ray/serve/",)),
    ("Ray core (RPC, serialization)", ("ray/_private/", "ray/_raylet", "_raylet.pyx", "cloudpickle", "ray/util/")),
    ("asyncio event loop", ("asyncio/", "uvloop")),
]
NATIVE = "without the GIL (engine: ONNX Runtime calls and threads)"
VARIANTS = {
    "ray": "Ray Serve, access logs off (the default)",
    "ray+access-log": "Ray Serve, access logs on",
    "ray+one-loop": "Ray Serve, user code and router on Ray's own event loops",
    "ray+throughput-optimized": "Ray Serve, RAY_SERVE_THROUGHPUT_OPTIMIZED=1",
    "no-ray": "one uvicorn process, no Ray",
    "refusing": "Ray Serve refusing, the proxy shedding (the default)",
    "refusing+no-shed": "Ray Serve refusing, in the replica only",
    "refusing-no-ray": "one uvicorn process, no Ray, refusing",
}
REFUSING = {"capacity": 1, "max_queue_wait_s": 0.001}  # with one long request in the engine, the rest is refused
BLOCKER = {"n": 1, "steps": 64}
# The Ray nodes' environment of a variant (read by Ray Serve's proxy and replicas when they start).
VARIANT_ENV = {
    "ray+one-loop": {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"},
    "ray+throughput-optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "refusing+no-shed": {"MOVQ_PROXY_MAX_SHED_S": "0"},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir", default="runs/demo/engines")
    parser.add_argument("--variants", default="ray,ray+access-log,no-ray,refusing,refusing+no-shed,refusing-no-ray",
                        help=", ".join(VARIANTS))
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of profiled saturation per variant")
    parser.add_argument("--warmup-seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--out", default="runs/serve_profile")
    return parser.parse_args(argv)


# ---- attributing samples --------------------------------------------------------------------------------------

def part_of(stack: str) -> str:
    return next((part for part, needles in PARTS if any(needle in stack for needle in needles)), "other Python")


def sampled_seconds(raw: Path, rate: int) -> Counter:
    """{part: seconds} from py-spy's raw output (one `frame;frame;... count` line per distinct stack)."""
    seconds = Counter()
    if not raw.is_file():
        return seconds
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            seconds[part_of(stack)] += int(count) / rate
    return seconds


class Sampler:
    """py-spy on the GIL holder of some processes for `seconds` (non-blocking: they are not paused), in the
    background."""

    def __init__(self, pids: dict, seconds: float, rate: int, workdir: Path):
        self.py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.outputs = {name: workdir / f"{name}.pyspy.txt" for name in pids}
        self.runs = [subprocess.Popen([self.py_spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r",
                                       str(rate), "-f", "raw", "-o", str(self.outputs[name]), "--nonblocking",
                                       "--gil"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                     for name, pid in pids.items()] if Path(self.py_spy).exists() else []

    def wait(self) -> None:
        for process in self.runs:
            process.wait(120)


def cpu_seconds(pids: dict) -> dict:
    import psutil

    times = {}
    for name, pid in pids.items():
        cpu = psutil.Process(pid).cpu_times()
        times[name] = cpu.user + cpu.system
    return times


# ---- the servers ----------------------------------------------------------------------------------------------

class RayVariant:
    def __init__(self, engine_dir: str, access_log: bool, cores: int, **service):
        import ray
        from ray import serve

        from movq_deploy.serving.app import RAY_NODE_ENV, ScaleConfig, build_app, logging_config
        from movq_deploy.serving.service import ServiceConfig

        os.environ.update(RAY_NODE_ENV)
        ray.init(address="local", num_cpus=cores, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False)
        config = ServiceConfig(engine_dir, access_log=access_log, **service)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config=logging_config(config))
        serve.run(build_app(config, ScaleConfig(replicas=1, num_cpus=cores)), name="movq", route_prefix="/")
        self.url = f"http://127.0.0.1:{port}"
        self.pids = _ray_pids()

    def stop(self) -> None:
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def _ray_pids() -> dict:
    """The proxy's, the replica's and the controller's processes: children of this Ray's raylet, by process title."""
    import psutil
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    titles = {"proxy": "ray::ProxyActor", "replica": "ray::ServeReplica", "controller": "ray::ServeController"}
    pids = {}
    for child in psutil.Process(raylet).children(recursive=True):
        name = next((key for key, title in titles.items() if child.name().startswith(title)), None)
        if name is not None:
            pids[name] = child.pid
    return pids


class NoRayVariant(StandaloneServer):
    def __init__(self, engine_dir: str, *args: str):
        super().__init__(engine_dir, free_port(), *args)
        self.wait_ready()
        self.pids = {"server": self.process.pid}


# ---- one variant ------------------------------------------------------------------------------------------------

def profile(name: str, args, engine_dir: str, cores: int, workdir: Path) -> dict:
    refusing = name.startswith("refusing")
    saved = dict(os.environ)
    os.environ.update(VARIANT_ENV.get(name, {}))
    try:
        if name.endswith("no-ray"):
            flags = ["--batch-size", "1", "--max-queue-wait", str(REFUSING["max_queue_wait_s"])] if refusing else []
            server = NoRayVariant(engine_dir, *flags)
        else:
            server = RayVariant(engine_dir, "access-log" in name, cores, **(REFUSING if refusing else {}))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    url = f"{server.url}/v1/sample"

    async def load(seconds: float, seed: int):
        if not refusing:
            return await closed_loop(url, args.clients, seconds, args.timeout, seed)
        answers, elapsed = (await asyncio.gather(closed_loop(url, args.clients, seconds, args.timeout, seed),
                                                 keep_busy(url, seconds, args.timeout)))[0]
        return answers, elapsed

    try:
        run(load(args.warmup_seconds, 1))
        before = cpu_seconds(server.pids)
        sampler = Sampler({k: v for k, v in server.pids.items() if k != "controller"}, args.seconds, args.rate,
                          workdir / name)
        (answers, seconds), client_cpu = run(load(args.seconds, 2))
        after = cpu_seconds(server.pids)
        sampler.wait()
    finally:
        server.stop()
    load = summarize(answers, seconds, client_cpu)
    answered = max(1, len(answers) - load["no_answer"])
    per_request = {process: (after[process] - before[process]) * 1e3 / answered for process in before}
    parts = {}
    for process, raw in sampler.outputs.items():
        sampled = sampled_seconds(raw, args.rate)
        ms = {part: value * 1e3 / answered for part, value in sampled.items()}
        ms[NATIVE] = per_request[process] - sum(ms.values())  # < 0 would say the samples overcount
        parts[process] = dict(sorted(ms.items(), key=lambda item: -item[1]))
    return {"load": load, "cpu_ms_per_request": per_request, "parts_ms_per_request": parts,
            "sampled": bool(sampler.runs)}


async def keep_busy(url: str, seconds: float, timeout: float) -> None:
    """Long requests back to back for `seconds`: the engine's one slot stays taken."""
    deadline = time.perf_counter() + seconds
    async with session() as client:
        while time.perf_counter() < deadline:
            await one(client, url, {**BLOCKER, "seed": 0}, timeout)


def encoding_costs(engine_dir: str, repeats: int = 200) -> dict:
    """CPU ms of PNG encoding, base64 and the JSON answer of one image of this model, in this process."""
    from starlette.responses import JSONResponse

    from movq_deploy.generator import Generator
    from movq_deploy.serving.api import _png

    image = Generator(engine_dir, backend="onnxruntime-cpu").sample(n=1, seed=0, output_type="np")[0]

    def timed(work) -> float:
        work()
        start = time.process_time()
        for _ in range(repeats):
            work()
        return (time.process_time() - start) * 1e3 / repeats

    png = _png(image)
    encoded = base64.b64encode(png).decode("ascii")
    return {"image": list(image.shape), "png_bytes": len(png), "png_ms": timed(lambda: _png(image)),
            "base64_ms": timed(lambda: base64.b64encode(png).decode("ascii")),
            "json_response_ms": timed(lambda: JSONResponse({"seed": 0, "n": 1, "images": [encoded]}).body)}


def table(report: dict) -> str:
    lines = []
    for name, result in report["variants"].items():
        load = result["load"]
        lines += [f"**{VARIANTS[name]}**: {load['ok']} requests answered 200 ({load['goodput_images_per_s']:.1f} "
                  f"images/s), {load['refused_503']} answered 503 (p99 {load['refused_p99_ms']:.0f} ms) (client: "
                  f"{load['client_cpu_ms_per_request']:.2f} ms CPU per request).", "",
                  "| process | part | CPU ms per request |", "| --- | --- | ---: |"]
        for process, total in result["cpu_ms_per_request"].items():
            lines.append(f"| {process} | **all** | **{total:.2f}** |")
            for part, ms in result["parts_ms_per_request"].get(process, {}).items():
                lines.append(f"| {process} | {part} | {ms:.2f} |")
        lines.append("")
    costs = report["encoding"]
    lines.append(f"Alone, in one process, one {costs['image'][0]}x{costs['image'][1]} image: PNG {costs['png_ms']:.3f} "
                 f"ms ({costs['png_bytes']} bytes), base64 {costs['base64_ms']:.3f} ms, JSON answer "
                 f"{costs['json_response_ms']:.3f} ms.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    engine_dir = str(Path(args.engine_dir).resolve())
    cores = usable_cores()
    report = {**serving_report("benchmarks/serve_profile.py", engine_dir, cores),
              "encoding": encoding_costs(engine_dir), "variants": {}}
    for name in args.variants.split(","):
        if name not in VARIANTS:
            raise ValueError(f"--variants takes {', '.join(VARIANTS)}, got {name!r}")
        print(f"{VARIANTS[name]} ...", flush=True)
        (out / name).mkdir(exist_ok=True)
        report["variants"][name] = profile(name, args, engine_dir, cores, out)
        time.sleep(1.0)
    report["load_after"] = load_average()
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "table.md").write_text(table(report))
    print(table(report))
    return report


if __name__ == "__main__":
    main()
