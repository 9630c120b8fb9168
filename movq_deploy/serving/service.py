"""What one replica serves: a Generator behind one of three batching modes, called from asyncio.

- "continuous": step-level continuous batching (scheduler.py), the default;
- "request": request-level dynamic batching with Ray Serve's @serve.batch (the conventional way), for comparison;
- "none": one request at a time, for comparison.

Each mode bounds what it holds and refuses the rest at once with `Overloaded`; "continuous" also admits by deadline
(a request whose estimated wait exceeds max_queue_wait_s is refused). No Ray is needed except for "request".
"""
from __future__ import annotations

import asyncio
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from movq_deploy.generator import Generator
from movq_deploy.sampling import check_seed
from movq_deploy.serving.scheduler import EngineMetrics, Job, Overloaded, Scheduler, SchedulerConfig
from movq_deploy.serving.steps import SampleArgs, sample_batch

BATCHING_MODES = ("continuous", "request", "none")


@dataclass(frozen=True)
class ServiceConfig:
    """Everything a replica needs; fixed when the service starts (requests never name files)."""

    engine_dir: str
    backend: str = "auto"
    precision: str = "auto"
    batching: str = "continuous"
    capacity: int = 64  # images per prior call (continuous), images per @serve.batch batch (request)
    max_queued_images: int = 256  # waiting images beyond this are refused with 503
    max_request_images: int = 16  # n above this is refused with 400
    max_steps: int = 64  # steps above this are refused with 400 (a request's cost grows with its steps)
    request_timeout_s: float = 60.0  # a request still unanswered then gets 504, and its images are dropped
    # A request whose estimated wait for the engine is longer is refused at once with 503 (continuous batching;
    # None: only max_queued_images bounds the queue). Why 2 s: docs/SERVING.md, "Admission by deadline".
    max_queue_wait_s: Optional[float] = 2.0
    batch_wait_timeout_s: float = 0.02  # @serve.batch's wait for a fuller batch ("request" mode)
    max_body_bytes: int = 8 * 2**20  # larger request bodies get 413
    retry_after_s: int = 1  # the Retry-After of a 503 where nothing better is known (Ray Serve's router queue full;
    # the "request" and "none" modes)
    page: bool = False  # also serve the web page at /ui over this service (needs the ui extra: gradio)
    threads: Optional[int] = None  # ONNX Runtime threads per replica (default: the physical cores)
    # One process-wide ONNX Runtime pool per replica process (`serve --shared-pool`). Off by default: under serving
    # load its spinning workers take the cores from the proxy and the request handling (2 cores: 12% fewer images/s
    # at saturation, 2.3x the p99 near it; BENCHMARKS.md); turn it on where a replica has its cores to itself.
    shared_pool: bool = False
    access_log: bool = False  # Ray Serve's access log line per request (off: it costs CPU on the request path)
    api_key: Optional[str] = field(default=None, repr=False)  # bearer token every request must carry (auth.py)

    def __post_init__(self):
        if self.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {', '.join(BATCHING_MODES)}, got {self.batching!r}")
        for name in ("capacity", "max_queued_images", "max_request_images", "max_steps", "max_body_bytes",
                     "retry_after_s"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s!r}")
        if self.max_queue_wait_s is not None and not self.max_queue_wait_s > 0:
            raise ValueError(f"max_queue_wait_s must be > 0 (or None), got {self.max_queue_wait_s!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key is empty: give a key, or none")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Served:
    """An answered request: its images uint8 [n,H,W,3], the seed used, and where its time went (seconds): waiting
    for the engine, then in it (None where the batching mode does not tell them apart)."""

    images: np.ndarray
    seed: int
    queue_s: Optional[float] = None
    engine_s: Optional[float] = None

    @classmethod
    def of_job(cls, images: np.ndarray, job: Job) -> "Served":
        if job.started_at is None or job.answered_at is None:
            return cls(images, job.seed)
        return cls(images, job.seed, job.started_at - job.submitted_at, job.answered_at - job.started_at)


