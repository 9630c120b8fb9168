"""What the web page asks of a model: info, sample, edit, reconstruct. Plain numpy in and out, no gradio.

The page (movq_deploy.ui.page) is written against the PageService protocol only, so the same page runs over a
local Generator (LocalService, `movq-deploy ui`) or inside the Ray Serve app over its replica's batching service
(ServedService, `movq-deploy serve --ui`). The model calls are coroutines: the page awaits them on the server's
event loop. Every call raises ValueError with a one-line message on bad input; the page shows that line.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import List, Optional, Protocol, Tuple

import numpy as np

from movq_deploy.sampling import SamplingDefaults

# The most images one page request may ask for: a grid of 64 is what a person looks at, and it bounds the work a
# click can queue on a shared server.
MAX_IMAGES = 64


@dataclass(frozen=True)
class ModelInfo:
    backend: str  # e.g. "onnxruntime-cpu"
    precision: str  # "fp32" | "fp16" | "int8"
    image_size: int  # H = W of the images the model takes and makes
    grid: Tuple[int, int, int]  # token grid (h, w, c)
    codebook_size: int
    class_names: List[str]  # empty for an unconditional model (or a conditional one exported without names)
    num_classes: int  # 0: unconditional
    defaults: SamplingDefaults
    max_images: int = MAX_IMAGES
    guidance: bool = False  # whether the model samples with classifier-free guidance (a prior_guided graph)


@dataclass(frozen=True)
class SamplingOptions:
    """The prior's knobs; None takes the model's stored default."""
    steps: Optional[int] = None
    temperature: Optional[float] = None
    choice_temperature: Optional[float] = None
    class_label: Optional[int] = None  # None: no class (the null class of a conditional model)
    guidance_scale: Optional[float] = None  # classifier-free guidance w (0: unguided)


@dataclass(frozen=True)
class Generated:
    images: np.ndarray  # uint8 [n, H, W, 3]
    seed: int
    seconds: float  # wall time of the model call, as the service measured it


@dataclass(frozen=True)
class Reconstruction:
    image: np.ndarray  # uint8 [H, W, 3]: decode(encode(input))
    tokens: np.ndarray  # int32 [h, w, c]: the codes the encoder chose
    seconds: float


class PageService(Protocol):
    def info(self) -> ModelInfo: ...

    async def sample(self, n: int, seed: int, options: SamplingOptions) -> Generated: ...

    async def edit(self, image: np.ndarray, mask: np.ndarray, n: int, seed: int, options: SamplingOptions,
                   paste_original: bool) -> Generated:
        """n fills of one image (uint8 [H,W,3]) where mask (bool [H,W]) is True; fill i uses noise stream (seed, i)."""
        ...

    async def reconstruct(self, image: np.ndarray) -> Reconstruction: ...


class LocalService:
    """PageService over a Generator in this process (its calls run in a worker thread, off the event loop)."""

    def __init__(self, generator):
        self.generator = generator
        self.defaults = generator.engine_dir.sampling  # shown as the page's initial values

    def info(self) -> ModelInfo:
        return model_info(self.generator, self.defaults, MAX_IMAGES)

    async def sample(self, n: int, seed: int, options: SamplingOptions) -> Generated:
        check_count(n)
        start = time.perf_counter()
        images = await asyncio.to_thread(self.generator.sample, n=n, seed=seed, output_type="np",
                                         **knobs(options, self.defaults))
        return Generated(images, seed, time.perf_counter() - start)

    async def edit(self, image: np.ndarray, mask: np.ndarray, n: int, seed: int, options: SamplingOptions,
                   paste_original: bool) -> Generated:
        check_count(n)
        check_edit_inputs(image, mask, self.generator.image_size)
        start = time.perf_counter()
        images = await asyncio.to_thread(self.generator.edit, [image] * n, [mask] * n, seed=seed, output_type="np",
                                         paste_original=paste_original, **knobs(options, self.defaults))
        return Generated(images, seed, time.perf_counter() - start)

    async def reconstruct(self, image: np.ndarray) -> Reconstruction:
        return await asyncio.to_thread(reconstruct, self.generator, image)


class ServedService:
    """PageService inside a Ray Serve replica: sampling and editing go through the replica's batching service
    (movq_deploy.serving.service.ImageService), with the HTTP API's limits; reconstruction calls its Generator."""

    def __init__(self, service):
        self.service = service
        self.generator = service.generator
        self.defaults = self.generator.engine_dir.sampling

    def info(self) -> ModelInfo:
        return model_info(self.generator, self.defaults, min(MAX_IMAGES, self.service.config.max_request_images))

    async def sample(self, n: int, seed: int, options: SamplingOptions) -> Generated:
        start = time.perf_counter()
        kw = knobs(options, self.defaults)
        served = await self.service.sample(n, seed, kw["class_labels"], kw["steps"], kw["temperature"],
                                           kw["choice_temperature"], kw["guidance_scale"])
        return Generated(served.images, served.seed, time.perf_counter() - start)

    async def edit(self, image: np.ndarray, mask: np.ndarray, n: int, seed: int, options: SamplingOptions,
                   paste_original: bool) -> Generated:
        check_edit_inputs(image, mask, self.generator.image_size)
        start = time.perf_counter()
        kw = knobs(options, self.defaults)
        served = await self.service.edit(np.repeat(image[None], n, axis=0), np.repeat(mask[None], n, axis=0),
                                         seed, kw["class_labels"], kw["steps"], kw["temperature"],
                                         kw["choice_temperature"], paste_original, guidance_scale=kw["guidance_scale"])
        return Generated(served.images, served.seed, time.perf_counter() - start)

    async def reconstruct(self, image: np.ndarray) -> Reconstruction:
        return await asyncio.to_thread(reconstruct, self.generator, image)


