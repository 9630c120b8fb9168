"""The HTTP load of the serving benchmarks (serve_overload.py, serve_profile.py): n=1 requests, each answer recorded
with its status, its seconds at the client and the server's Server-Timing (queue and engine milliseconds); open-loop
Poisson arrivals or a closed loop of concurrent clients; and the service without Ray started as a user starts it.

The client is aiohttp (a dependency of Ray Serve), several times cheaper per request than httpx: at a few hundred
requests per second on a small machine an httpx client saturates its own core and measures itself. Each run also
reports the client's CPU seconds per request, to show how much of the machine it took.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import numpy as np


@dataclass(frozen=True)
class Answer:
    status: Optional[int]  # None: no answer (a connection error or the client's timeout: `error`)
    seconds: float  # at the client, from sending to the whole answer
    queue_ms: Optional[float] = None  # Server-Timing: waiting for the engine
    engine_ms: Optional[float] = None  # Server-Timing: in the engine
    error: Optional[str] = None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _timing(header: Optional[str]) -> "tuple[Optional[float], Optional[float]]":
    if not header:
        return None, None
    parts = dict(part.strip().split(";dur=") for part in header.split(",") if ";dur=" in part)
    return float(parts.get("queue", "nan")), float(parts.get("engine", "nan"))


async def one(session, url: str, body: dict, timeout: float) -> Answer:
    """One POST of `body` on an aiohttp session, read to its end."""
    import aiohttp

    started = time.perf_counter()
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            await response.read()
            status, timing = response.status, response.headers.get("server-timing")
    except Exception as error:  # noqa: BLE001 - an answer that did not come is recorded as such
        return Answer(None, time.perf_counter() - started, error=type(error).__name__)
    queue_ms, engine_ms = _timing(timing)
    return Answer(status, time.perf_counter() - started, queue_ms, engine_ms)


def session():
    """An aiohttp session without a connection limit (open loop: every arrival is sent at once)."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))


def body_of(seed: int, format: str) -> dict:
    return {"n": 1, "seed": seed, "format": format}


async def open_loop(url: str, rate: float, seconds: float, timeout: float, seed: int,
                    format: str = "png") -> "tuple[List[Answer], float]":
    """Poisson arrivals at `rate`/s for `seconds`, whatever the answers; (answers, seconds until the last one)."""
    rng = np.random.default_rng(seed)
    async with session() as client:
        tasks, started, arrival = [], time.perf_counter(), 0.0
        while True:
            arrival += rng.exponential(1.0 / rate)
            if arrival > seconds:
                break
            await asyncio.sleep(max(0.0, started + arrival - time.perf_counter()))
            tasks.append(asyncio.create_task(one(client, url, body_of(seed * 1_000_003 + len(tasks), format),
                                                 timeout)))
        answers = list(await asyncio.gather(*tasks))
    return answers, time.perf_counter() - started


async def closed_loop(url: str, clients: int, seconds: float, timeout: float, seed: int,
                      format: str = "png") -> "tuple[List[Answer], float]":
    """`clients` clients sending back to back for `seconds`: the saturated rate; (answers, seconds)."""
    answers, deadline = [], time.perf_counter() + seconds

    async def client_loop(client, index: int):
        sent = 0
        while time.perf_counter() < deadline:
            answers.append(await one(client, url, body_of(seed * 1_000_003 + index * 100_000 + sent, format),
                                     timeout))
            sent += 1

    started = time.perf_counter()
    async with session() as client:
        await asyncio.gather(*(client_loop(client, i) for i in range(clients)))
    return answers, time.perf_counter() - started


def run(coroutine):
    """asyncio.run on uvloop where it is installed (as uvicorn and Ray's proxy run), with the client's CPU seconds:
    (the coroutine's result, CPU seconds this process spent)."""
    try:
        import uvloop
    except ImportError:
        uvloop = None
    cpu = time.process_time()
    result = uvloop.run(coroutine) if uvloop is not None else asyncio.run(coroutine)
    return result, time.process_time() - cpu


def percentile(values, q: float) -> float:
    values = [v for v in values if v is not None and np.isfinite(v)]
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(answers: List[Answer], seconds: float, client_cpu_s: float) -> dict:
    """Goodput (images answered 200 per second of the run), counts, the latencies of 200s and of 503s (ms), and the
    client's CPU per request (ms) and share of one core."""
    ok = [a for a in answers if a.status == 200]
    refused = [a for a in answers if a.status == 503]
    return {
        "client_cpu_ms_per_request": client_cpu_s * 1e3 / max(1, len(answers)),
        "client_cpu_share_of_a_core": client_cpu_s / seconds,
        "requests": len(answers), "ok": len(ok), "refused_503": len(refused),
        "other_status": sum(1 for a in answers if a.status not in (200, 503, None)),
        "no_answer": sum(1 for a in answers if a.status is None),
        "goodput_images_per_s": len(ok) / seconds,
        "ok_p50_ms": percentile([a.seconds * 1e3 for a in ok], 50),
        "ok_p99_ms": percentile([a.seconds * 1e3 for a in ok], 99),
        "refused_p99_ms": percentile([a.seconds * 1e3 for a in refused], 99),
        "queue_p99_ms": percentile([a.queue_ms for a in ok], 99),
        "engine_p99_ms": percentile([a.engine_ms for a in ok], 99),
    }


class StandaloneServer:
    """`movq-deploy serve --no-ray` in its own process (its own session: stopped with its children), on 127.0.0.1."""

    def __init__(self, engine_dir: str, port: int, *args: str):
        root = Path(__file__).resolve().parent.parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "movq_deploy.cli", "serve", "--no-ray", "--engine-dir", engine_dir, "--port",
             str(port), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)

    def wait_ready(self, timeout: float = 180.0) -> "StandaloneServer":
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server without Ray exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server without Ray did not answer within {timeout:.0f} s")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(30)
