"""Step-level continuous batching: images of different requests share every prior-step call, each at its own step.

MaskGIT decoding is a fixed number of steps, and each image carries its own schedule and noise (movq_deploy.sampling),
so nothing ties an image to the other images of its batch. The scheduler keeps up to `capacity` images *active*; one
engine loop (a thread) repeats:

1. admit waiting images (first in, first out) into the free slots, at the step boundary;
2. advance every active image by one step in one prior call (the graph takes a temperature and a confidence-noise
   scale per row; rows with a guidance scale w != 0 go to the guided prior graph in the same step, so a step is at
   most two calls);
3. decode the images that finished their T steps, in batches.

Requests come in from any thread or from asyncio (`Job.wait`), and get a concurrent.futures.Future. Waiting images are
bounded: a request that does not fit is refused at once with `Overloaded`. The invariant: a served image equals
`Generator.sample` (or `edit`) with the same seed and image index, bit for bit, whatever shared its batches.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Optional

import numpy as np

from movq_deploy import sampling
from movq_deploy.generator import Generator
from movq_deploy.images import paste_outside_mask, to_bool_masks, to_uint8_images
from movq_deploy.serving.steps import of_image

logger = logging.getLogger("movq_deploy")


class Overloaded(RuntimeError):
    """The scheduler's queue is full: retry later (HTTP 503 with Retry-After)."""