def model_info(generator, defaults: SamplingDefaults, max_images: int) -> ModelInfo:
    return ModelInfo(backend=generator.backend_name, precision=generator.precision, image_size=generator.image_size,
                     grid=tuple(generator.grid), codebook_size=generator.codebook_size,
                     class_names=list(generator.class_names), num_classes=generator.num_classes, defaults=defaults,
                     max_images=max_images, guidance=generator.no_guidance is None)


def knobs(options: SamplingOptions, defaults: SamplingDefaults) -> dict:
    """Generator keyword arguments of the options, the stored defaults standing in for the unset ones."""
    def pick(value, default):
        return default if value is None else value

    return {"steps": pick(options.steps, defaults.steps),
            "temperature": pick(options.temperature, defaults.temperature),
            "choice_temperature": pick(options.choice_temperature, defaults.choice_temperature),
            "guidance_scale": pick(options.guidance_scale, defaults.guidance_scale),
            "class_labels": options.class_label}


def reconstruct(generator, image: np.ndarray) -> Reconstruction:
    start = time.perf_counter()
    tokens = generator.encode(image)  # (1, h, w, c)
    decoded = generator.decode(tokens, output_type="np")  # (1, H, W, 3)
    return Reconstruction(decoded[0], tokens[0], time.perf_counter() - start)


def check_count(n) -> None:
    if not (isinstance(n, (int, np.integer)) and 1 <= n <= MAX_IMAGES):
        raise ValueError(f"the number of images must be between 1 and {MAX_IMAGES}, got {n!r}")


def check_edit_inputs(image: np.ndarray, mask: np.ndarray, size: int) -> None:
    """The checks an edit needs before any model call: sizes that match, and something to regenerate."""
    if image.shape != (size, size, 3):
        raise ValueError(f"the image is {image.shape[1]}x{image.shape[0]} pixels; the model takes {size}x{size}")
    if mask.shape != image.shape[:2]:
        raise ValueError(f"the mask is {mask.shape[1]}x{mask.shape[0]} pixels but the image is {size}x{size}")
    if not mask.any():
        raise ValueError("the mask is empty: paint the region to regenerate first")
