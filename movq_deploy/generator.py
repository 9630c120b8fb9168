"""The runtime entry point: `Generator(engine_dir).sample(n=64)` on TensorRT, ONNX Runtime CUDA or ONNX Runtime CPU.

numpy + pillow + the backend interface only (no torch). The MaskGIT loop, the noise and the re-mask choice come from
movq_deploy.sampling, shared with the PyTorch reference sampler, so both give the same tokens for the same seed;
the prior-step runner is plugged in as the loop's StepFn. Calls keep no state on the Generator, so one Generator
may serve several threads at once.
"""
from __future__ import annotations

import math
import numbers
import os
import secrets
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from movq_deploy import sampling
from movq_deploy.backends import open_runners
from movq_deploy.images import (
    ImagesLike, check_output_type, paste_outside_mask, to_bool_masks, to_output, to_uint8_images,
)
from movq_deploy.manifest import load_manifest

# Largest batch per engine call when neither the caller nor the backend sets one (ONNX Runtime's dynamic batch axis).
# The prior step is small: 64 fills the cores. The encoder and decoder hold full-resolution activations (a 256x256
# decoder at batch 64 would need several GB on the CPU) and run as fast per image at 16 (measured on the tiny model).
DEFAULT_PRIOR_BATCH = 64
DEFAULT_IMAGE_BATCH = 16

Progress = Callable[[int, int], None]  # progress(done, total): engine calls finished so far, of how many
ClassLabels = Union[None, int, str, Sequence[Union[int, str, None]], np.ndarray]