@dataclass(frozen=True)
class SchedulerConfig:
    capacity: int = 64  # active images = the prior's batch (DEFAULT_PRIOR_BATCH fills the CPU)
    max_queued_images: int = 256  # waiting images beyond this are refused (Overloaded): memory stays bounded
    max_request_images: int = 64  # the most images one request may ask for
    decode_batch: int = 16  # images per decoder call (DEFAULT_IMAGE_BATCH)
    max_decode_wait_steps: int = 2  # a finished image waits at most this many prior calls for a fuller decode batch

    def __post_init__(self):
        for name in ("capacity", "max_queued_images", "max_request_images", "decode_batch"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.max_request_images > self.max_queued_images:
            raise ValueError(f"max_request_images ({self.max_request_images}) must not exceed max_queued_images "
                             f"({self.max_queued_images}): such a request could never be queued")
        if self.max_decode_wait_steps < 0:
            raise ValueError(f"max_decode_wait_steps must be >= 0, got {self.max_decode_wait_steps}")


@dataclass
class Job:
    """One request: `future` resolves to uint8 [n,H,W,3] (or raises); `seed` is the one used (drawn if not given)."""

    kind: str  # "sample" | "edit"
    n: int
    seed: int
    future: Future = field(default_factory=Future, repr=False)

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

    def __init__(self, generator: Generator, config: SchedulerConfig = SchedulerConfig()):
        self.generator = generator
        self.config = config
        self._prior_step = generator.prior_step_fn()
        self._waiting: Deque[_Request] = collections.deque()
        self._queued_images = 0  # images of waiting requests not admitted yet
        self._active: List[_Image] = []
        self._finished: Deque[_Image] = collections.deque()
        self._prior_calls = 0
        self._stats: Dict[str, int] = collections.Counter()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: Optional[threading.Thread] = None

    # ---------------------------------------------------------------------------------------------- requests
    def submit_sample(self, n: int = 1, steps: Optional[int] = None, seed: Optional[int] = None, class_labels=None,
                      temperature=None, choice_temperature=None, guidance_scale=None) -> Job:
        """Queues n new images; image i equals `Generator.sample(n, seed=seed, ...)[i]` (same steps, labels...)."""
        n = self._check_count(n)
        slot_mask = np.ones((n, self.generator.num_slots), dtype=bool)
        return self._submit("sample", n, steps, seed, class_labels, temperature, choice_temperature, guidance_scale,
                            slot_mask)

    def submit_edit(self, images, masks, steps: Optional[int] = None, seed: Optional[int] = None, class_labels=None,
                    temperature=None, choice_temperature=None, paste_original: bool = False,
                    feather: int = 2, guidance_scale=None) -> Job:
        """Queues an edit; the result equals `Generator.edit(images, masks, seed=seed, ...)` with the same arguments."""
        size = self.generator.image_size
        pixels = to_uint8_images(images, size)
        pixel_masks = to_bool_masks(masks, len(pixels), size)
        n = self._check_count(len(pixels))
        if not (isinstance(feather, int) and not isinstance(feather, bool) and feather >= 0):
            raise ValueError(f"feather must be a non-negative int (pixels), got {feather!r}")
        slot_mask = sampling.slot_mask_from_pixels(pixel_masks, self.generator.grid)
        return self._submit("edit", n, steps, seed, class_labels, temperature, choice_temperature, guidance_scale,
                            slot_mask, pixels=pixels, pixel_masks=pixel_masks, paste_original=bool(paste_original),
                            feather=feather)

    def _submit(self, kind, n, steps, seed, class_labels, temperature, choice_temperature, guidance_scale, slot_mask,
                **edit) -> Job:
        # None takes the engine directory's defaults, and a fresh seed (returned in the Job).
        options = self.generator.sampling_options(n, steps, seed, class_labels, temperature, choice_temperature,
                                                  guidance_scale)
        request = _Request(Job(kind, n, options.seed), options, slot_mask, remaining=n, **edit)
        with self._wake:
            if self._stopping:
                raise RuntimeError("the scheduler is stopped")
            if self._queued_images + n > self.config.max_queued_images:
                self._stats["refused"] += 1
                raise Overloaded(f"overloaded: {self._queued_images} images already queued (limit "
                                 f"{self.config.max_queued_images}); retry later")
            self._waiting.append(request)
            self._queued_images += n
            self._stats["requests"] += 1
            self._wake.notify()
        return request.job

    def _check_count(self, n) -> int:
        limit = self.config.max_request_images
        if not (isinstance(n, int) and not isinstance(n, bool) and 0 < n <= limit):
            raise ValueError(f"n must be an int in [1, {limit}], got {n!r}")
        return n

    def stats(self) -> Dict[str, int]:
        """Counters (requests, refused, images, prior_calls, decode_calls) and the current queue, active, decoding."""
        with self._wake:
            return {**self._stats, "prior_calls": self._prior_calls, "queued_images": self._queued_images,
                    "active_images": len(self._active), "decoding_images": len(self._finished)}

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
                    self._wake.wait()
                if self._stopping:
                    return
                admitted = self._take_waiting(self.config.capacity - len(self._active))
            self._guarded(self._admit, admitted)
            self._drop_cancelled()
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
        """(request, image position) pairs for up to `free` slots, first in first out (lock held)."""
        taken = []
        while free > 0 and self._waiting:
            request = self._waiting[0]
            count = 0 if request.dropped else min(free, request.job.n - request.admitted)
            taken += [(request, request.admitted + i) for i in range(count)]
            request.admitted += count
            self._queued_images -= count
            free -= count
            if request.dropped or request.admitted == request.job.n:
                self._queued_images -= request.job.n - request.admitted
                self._waiting.popleft()
        return taken

    def _admit(self, admitted: "list[tuple[_Request, int]]") -> None:
        """Turns admitted positions into active images (noise drawn now); edits are encoded on first admission."""
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
                self._active.append(image)
            else:  # nothing to generate: the reconstruction, as Generator.edit gives it
                image.finished_at = self._prior_calls
                self._finished.append(image)

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
        self._active = [image for image in self._active if not image.request.dropped]
        kept = [image for image in self._finished if not image.request.dropped]
        self._finished = collections.deque(kept)

    def _step(self, _requests) -> None:
        """One prior call for every active image; each advances by one of its own steps."""
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
        self._active = []
        for image, row in zip(images, tokens):
            image.tokens, image.step = row, image.step + 1
            if image.step == len(image.counts):
                image.finished_at = self._prior_calls
                self._finished.append(image)
            else:
                self._active.append(image)

    def _decode_due(self) -> bool:
        if not self._finished:
            return False
        if len(self._finished) >= self.config.decode_batch or not self._active:
            return True
        return self._prior_calls - self._finished[0].finished_at >= self.config.max_decode_wait_steps

    def _decode(self, batch: List[_Image]) -> None:
        images = self.generator.decode(np.stack([image.tokens for image in batch]), output_type="np")
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
            request.job.future.set_result(images)


def _fail(request: _Request, error: BaseException) -> None:
    future = request.job.future
    if not future.done() and future.set_running_or_notify_cancel():
        future.set_exception(error)

