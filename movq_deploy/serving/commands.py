"""The `movq-deploy serve` and `movq-deploy generate` commands (Ray is imported only when they run).

    movq-deploy serve --engine-dir engines/ [--replicas N] [--host 127.0.0.1] [--port 8000] [--address ADDR] [--ui]
    movq-deploy serve --engine-dir engines/ --no-ray      # one process: the same API under uvicorn, no Ray
    movq-deploy generate --engine-dir engines/ --num-images 50000 --seed 0 --out fid-samples/ [--class-labels ...]
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Callable

AddCommand = Callable[[str, Callable, str], argparse.ArgumentParser]


def add_serving_commands(command: AddCommand) -> None:
    """Adds serve and generate through cli's `command(name, function, help)` (engine-dir/backend/precision/batch)."""
    sub = command("serve", serve, "serve the engine directory over HTTP with Ray Serve (see docs/SERVING.md)")
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                     "only; any other address needs --api-key or --no-auth)")
    sub.add_argument("--api-key", default=None, help="bearer token every request must carry (default: "
                     "$MOVQ_API_KEY; prefer the variable: a command line is visible to other users)")
    sub.add_argument("--no-auth", action="store_true", help="serve beyond loopback without a key (a trusted network)")
    sub.add_argument("--port", type=int, default=8000)
    sub.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")
    sub.add_argument("--replicas", type=int, default=1, help="replicas (each: one Generator + one scheduler)")
    sub.add_argument("--min-replicas", type=int, default=None, help="autoscale from this many replicas ...")
    sub.add_argument("--max-replicas", type=int, default=None, help="... to this many")
    sub.add_argument("--target-ongoing-requests", type=float, default=16.0, help="autoscaling target per replica")
    sub.add_argument("--cpus-per-replica", type=float, default=1.0)
    sub.add_argument("--gpus-per-replica", type=float, default=None, help="default: 1 when the cluster has GPUs")
    sub.add_argument("--batching", default="continuous", choices=("continuous", "request", "none"),
                     help="continuous: step-level (default); request: Ray Serve @serve.batch; none: one at a time")
    sub.add_argument("--max-queued-images", type=int, default=256, help="queued images per replica before 503")
    sub.add_argument("--max-request-images", type=int, default=16, help="largest n of one request")
    sub.add_argument("--max-steps", type=int, default=64, help="most steps one request may ask for")
    sub.add_argument("--request-timeout", type=float, default=60.0, help="seconds before a request gets 504")
    sub.add_argument("--max-queue-wait", type=float, default=2.0, help="refuse (503) a request whose estimated wait "
                     "for the engine is longer (seconds; default 2, see docs/SERVING.md)")
    sub.add_argument("--access-log", action="store_true", help="a log line per request (off: it costs CPU)")
    sub.add_argument("--max-replicas-per-node", type=int, default=None,
                     help="e.g. 1: a lost node takes one replica with it, not several")
    sub.add_argument("--no-ray", action="store_true", help="one process without Ray: the same scheduler and API "
                     "under uvicorn (no replicas, no cluster, no metrics export)")
    sub.add_argument("--ui", action="store_true", help="also serve the web page at /ui (needs the ui extra)")

    sub = command("generate", generate, "generate many images on Ray Data into PNG shards with an index")
    sub.add_argument("--num-images", type=int, required=True)
    sub.add_argument("--seed", type=int, required=True, help="image i is sample(seed, i) whatever the workers")
    sub.add_argument("--out", required=True, help="output folder; run the same command again to continue it")
    sub.add_argument("--class-labels", nargs="+", default=None,
                     help="class ids or names, cycled over the images (default: no class)")
    sub.add_argument("--steps", type=int, default=None)
    sub.add_argument("--temperature", type=float, default=None, help="default: the engine directory's")
    sub.add_argument("--choice-temperature", type=float, default=None, help="default: the engine directory's")
    sub.add_argument("--guidance-scale", type=float, default=None,
                     help="classifier-free guidance w (class-conditional models); default: the engine directory's")
    sub.add_argument("--shard-size", type=int, default=1000, help="images per shard folder (default 1000)")
    sub.add_argument("--workers", type=int, default=None, help="Generators (default: one per GPU, else per CPU)")
    sub.add_argument("--cpus-per-worker", type=float, default=1.0)
    sub.add_argument("--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")


def serve(args: argparse.Namespace) -> int:
    from movq_deploy.serving.auth import check_exposure, key_from
    from movq_deploy.serving.service import ServiceConfig

    api_key = key_from(args.api_key)
    check_exposure(args.host, api_key, args.no_auth)
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    service = ServiceConfig(args.engine_dir, backend=args.backend, precision=args.precision,
                            batching=args.batching, capacity=args.batch_size or 64,
                            max_queued_images=args.max_queued_images, max_request_images=args.max_request_images,
                            max_steps=args.max_steps, request_timeout_s=args.request_timeout,
                            max_queue_wait_s=args.max_queue_wait, page=args.ui, threads=args.threads,
                            shared_pool=bool(args.shared_pool), access_log=args.access_log, api_key=api_key)
    _check_engine_dir(args.engine_dir)
    if args.ui and importlib.util.find_spec("gradio") is None:
        raise RuntimeError("--ui needs gradio: pip install 'movq-deploy[ui]'")
    if args.no_ray:
        from movq_deploy.serving.standalone import serve_standalone

        serve_standalone(service, host=args.host, port=args.port)
        return 0
    from movq_deploy.serving.app import ScaleConfig, start

    scale = ScaleConfig(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                        target_ongoing_requests=args.target_ongoing_requests, num_cpus=args.cpus_per_replica,
                        num_gpus=args.gpus_per_replica, max_replicas_per_node=args.max_replicas_per_node)
    start(service, scale, host=args.host, port=args.port, address=args.address, blocking=True)
    return 0


def generate(args: argparse.Namespace) -> int:
    from movq_deploy.serving.bulk import BulkConfig, generate as run

    labels = None
    if args.class_labels is not None:
        labels = [int(label) if label.lstrip("-").isdigit() else label for label in args.class_labels]
    config = BulkConfig(args.engine_dir, args.out, args.num_images, args.seed, labels, args.steps, args.temperature,
                        args.choice_temperature, args.shard_size, args.backend, args.precision, args.batch_size,
                        args.guidance_scale)
    _check_engine_dir(args.engine_dir)
    with _progress_bar(config.num_shards) as progress:
        index = run(config, workers=args.workers, cpus_per_worker=args.cpus_per_worker, address=args.address,
                    progress=progress)
    print(f"{config.num_images} images in {config.num_shards} shard(s) -> {args.out} (index: {index})")
    return 0


def _check_engine_dir(engine_dir: str) -> None:
    from movq_deploy.manifest import EngineDir

    EngineDir.load(engine_dir)  # a one-line error here, before Ray starts


class _progress_bar:
    """progress(done, total) over shards: a tqdm bar when tqdm is installed, else a line per shard."""

    def __init__(self, total: int):
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, desc="shards", unit="shard", file=sys.stderr) if tqdm else None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        else:
            print(f"shards: {done}/{total}", file=sys.stderr, flush=True)