class ImageService:
    """One Generator and its batching; `await sample(...)` / `await edit(...)` -> Served.

    metrics: what the scheduler and the API report (serving/metrics.py exports them from a Ray Serve replica).
    """

    def __init__(self, config: ServiceConfig, metrics: Optional[EngineMetrics] = None):
        self.config = config
        self.metrics = metrics or EngineMetrics()
        self.generator = Generator(config.engine_dir, backend=config.backend, precision=config.precision,
                                   threads=config.threads, shared_pool=config.shared_pool)
        self.generator.warm_up()  # every graph open before the first request: none waits for a compilation
        self.scheduler: Optional[Scheduler] = None
        self._held_images = 0  # images accepted and not answered yet ("request" and "none" modes)
        self._lock = asyncio.Lock()  # "none" mode, and edits in "request" mode: one engine call sequence at a time
        if config.batching == "continuous":
            scheduler_config = SchedulerConfig(capacity=config.capacity, max_queued_images=config.max_queued_images,
                                               max_request_images=config.max_request_images,
                                               max_queue_wait_s=config.max_queue_wait_s)
            self.scheduler = Scheduler(self.generator, scheduler_config, self.metrics).start()
        elif config.batching == "request":
            from ray import serve  # only this mode needs Ray

            async def run_batch(batch: "list[SampleArgs]") -> "list[np.ndarray]":
                return await asyncio.to_thread(sample_batch, self.generator, batch)

            self._batched = serve.batch(max_batch_size=config.capacity,
                                        batch_wait_timeout_s=config.batch_wait_timeout_s)(run_batch)

    def info(self) -> dict:
        generator = self.generator
        info = {
            "model": generator.engine_dir.model,  # the tokenizer and prior configs
            "image_size": generator.image_size,
            "grid": dict(zip("hwc", generator.grid)),
            "codebook_size": generator.codebook_size,
            "num_classes": generator.num_classes,
            "class_names": generator.class_names,
            "default_steps": generator.default_steps,
            "guidance": generator.no_guidance is None,  # whether guidance_scale may be other than 0
            "backend": generator.backend_name,
            "precision": generator.precision,
            "batching": self.config.batching,
            "max_request_images": self.config.max_request_images,
            "max_steps": self.config.max_steps,
            "pid": os.getpid(),
        }
        if self.scheduler is not None:
            info["scheduler"] = self.scheduler.stats()
        return info

    def healthy(self) -> bool:
        return self.scheduler is None or self.scheduler.alive

    def refusal(self) -> Optional[Overloaded]:
        """What any new request would get now if the engine cannot take even one image in time, else None."""
        return None if self.scheduler is None else self.scheduler.refusal()

    async def sample(self, n: int = 1, seed: Optional[int] = None, class_labels=None, steps: Optional[int] = None,
                     temperature=None, choice_temperature=None, guidance_scale=None,
                     timeout_s: Optional[float] = None) -> Served:
        """timeout_s: how long the caller waits (default and most: config.request_timeout_s)."""
        self._check_steps(steps)
        timeout_s = self._timeout(timeout_s)
        if self.scheduler is not None:
            job = self.scheduler.submit_sample(n, steps, seed, class_labels, temperature, choice_temperature,
                                               guidance_scale, timeout_s=timeout_s)
            return Served.of_job(await self._bounded(job.wait(), timeout_s), job)
        args = self._sample_args(n, seed, class_labels, steps, temperature, choice_temperature, guidance_scale)
        with self._holding(args.n):
            if self.config.batching == "request":
                return Served(await self._bounded(self._batched(args), timeout_s), args.options.seed)
            async with self._lock:
                images = await self._bounded(asyncio.to_thread(sample_batch, self.generator, [args]), timeout_s)
            return Served(images[0], args.options.seed)

    async def edit(self, images: np.ndarray, masks: np.ndarray, seed: Optional[int] = None, class_labels=None,
                   steps: Optional[int] = None, temperature=None, choice_temperature=None,
                   paste_original: bool = False, feather: int = 2, guidance_scale=None,
                   timeout_s: Optional[float] = None) -> Served:
        self._check_steps(steps)
        timeout_s = self._timeout(timeout_s)
        kwargs = dict(steps=steps, class_labels=class_labels, temperature=temperature,
                      choice_temperature=choice_temperature, paste_original=paste_original, feather=feather,
                      guidance_scale=guidance_scale)
        if self.scheduler is not None:
            job = self.scheduler.submit_edit(images, masks, seed=seed, timeout_s=timeout_s, **kwargs)
            return Served.of_job(await self._bounded(job.wait(), timeout_s), job)
        seed = check_seed(seed)
        with self._holding(self.check_count(len(images))):
            async with self._lock:
                call = asyncio.to_thread(self.generator.edit, images, masks, seed=seed, output_type="np", **kwargs)
                return Served(await self._bounded(call, timeout_s), seed)

    def _timeout(self, timeout_s: Optional[float]) -> float:
        """The caller's timeout, at most the server's; ValueError for one that is not a positive number."""
        if timeout_s is None:
            return self.config.request_timeout_s
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"the request timeout must be a positive number of seconds, got {timeout_s!r}")
        return min(float(timeout_s), self.config.request_timeout_s)

    async def _bounded(self, awaitable, timeout_s: float):
        """Awaits with the request's timeout; a timed-out request is cancelled (its images dropped) and gets 504."""
        try:
            return await asyncio.wait_for(awaitable, timeout_s)
        except asyncio.TimeoutError:
            raise TimeoutError(f"the request took longer than {timeout_s:g} s") from None

    def _sample_args(self, n, seed, class_labels, steps, temperature, choice_temperature,
                     guidance_scale) -> SampleArgs:
        n = self.check_count(n)
        return SampleArgs(n, self.generator.sampling_options(n, steps, seed, class_labels, temperature,
                                                             choice_temperature, guidance_scale))

    def check_count(self, n) -> int:
        """n as an int in [1, max_request_images], or ValueError."""
        limit = self.config.max_request_images
        if not (isinstance(n, int) and not isinstance(n, bool) and 0 < n <= limit):
            raise ValueError(f"n must be an int in [1, {limit}], got {n!r}")
        return n

    def _check_steps(self, steps) -> None:
        if steps is not None and isinstance(steps, int) and steps > self.config.max_steps:
            raise ValueError(f"steps must be at most {self.config.max_steps} on this server, got {steps}")

    def _holding(self, n: int) -> "_Holding":
        if self._held_images + n > self.config.max_queued_images:
            self.metrics.refused("overload")
            raise Overloaded(f"overloaded: {self._held_images} images already queued (limit "
                             f"{self.config.max_queued_images}); retry later", "overload", self.config.retry_after_s)
        return _Holding(self, n)

    def close(self) -> None:
        if self.scheduler is not None:
            self.scheduler.close()


class _Holding:
    """Counts a request's images as held while it is served (the bound of the "request" and "none" modes)."""

    def __init__(self, service: ImageService, n: int):
        self.service, self.n = service, n
        service._held_images += n

    def __enter__(self) -> "_Holding":
        return self

    def __exit__(self, *exc) -> None:
        self.service._held_images -= self.n
