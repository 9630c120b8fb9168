"""Step-level continuous batching: images of different requests share every prior-step call, each at its own step.

MaskGIT decoding is a fixed number of steps, and each image carries its own schedule and noise (movq_deploy.sampling),
so nothing ties an image to the other images of its batch. The scheduler keeps up to `capacity` images *active*; one
engine loop (a thread) repeats:

1. admit waiting images (first in, first out) into the free slots, at the step boundary;
2. advance every active image by one step in one prior call (the graph takes a temperature and a confidence-noise
   scale per row; rows with a guidance scale w != 0 go to the guided prior graph in the same step, so a step is at
   most two calls);
3. decode the images that finished their T steps, in batches.

Requests come in from any thread or from asyncio (`Job.wait`), and get a concurrent.futures.Future. Admission is by
deadline: the loop keeps exponential averages of what a prior call costs per image row and what decoding costs per
image (EngineCosts), and a request whose estimated wait for its slots exceeds `max_queue_wait_s`, or that could not
be answered within its own timeout, is refused at once with `Overloaded`, with a retry delay from the same estimate.
Waiting images are also bounded in number (memory). A request that is cancelled (its client has gone) or whose
timeout has passed is dropped at the next step boundary; one still waiting never reaches an engine call. The
invariant: a served image equals `Generator.sample` (or `edit`) with the same seed and image index, bit for bit,
whatever shared its batches.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional

import numpy as np

from movq_deploy import sampling
from movq_deploy.generator import Generator
from movq_deploy.images import paste_outside_mask, to_bool_masks, to_uint8_images
from movq_deploy.serving.steps import of_image

logger = logging.getLogger("movq_deploy")


REFUSAL_REASONS = ("overload", "deadline", "bad_request")  # the reasons a request is refused, as metrics count them
SMOOTHING = 0.1  # weight of the newest engine call in the averaged costs: about the last 10 calls count


# Once a new image would wait past max_queue_wait_s, the early refusal refuses everything for at least this share of
# it (Scheduler.refusal): the queue drains by that much, and the excess is refused at the cheapest point meanwhile.
SHED_SHARE = 0.1


class Overloaded(RuntimeError):
    """Refused at once; the same request would be refused for about `retry_after_s` more seconds, the queue's own
    estimate (HTTP 503 with Retry-After, whole seconds, at least 1). `reason`: "overload" (the queue holds as many
    images as it may) or "deadline" (the estimated wait exceeds max_queue_wait_s, or the request's own timeout)."""

    def __init__(self, message: str, reason: str = "overload", retry_after_s: float = 1.0):
        super().__init__(message)
        self.reason, self.retry_after_s = reason, retry_after_s

    @property
    def retry_after_header(self) -> str:
        return str(max(1, math.ceil(self.retry_after_s)))


class EngineMetrics:
    """What the scheduler reports as it runs, for an exporter (serving/metrics.py); these no-ops report nothing.
    Called from the engine loop (prior_call, decode_call, served, occupancy) and from submitters (refused)."""

    def prior_call(self, rows: int, seconds: float) -> None:
        """One prior-step call of `rows` images took `seconds`."""

    def decode_call(self, images: int, seconds: float) -> None:
        """One decoder call of `images` images took `seconds`."""

    def served(self, images: int) -> None:
        """A request's `images` were answered."""

    def refused(self, reason: str) -> None:
        """A request was refused (one of REFUSAL_REASONS)."""

    def occupancy(self, queued_images: int, active_images: int) -> None:
        """The images waiting for a slot and the images in slots, now."""


@dataclass(frozen=True)
class SchedulerConfig:
    capacity: int = 64  # active images = the prior's batch (DEFAULT_PRIOR_BATCH fills the CPU)
    max_queued_images: int = 256  # waiting images beyond this are refused (Overloaded): memory stays bounded
    max_request_images: int = 64  # the most images one request may ask for
    decode_batch: int = 16  # images per decoder call (DEFAULT_IMAGE_BATCH)
    max_decode_wait_steps: int = 2  # a finished image waits at most this many prior calls for a fuller decode batch
    # A request whose estimated wait for its slots is longer is refused at once (None: no deadline, only the bound
    # on queued images). Why 2 s: docs/SERVING.md, "Admission by deadline".
    max_queue_wait_s: Optional[float] = 2.0

    def __post_init__(self):
        for name in ("capacity", "max_queued_images", "max_request_images", "decode_batch"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.max_request_images > self.max_queued_images:
            raise ValueError(f"max_request_images ({self.max_request_images}) must not exceed max_queued_images "
                             f"({self.max_queued_images}): such a request could never be queued")
        if self.max_decode_wait_steps < 0:
            raise ValueError(f"max_decode_wait_steps must be >= 0, got {self.max_decode_wait_steps}")
        if self.max_queue_wait_s is not None and not self.max_queue_wait_s > 0:
            raise ValueError(f"max_queue_wait_s must be > 0 (or None), got {self.max_queue_wait_s!r}")


@dataclass
class Job:
    """One request: `future` resolves to uint8 [n,H,W,3] (or raises); `seed` is the one used (drawn if not given).
    The times (time.monotonic) say where it spent its time: submitted, first image in a slot, answered."""

    kind: str  # "sample" | "edit"
    n: int
    seed: int
    future: Future = field(default_factory=Future, repr=False)
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: Optional[float] = None
    answered_at: Optional[float] = None

    async def wait(self) -> np.ndarray:
        """Awaits the images from asyncio; cancelling the await drops the job's images at the next step boundary."""
        return await asyncio.wrap_future(self.future)


@dataclass(eq=False)
class _Request:
    job: Job
    options: sampling.SamplingOptions  # checked: steps, seed, class ids, temperatures (one or one per image)
    slot_mask: np.ndarray  # bool [n, N]: True = to generate (all True for a sample)
    pixels: Optional[np.ndarray] = None  # uint8 [n,H,W,3], edits only (encoded when first admitted)
    pixel_masks: Optional[np.ndarray] = None  # bool [n,H,W], edits only
    paste_original: bool = False
    feather: int = 2
    tokens: Optional[np.ndarray] = None  # int32 [n, N]: mask id where to generate, known tokens elsewhere
    images: Optional[np.ndarray] = None  # uint8 [n,H,W,3], filled as images are decoded
    admitted: int = 0  # images handed to the engine so far (in order)
    remaining: int = 0  # images not decoded yet
    expires_at: float = math.inf  # time.monotonic() after which nobody waits for the answer

    @property
    def dropped(self) -> bool:
        return self.job.future.done()  # cancelled by the caller, or failed


@dataclass(eq=False)
class _Image:
    """One image in flight: its own tokens, schedule, noise, step count, temperatures and class label."""

    request: _Request
    position: int  # index within its request: the noise stream (seed, position)
    tokens: np.ndarray  # int32 [N]
    counts: np.ndarray  # int64 [T]: re-masked slots after each step
    uniform: np.ndarray  # f32 [T, N]
    gumbel: np.ndarray  # f32 [T, N]
    temperature: float  # of the token draw
    choice_temperature: float  # of the confidence noise
    guidance_scale: float  # classifier-free guidance w; 0 = unguided
    label: Optional[int]  # prior class id, None for an unconditional prior
    step: int = 0
    finished_at: int = 0  # the prior call count when it finished (for the decode wait)


class Scheduler:
    """Continuous batching over one Generator; `start()` runs the engine loop in a daemon thread."""

    def __init__(self, generator: Generator, config: SchedulerConfig = SchedulerConfig(),
                 metrics: Optional[EngineMetrics] = None):
        self.generator = generator
        self.config = config
        self.metrics = metrics or EngineMetrics()
        self.costs = EngineCosts()
        self._prior_step = generator.prior_step_fn()
        self._waiting: Deque[_Request] = collections.deque()
        self._queued_images = 0  # images of waiting requests not admitted yet
        self._refusing_until = 0.0  # time.monotonic() before which refusal() refuses every new request
        self._queued_steps = 0  # their steps, summed
        self._active: List[_Image] = []
        self._finished: Deque[_Image] = collections.deque()
        self._prior_calls = 0
        self._stats: Dict[str, int] = collections.Counter()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    # ---------------------------------------------------------------------------------------------- requests
    def submit_sample(self, n: int = 1, steps: Optional[int] = None, seed: Optional[int] = None, class_labels=None,
                      temperature=None, choice_temperature=None, guidance_scale=None,
                      timeout_s: Optional[float] = None) -> Job:
        """Queues n new images; image i equals `Generator.sample(n, seed=seed, ...)[i]` (same steps, labels...).

        timeout_s: how long the caller waits for the answer; a request that cannot be answered within it is refused,
        and once it has passed the request's images are dropped (TimeoutError) before they take an engine call.
        """
        n = self._check_count(n)
        slot_mask = np.ones((n, self.generator.num_slots), dtype=bool)
        return self._submit("sample", n, steps, seed, class_labels, temperature, choice_temperature, guidance_scale,
                            slot_mask, timeout_s)

    def submit_edit(self, images, masks, steps: Optional[int] = None, seed: Optional[int] = None, class_labels=None,
                    temperature=None, choice_temperature=None, paste_original: bool = False,
                    feather: int = 2, guidance_scale=None, timeout_s: Optional[float] = None) -> Job:
        """Queues an edit; the result equals `Generator.edit(images, masks, seed=seed, ...)` with the same arguments
        (timeout_s as for submit_sample)."""
        size = self.generator.image_size
        pixels = to_uint8_images(images, size)
        pixel_masks = to_bool_masks(masks, len(pixels), size)
        n = self._check_count(len(pixels))
        if not (isinstance(feather, int) and not isinstance(feather, bool) and feather >= 0):
            raise ValueError(f"feather must be a non-negative int (pixels), got {feather!r}")
        slot_mask = sampling.slot_mask_from_pixels(pixel_masks, self.generator.grid)
        return self._submit("edit", n, steps, seed, class_labels, temperature, choice_temperature, guidance_scale,
                            slot_mask, timeout_s, pixels=pixels, pixel_masks=pixel_masks,
                            paste_original=bool(paste_original), feather=feather)

    def _submit(self, kind, n, steps, seed, class_labels, temperature, choice_temperature, guidance_scale, slot_mask,
                timeout_s, **edit) -> Job:
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 (or None), got {timeout_s!r}")
        # None takes the engine directory's defaults, and a fresh seed (returned in the Job).
        options = self.generator.sampling_options(n, steps, seed, class_labels, temperature, choice_temperature,
                                                  guidance_scale)
        request = _Request(Job(kind, n, options.seed), options, slot_mask, remaining=n, **edit)
        if timeout_s is not None:
            request.expires_at = request.job.submitted_at + timeout_s
        with self._wake:
            if self._stopping:
                raise RuntimeError("the scheduler is stopped")
            refusal = self._refusal(n, options.steps, timeout_s)
            if refusal is not None:
                raise refusal
            self._waiting.append(request)
            self._queued_images += n
            self._queued_steps += n * options.steps
            self._stats["requests"] += 1
            self._wake.notify()
        return request.job

    def refusal(self) -> Optional[Overloaded]:
        """The refusal a request of one image would get now (counted as a refusal), or None: while it is not None
        every request would be refused, so a server may answer new requests with it before reading them.

        Once the queue has passed its deadline, it refuses every new request for at least SHED_SHARE of
        max_queue_wait_s (its retry_after_s says how long): a queue held right at its limit would otherwise refuse
        for a few milliseconds at a time, and most of the excess would take the full path to a deadline refusal
        (under Ray Serve the proxy, the router and the replica: ~10x a refusal the proxy makes alone,
        BENCHMARKS.md). The engine does not idle meanwhile: the queue still holds most of max_queue_wait_s of work.
        """
        with self._wake:
            now = time.monotonic()
            if now < self._refusing_until:
                return self._refused("deadline", "overloaded: the queue is draining to its deadline; retry later",
                                     self._refusing_until - now)
            refused = self._refusal(1, self.generator.default_steps, None)
            if refused is not None and refused.reason == "deadline" and self.config.max_queue_wait_s:
                refused.retry_after_s = max(refused.retry_after_s, SHED_SHARE * self.config.max_queue_wait_s)
                self._refusing_until = now + refused.retry_after_s
            return refused

    def _refusal(self, n: int, steps: int, timeout_s: Optional[float]) -> Optional[Overloaded]:
        """Overloaded (counted) unless a request of n images of `steps` steps can join the queue now (lock held)."""
        config = self.config
        reason = None
        if self._queued_images + n > config.max_queued_images:
            reason = "overload"
            message = (f"overloaded: {self._queued_images} images already queued (limit {config.max_queued_images}); "
                       f"retry later")
            retry_after = self.costs.seconds_per_image(self._mean_steps(), config.capacity) * (
                self._queued_images + n - config.max_queued_images)
        else:
            wait = self.estimated_wait(n)
            service = self.costs.service_seconds(steps, min(config.capacity, self._images_ahead() + n))
            if config.max_queue_wait_s is not None and wait > config.max_queue_wait_s:
                reason = "deadline"
                message = (f"overloaded: the estimated wait of {wait:.1f} s exceeds the server's limit of "
                           f"{config.max_queue_wait_s:g} s; retry later")
                retry_after = wait - config.max_queue_wait_s
            elif timeout_s is not None and wait + service > timeout_s:
                reason = "deadline"
                message = (f"overloaded: the estimated wait of {wait:.1f} s and service of {service:.1f} s exceed "
                           f"this request's timeout of {timeout_s:g} s; retry later")
                retry_after = wait + service - timeout_s
        return None if reason is None else self._refused(reason, message, retry_after)

    def _refused(self, reason: str, message: str, retry_after: float) -> Overloaded:
        """The refusal, counted in the stats and the metrics (lock held)."""
        self._stats[f"refused_{reason}"] += 1
        self.metrics.refused(reason)
        return Overloaded(message, reason, retry_after_s=max(0.0, retry_after))

    def _images_ahead(self) -> int:
        """Images in slots or waiting for one (lock held)."""
        return len(self._active) + self._queued_images

    def _mean_steps(self) -> float:
        """The mean step count of the images ahead (lock held; the engine loop replaces its list, never edits it)."""
        active = self._active
        ahead = len(active) + self._queued_images
        return (sum(len(image.counts) for image in active) + self._queued_steps) / ahead if ahead else 0.0

    def estimated_wait(self, n: int) -> float:
        """Seconds until the last of n new images would take a slot: images leave their slots at one per
        EngineCosts.seconds_per_image (the loop at full batch), first in, first out; 0 while the costs are unknown."""
        must_finish = self._images_ahead() + n - self.config.capacity  # images ahead that must leave their slots
        if must_finish <= 0:
            return 0.0
        return must_finish * self.costs.seconds_per_image(self._mean_steps(), self.config.capacity)

    def _check_count(self, n) -> int:
        limit = self.config.max_request_images
        if not (isinstance(n, int) and not isinstance(n, bool) and 0 < n <= limit):
            raise ValueError(f"n must be an int in [1, {limit}], got {n!r}")
        return n

    def stats(self) -> Dict[str, float]:
        """Counters (requests, refused_overload, refused_deadline, expired, images, prior_calls, prior_rows,
        decode_calls), the current queue, active and decoding images, and the averaged engine costs."""
        with self._wake:
            return {**self._stats, "prior_calls": self._prior_calls, "queued_images": self._queued_images,
                    "active_images": len(self._active), "decoding_images": len(self._finished),
                    "full_step_seconds": self.costs.step_seconds(self.config.capacity),
                    "decode_seconds_per_image": self.costs.decode_seconds_per_image}

    # ------------------------------------------------------------------------------------------ engine loop
    def start(self) -> "Scheduler":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="movq-engine-loop", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """Whether the engine loop is running."""
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> None:
        """Stops the loop; requests still queued or in flight fail with RuntimeError."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        stopped = RuntimeError("the scheduler was stopped before this request finished")
        for request in {image.request for image in [*self._active, *self._finished]} | set(self._waiting):
            _fail(request, stopped)

    def __enter__(self) -> "Scheduler":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or self._active or self._finished):
                    self.metrics.occupancy(0, 0)
                    self._wake.wait()
                if self._stopping:
                    return
                admitted = self._take_waiting(self.config.capacity - len(self._active))
                queued = self._queued_images
            self._guarded(self._admit, admitted)
            self._drop_cancelled()
            self.metrics.occupancy(queued, len(self._active))
            if self._active:
                self._guarded(self._step, [image.request for image in self._active])
            if self._decode_due():
                batch = [self._finished.popleft() for _ in range(min(self.config.decode_batch, len(self._finished)))]
                self._guarded(self._decode, batch)

    def _guarded(self, work, items) -> None:
        """Runs work(items); on an error, fails the requests involved (and drops their images), and keeps serving."""
        try:
            work(items)
        except Exception as error:  # noqa: BLE001 - one bad batch must not stop the replica
            logger.exception("movq-deploy scheduler: %s failed", work.__name__)
            requests = {item if isinstance(item, _Request) else item.request for item in items}
            for request in requests:
                _fail(request, RuntimeError(f"inference failed: {error}"))
            self._drop_cancelled()

    def _take_waiting(self, free: int) -> "list[tuple[_Request, int]]":
        """(request, image position) pairs for up to `free` slots, first in first out (lock held). Requests that
        were cancelled or whose timeout has passed are dropped here, before any engine call."""
        taken, now = [], time.monotonic()
        while free > 0 and self._waiting:
            request = self._waiting[0]
            if not request.dropped and now >= request.expires_at:
                self._expire(request)
            count = 0 if request.dropped else min(free, request.job.n - request.admitted)
            if count and request.job.started_at is None:
                request.job.started_at = now
            taken += [(request, request.admitted + i) for i in range(count)]
            request.admitted += count
            self._queued_images -= count
            self._queued_steps -= count * request.options.steps
            free -= count
            if request.dropped or request.admitted == request.job.n:
                left = request.job.n - request.admitted
                self._queued_images -= left
                self._queued_steps -= left * request.options.steps
                self._waiting.popleft()
        return taken

    def _expire(self, request: _Request) -> None:
        self._stats["expired"] += 1
        _fail(request, TimeoutError("the request's timeout passed before it was answered; its images were dropped"))

    def _admit(self, admitted: "list[tuple[_Request, int]]") -> None:
        """Turns admitted positions into active images (noise drawn now); edits are encoded on first admission."""
        entering = []
        for request, position in admitted:
            if request.tokens is None:
                self._prepare_tokens(request)
            tokens, options = request.tokens[position], request.options
            counts = sampling.remask_counts(int(request.slot_mask[position].sum()), options.steps)
            uniform, gumbel = sampling.draw_noise(options.seed, [position], options.steps, len(tokens))
            label = None if options.class_labels is None else int(options.class_labels[position])
            image = _Image(request, position, tokens.copy(), counts, uniform[0], gumbel[0],
                           of_image(options.temperature, position), of_image(options.choice_temperature, position),
                           of_image(options.guidance_scale, position), label)
            if request.slot_mask[position].any():
                entering.append(image)
            else:  # nothing to generate: the reconstruction, as Generator.edit gives it
                image.finished_at = self._prior_calls
                self._finished.append(image)
        self._active = self._active + entering

    def _prepare_tokens(self, request: _Request) -> None:
        n, mask_id = request.job.n, self.generator.mask_id
        request.images = np.zeros((n, self.generator.image_size, self.generator.image_size, 3), dtype=np.uint8)
        if request.pixels is None:
            request.tokens = np.full((n, self.generator.num_slots), mask_id, dtype=np.int32)
            return
        known = self.generator.encode(request.pixels).reshape(n, -1)  # (n, N)
        self._stats["encode_calls"] += math.ceil(n / self.generator.image_batch_size)
        request.tokens = np.where(request.slot_mask, np.int32(mask_id), known).astype(np.int32)

    def _drop_cancelled(self) -> None:
        """Drops the images of requests that were cancelled, failed, or whose timeout has passed."""
        now = time.monotonic()
        for request in {image.request for image in self._active if now >= image.request.expires_at}:
            if not request.dropped:
                self._expire(request)
        self._active = [image for image in self._active if not image.request.dropped]
        kept = [image for image in self._finished if not image.request.dropped]
        self._finished = collections.deque(kept)

    def _step(self, _requests) -> None:
        """One prior call for every active image; each advances by one of its own steps."""
        started = time.perf_counter()
        images = self._active
        labels = None if images[0].label is None else np.array([image.label for image in images], dtype=np.int32)
        sampled, confidence = self._prior_step(
            np.stack([image.tokens for image in images]),  # (B, N) int32
            labels,  # (B,) or None
            np.stack([image.uniform[image.step] for image in images]),  # (B, N) f32
            np.stack([image.gumbel[image.step] for image in images]),  # (B, N) f32
            np.array([image.temperature for image in images]),  # (B,)
            np.array([sampling.choice_scale(image.step, len(image.counts), image.choice_temperature)
                      for image in images]),  # (B,): each image at its own step of its own schedule
            np.array([image.guidance_scale for image in images]),  # (B,): 0 -> prior, else prior_guided
        )
        counts = np.array([image.counts[image.step] for image in images])  # (B,)
        remask = sampling.select_remask(confidence, counts)
        tokens = np.where(remask, np.int32(self.generator.mask_id), sampled).astype(np.int32)
        self._prior_calls += 1
        self._stats["prior_rows"] += len(images)
        seconds = time.perf_counter() - started
        self.costs.record_step(len(images), seconds)
        self.metrics.prior_call(len(images), seconds)
        still_active = []
        for image, row in zip(images, tokens):
            image.tokens, image.step = row, image.step + 1
            if image.step == len(image.counts):
                image.finished_at = self._prior_calls
                self._finished.append(image)
            else:
                still_active.append(image)
        self._active = still_active

    def _decode_due(self) -> bool:
        if not self._finished:
            return False
        if len(self._finished) >= self.config.decode_batch or not self._active:
            return True
        return self._prior_calls - self._finished[0].finished_at >= self.config.max_decode_wait_steps

    def _decode(self, batch: List[_Image]) -> None:
        started = time.perf_counter()
        images = self.generator.decode(np.stack([image.tokens for image in batch]), output_type="np")
        seconds = time.perf_counter() - started
        self.costs.record_decode(len(batch), seconds)
        self.metrics.decode_call(len(batch), seconds)
        self._stats["decode_calls"] += 1
        for image, pixels in zip(batch, images):
            request = image.request
            request.images[image.position] = pixels
            request.remaining -= 1
            if request.remaining == 0:
                self._complete(request)

    def _complete(self, request: _Request) -> None:
        images = request.images
        if request.paste_original:
            images = paste_outside_mask(request.pixels, images, request.pixel_masks, request.feather)
        self._stats["images"] += request.job.n
        if request.job.future.set_running_or_notify_cancel():
            request.job.answered_at = time.monotonic()
            request.job.future.set_result(images)
            self.metrics.served(request.job.n)


class EngineCosts:
    """What the engine loop costs, exponentially averaged over its recent calls (SMOOTHING): the wall time of a prior
    step (the call and its numpy work) at each batch size, in powers of two, and the decoder's time per image. Written
    by the engine loop, read by submitters for the admission estimate.

    A step's time grows with its rows, but less than in proportion (a call has a fixed cost), so it is kept per batch
    size and interpolated between the sizes measured. Beyond the largest size measured it is taken as that size's: an
    estimate that errs towards admitting, corrected by the first call at the larger size (the engine runs full
    batches exactly when the queue, and so the estimate, matters). Before the first calls the costs count as 0:
    nothing is refused by deadline until something has been measured."""

    def __init__(self):
        self._steps = {}  # batch-size bucket (rows' bit length) -> _Average of (seconds, rows) of its calls
        self._decode = _Average()  # seconds and images of decoder calls

    def record_step(self, rows: int, seconds: float) -> None:
        self._steps.setdefault(rows.bit_length(), _Average()).add(seconds, rows)

    def record_decode(self, images: int, seconds: float) -> None:
        self._decode.add(seconds, images)

    def step_seconds(self, rows: int) -> float:
        """A prior step's estimated seconds at `rows` images (0 before any was measured)."""
        points = sorted((average.size, average.cost) for average in list(self._steps.values()))
        if not points:
            return 0.0
        if rows <= points[0][0]:
            return points[0][1]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if rows <= x1:
                return y0 + (y1 - y0) * (rows - x0) / (x1 - x0)
        return points[-1][1]

    @property
    def decode_seconds_per_image(self) -> float:
        return self._decode.ratio or 0.0

    def seconds_per_image(self, steps: float, capacity: int) -> float:
        """The engine loop's time per image of `steps` steps at a full batch of `capacity`: its share of the prior
        steps, and its decode."""
        return steps * self.step_seconds(capacity) / capacity + self.decode_seconds_per_image

    def service_seconds(self, steps: int, batch: int) -> float:
        """An image's time from its slot to its answer among `batch` images: `steps` steps of `batch` rows, and the
        decoding of those images interleaved."""
        return steps * self.step_seconds(batch) + batch * self.decode_seconds_per_image


class _Average:
    """Exponential averages of a cost and of its size (rows, images)."""

    def __init__(self):
        self.cost: Optional[float] = None
        self.size: Optional[float] = None

    def add(self, cost: float, size: int) -> None:
        if self.cost is None:
            self.cost, self.size = cost, float(size)
        else:
            self.cost += SMOOTHING * (cost - self.cost)
            self.size += SMOOTHING * (size - self.size)

    @property
    def ratio(self) -> Optional[float]:
        return None if self.cost is None else self.cost / self.size


def _fail(request: _Request, error: BaseException) -> None:
    future = request.job.future
    if not future.done() and future.set_running_or_notify_cancel():
        future.set_exception(error)