class Generator:
    """Samples, encodes, decodes and edits images with the graphs or engines of an engine directory.

    backend: "auto" (TensorRT engines when present and usable, else ONNX Runtime with the CUDA provider, else
    ONNX Runtime on the CPU), or one of "tensorrt", "onnxruntime", "onnxruntime-cuda", "onnxruntime-cpu".
    precision: "auto" (fp16 on TensorRT, fp32 on ONNX Runtime), "fp32", "fp16" or "int8" (int8 prior).
    batch_size: the most images per engine call (default: 64 for the prior step and 16 for the encoder and decoder,
    or the engines' largest batch when that is smaller).
    """

    def __init__(
        self,
        engine_dir: "str | os.PathLike[str]",
        backend: str = "auto",
        precision: str = "auto",
        batch_size: Optional[int] = None,
    ):
        if batch_size is not None and not (_is_int(batch_size) and batch_size > 0):
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.engine_dir = Path(engine_dir)
        self.manifest = load_manifest(self.engine_dir)
        grid = self.manifest["grid"]
        self.grid = (int(grid["h"]), int(grid["w"]), int(grid["c"]))
        self.num_slots = math.prod(self.grid)
        self.codebook_size = int(self.manifest["codebook_size"])
        self.mask_id = int(self.manifest["mask_id"])
        self.image_size = int(self.manifest["image_size"])
        self.num_classes = int(self.manifest.get("num_classes", 0))
        self.class_names: List[str] = list(self.manifest.get("class_names") or [])
        self.default_steps = int(self.manifest["sampling"]["steps"])

        self.backend = open_runners(self.engine_dir, self.manifest, backend=backend, precision=precision)
        self.backend_name = self.backend.name
        self.backend_reason = self.backend.reason
        self.precision = self.backend.precision
        self._encoder = self.backend.runners["encoder"]
        self._decoder = self.backend.runners["decoder"]
        self._prior = self.backend.runners["prior"]
        self._prior_takes_labels = any(spec.name == "class_labels" for spec in self._prior.inputs)
        if self._prior_takes_labels != (self.num_classes > 0):
            raise ValueError(f"{self.engine_dir}: the manifest says num_classes={self.num_classes} but the prior graph "
                             f"{'takes' if self._prior_takes_labels else 'has no'} class_labels input; re-export")

        def limit(default: int, *runners) -> int:
            return min([batch_size or default] + [r.max_batch for r in runners if r.max_batch is not None])

        self.batch_size = limit(DEFAULT_PRIOR_BATCH, self._prior)  # images per prior step
        self.image_batch_size = limit(DEFAULT_IMAGE_BATCH, self._encoder, self._decoder)  # per encode / decode

    def __repr__(self) -> str:
        return (f"Generator({str(self.engine_dir)!r}, backend={self.backend_name!r}, precision={self.precision!r}, "
                f"image_size={self.image_size}, grid={self.grid})")

    # ----------------------------------------------------------------------------------------------- sampling
    def sample(
        self,
        n: int = 64,
        steps: Optional[int] = None,
        seed: Optional[int] = None,
        class_labels: ClassLabels = None,
        temperature: float = 1.0,
        choice_temperature: float = 4.5,
        output_type: str = "pil",
        progress: Optional[Progress] = None,
    ) -> Union[List[Image.Image], np.ndarray]:
        """n new images: a list of PIL images, or uint8 [n,H,W,3] with output_type="np".

        seed=None draws a fresh seed. Image i of a call depends on (seed, i) only, not on the batch size or backend.
        class_labels (conditional models): None (the null class), one label, or n labels (ints or class names).
        """
        check_output_type(output_type)
        n, steps = _check_count(n), self._steps(steps)
        ticker = _Ticker(progress, self._calls(n) * steps + self._image_calls(n))
        tokens = self._sample_tokens(n, steps, seed, class_labels, temperature, choice_temperature, ticker)
        return to_output(self._decode(tokens.reshape(n, *self.grid), ticker), output_type)

    def sample_tokens(
        self,
        n: int = 64,
        steps: Optional[int] = None,
        seed: Optional[int] = None,
        class_labels: ClassLabels = None,
        temperature: float = 1.0,
        choice_temperature: float = 4.5,
        progress: Optional[Progress] = None,
    ) -> np.ndarray:
        """The token grids `sample` decodes: int32 [n, N] (N = h*w*c, row-major over (h, w, c))."""
        n, steps = _check_count(n), self._steps(steps)
        ticker = _Ticker(progress, self._calls(n) * steps)
        return self._sample_tokens(n, steps, seed, class_labels, temperature, choice_temperature, ticker)

    def _sample_tokens(self, n, steps, seed, class_labels, temperature, choice_temperature, ticker) -> np.ndarray:
        labels = self._class_labels(class_labels, n)
        temperature, choice_temperature = _check_temperatures(temperature, choice_temperature)
        return sampling.sample_tokens(self._step_fn(ticker), n, self.num_slots, self.mask_id, steps,
                                      _check_seed(seed), labels, temperature, choice_temperature,
                                      max_batch=self.batch_size)

    # ------------------------------------------------------------------------------------------------ editing
    def edit(
        self,
        images: ImagesLike,
        masks,
        steps: Optional[int] = None,
        seed: Optional[int] = None,
        class_labels: ClassLabels = None,
        temperature: float = 1.0,
        choice_temperature: float = 4.5,
        output_type: str = "pil",
        paste_original: bool = False,
        feather: int = 2,
        progress: Optional[Progress] = None,
    ) -> Union[List[Image.Image], np.ndarray]:
        """Regenerates the masked regions of images (inpainting; outpainting with images.extend_canvas).

        masks: one per image, PIL "L"/"1" images or bool arrays [H,W] (True / white = regenerate). A latent
        position is regenerated when its cell holds any masked pixel. With paste_original, pixels outside the mask
        are the original ones, joined to the generated region over a seam of about 2*feather pixels.
        An all-masked edit gives what `sample` gives for the same seed; an empty mask gives the reconstruction.
        """
        check_output_type(output_type)
        if not (_is_int(feather) and feather >= 0):
            raise ValueError(f"feather must be a non-negative int (pixels), got {feather!r}")
        pixels, pixel_masks, steps, ticker = self._edit_inputs(images, masks, steps, progress, decode=True)
        tokens = self._edit_tokens(pixels, pixel_masks, steps, seed, class_labels, temperature, choice_temperature,
                                   ticker)
        edited = self._decode(tokens.reshape(len(pixels), *self.grid), ticker)
        if paste_original:
            edited = paste_outside_mask(pixels, edited, pixel_masks, feather)
        return to_output(edited, output_type)

    def edit_tokens(
        self,
        images: ImagesLike,
        masks,
        steps: Optional[int] = None,
        seed: Optional[int] = None,
        class_labels: ClassLabels = None,
        temperature: float = 1.0,
        choice_temperature: float = 4.5,
        progress: Optional[Progress] = None,
    ) -> np.ndarray:
        """The token grids `edit` decodes: int32 [B, N]; slots outside the masked cells keep the images' tokens."""
        pixels, pixel_masks, steps, ticker = self._edit_inputs(images, masks, steps, progress, decode=False)
        return self._edit_tokens(pixels, pixel_masks, steps, seed, class_labels, temperature, choice_temperature,
                                 ticker)

    def _edit_tokens(self, pixels, pixel_masks, steps, seed, class_labels, temperature, choice_temperature,
                     ticker) -> np.ndarray:
        seed = _check_seed(seed)
        labels = self._class_labels(class_labels, len(pixels))
        temperature, choice_temperature = _check_temperatures(temperature, choice_temperature)
        slot_mask = sampling.slot_mask_from_pixels(pixel_masks, self.grid)  # (B, N)
        tokens = self._encode(pixels, ticker).reshape(len(pixels), self.num_slots)  # (B, N)
        return sampling.edit_tokens(self._step_fn(ticker), tokens, slot_mask, self.mask_id, steps, seed, labels,
                                    temperature, choice_temperature, max_batch=self.batch_size)

    def _edit_inputs(self, images, masks, steps, progress, decode: bool):
        """(pixels uint8 [B,H,W,3], pixel masks bool [B,H,W], steps, the ticker) of an edit, all checked."""
        pixels = to_uint8_images(images, self.image_size)
        pixel_masks = to_bool_masks(masks, len(pixels), self.image_size)
        steps = self._steps(steps)
        # Engine calls of an edit: encode, the prior steps of the images with something masked, decode.
        count = len(pixel_masks)
        edited = int(pixel_masks.reshape(count, -1).any(axis=1).sum())
        ticker = _Ticker(progress, self._image_calls(count) * (1 + decode) + self._calls(edited) * steps)
        return pixels, pixel_masks, steps, ticker

    # ------------------------------------------------------------------------------------- tokenizer graphs
    def encode(self, images: ImagesLike) -> np.ndarray:
        """PIL image(s) or uint8 [B,H,W,3] -> token indices int32 [B,h,w,c]."""
        return self._encode(to_uint8_images(images, self.image_size), None)

    def decode(self, indices: np.ndarray, output_type: str = "pil") -> Union[List[Image.Image], np.ndarray]:
        """Token indices int [B,h,w,c] (or [B,N]) -> images (a list of PIL images, or uint8 [B,H,W,3] with "np")."""
        check_output_type(output_type)
        indices = np.asarray(indices)
        if not np.issubdtype(indices.dtype, np.integer):
            raise ValueError(f"indices must be integers, got {indices.dtype}")
        if indices.ndim == 2 and indices.shape[1] == self.num_slots:
            indices = indices.reshape(len(indices), *self.grid)
        if indices.ndim != 4 or indices.shape[1:] != self.grid or len(indices) == 0:
            raise ValueError(f"indices must have shape [B, {', '.join(map(str, self.grid))}] or [B, {self.num_slots}]"
                             f" with B >= 1, got {indices.shape}")
        if indices.min() < 0 or indices.max() >= self.codebook_size:
            raise ValueError(f"indices must lie in [0, {self.codebook_size}), got [{indices.min()}, {indices.max()}]")
        return to_output(self._decode(indices.astype(np.int32), None), output_type)

    def reconstruct(self, images: ImagesLike, output_type: str = "pil") -> Union[List[Image.Image], np.ndarray]:
        """encode then decode: what the tokenizer keeps of the images."""
        check_output_type(output_type)
        pixels = to_uint8_images(images, self.image_size)
        return to_output(self._decode(self._encode(pixels, None), None), output_type)

    # -------------------------------------------------------------------------------------------- internals
    def _step_fn(self, ticker: "_Ticker") -> sampling.StepFn:
        def step(tokens, class_labels, uniform, gumbel, temperature, choice_scale):
            feeds = {
                "tokens": np.ascontiguousarray(tokens, dtype=np.int32),  # (B, N)
                "uniform": np.ascontiguousarray(uniform, dtype=np.float32),  # (B, N)
                "gumbel": np.ascontiguousarray(gumbel, dtype=np.float32),  # (B, N)
                "temperature": np.array([temperature], dtype=np.float32),
                "choice_scale": np.array([choice_scale], dtype=np.float32),
            }
            if self._prior_takes_labels:
                feeds["class_labels"] = np.ascontiguousarray(class_labels, dtype=np.int32)  # (B,)
            out = self._prior.run(feeds)
            ticker.tick()
            return out["sampled"], out["confidence"]

        return step

    def _encode(self, pixels: np.ndarray, ticker: Optional["_Ticker"]) -> np.ndarray:
        return self._run_chunked(self._encoder, "image", pixels, "indices", ticker)  # (B, h, w, c) int32

    def _decode(self, indices: np.ndarray, ticker: Optional["_Ticker"]) -> np.ndarray:
        return self._run_chunked(self._decoder, "indices", indices, "image", ticker)  # (B, H, W, 3) uint8

    def _run_chunked(self, runner, input_name: str, array: np.ndarray, output_name: str, ticker) -> np.ndarray:
        chunks = []
        for start in range(0, len(array), self.image_batch_size):
            chunk = np.ascontiguousarray(array[start:start + self.image_batch_size])
            chunks.append(runner.run({input_name: chunk})[output_name])
            if ticker is not None:
                ticker.tick()
        return np.concatenate(chunks)

    def _calls(self, n: int) -> int:
        return math.ceil(n / self.batch_size)

    def _image_calls(self, n: int) -> int:
        return math.ceil(n / self.image_batch_size)

    def _steps(self, steps: Optional[int]) -> int:
        if steps is None:
            return self.default_steps
        if not (_is_int(steps) and steps > 0):
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        return int(steps)

    def _class_labels(self, class_labels: ClassLabels, n: int) -> Optional[np.ndarray]:
        """int32 [n] prior labels (the null class num_classes where none is given), or None if unconditional."""
        if self.num_classes == 0 or class_labels is None:
            return sampling.resolve_class_labels(class_labels, n, self.num_classes)
        single = isinstance(class_labels, (str, numbers.Integral)) or np.ndim(class_labels) == 0
        labels = [np.asarray(class_labels).item()] * n if single else list(class_labels)  # 0-d arrays too
        if len(labels) != n:
            raise ValueError(f"got {len(labels)} class labels for {n} images; give one label or one per image")
        ids = []
        for label in labels:
            if label is None:
                ids.append(self.num_classes)
            elif isinstance(label, str):
                if label not in self.class_names:
                    raise ValueError(f"unknown class name {label!r}; this model knows {len(self.class_names)} names")
                ids.append(self.class_names.index(label))
            elif _is_int(label):
                if not 0 <= label < self.num_classes:
                    raise ValueError(f"class label {label} is out of range: this model has {self.num_classes} "
                                     f"classes (0..{self.num_classes - 1}; None for no class)")
                ids.append(int(label))
            else:
                raise ValueError(f"class labels must be ints, class names or None, got {label!r}")
        return np.asarray(ids, dtype=np.int32)


class _Ticker:
    """Counts engine calls and reports them to a progress callback (if any)."""

    def __init__(self, callback: Optional[Progress], total: int):
        self.callback, self.total, self.done = callback, total, 0

    def tick(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_count(n) -> int:
    if not (_is_int(n) and n > 0):
        raise ValueError(f"n must be a positive int, got {n!r}")
    return int(n)


def _check_seed(seed) -> int:
    if seed is None:
        return secrets.randbits(63)
    if not (_is_int(seed) and seed >= 0):
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    return int(seed)


def _check_temperatures(temperature, choice_temperature) -> "tuple[float, float]":
    for name, value, low in (("temperature", temperature, "> 0"), ("choice_temperature", choice_temperature, ">= 0")):
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number {low}, got {value!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if choice_temperature < 0:
        raise ValueError(f"choice_temperature must be >= 0, got {choice_temperature!r}")
    return float(temperature), float(choice_temperature)
