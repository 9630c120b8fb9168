"""The runtime entry point: `Generator(engine_dir).sample(n=64)` on TensorRT, ONNX Runtime CUDA or ONNX Runtime CPU.

numpy + pillow + the backend interface only (no torch). The MaskGIT loop, the noise, the re-mask choice and the
argument checks come from movq_deploy.sampling, shared with the PyTorch reference sampler, so both give the same
tokens for the same seed; the prior-step runner is plugged in as the loop's StepFn by movq_deploy.contract. Calls
keep no state on the Generator, so one Generator may serve several threads at once.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, List, Optional, Union

import numpy as np
from PIL import Image

from movq_deploy import contract, sampling
from movq_deploy.backends import open_runners
from movq_deploy.backends.deferred import DeferredRunner
from movq_deploy.images import (
    ImagesLike, check_output_type, paste_outside_mask, to_bool_masks, to_output, to_uint8_images,
)
from movq_deploy.manifest import EngineDir
from movq_deploy.memory import MemoryBudget

# The most images per engine call on the CPU, where the memory budget allows it (the manifest's memory per image;
# movq_deploy.memory): past these a call runs no faster per image (BENCHMARKS.md). The prior step is small (64 fill
# the cores); the encoder and decoder hold full-resolution activations (~200 MB per image at 256x256).
DEFAULT_PRIOR_BATCH = 64
DEFAULT_IMAGE_BATCH = 16
# What sample and edit return: PIL images, uint8 [B,H,W,3], or the token grids int32 [B,N] (no decoder call).
OUTPUT_TYPES = ("pil", "np", "tokens")

Progress = Callable[[int, int], None]  # progress(done, total): engine calls finished so far, of how many
Output = Union[List[Image.Image], np.ndarray]


class Generator:
    """Samples, encodes, decodes and edits images with the graphs or engines of an engine directory.

    backend: "auto" (TensorRT engines when present and usable, else ONNX Runtime with the CUDA provider, else the
    CPU, where each graph runs on ONNX Runtime or OpenVINO by movq_deploy.backends.cpu_choice's rule), or one of
    "tensorrt", "onnxruntime", "onnxruntime-cuda", "onnxruntime-cpu", "openvino".
    precision: "auto" (fp16 on TensorRT, fp32 on ONNX Runtime CUDA; on the CPU bf16 where the CPU has it, the graph
    was validated in bf16 and is large enough to gain, else fp32), "fp32", "fp16" (GPU), "bf16" (OpenVINO on a CPU
    with native bf16) or "int8" (int8 prior, encoder and decoder on the CPU: OpenVINO's graphs or ONNX Runtime's).
    `placement` says where each graph runs, `backend_reason` why.
    batch_size: the most images per engine call (default: 64 for the prior step and 16 for the encoder and decoder,
    or the engines' largest batch when that is smaller). On the CPU fewer where `memory_budget` (bytes, or "6G";
    default $MOVQ_MEMORY_BUDGET, else a quarter of the memory available, at most 4 GB) holds fewer images, from
    each graph's memory per image measured at export (an older export has no such figure: the defaults apply).
    Batch sizes never change an image.
    threads: ONNX Runtime's intra-op threads (default: the physical cores). shared_pool=True puts the three graphs
    on ONNX Runtime's process-wide thread pool, with spinning workers (faster for small batches on cores of its own,
    slower on a busy machine: BENCHMARKS.md). It
    is a setting of the whole process, taken once: every Generator of the process asking for it must use the same
    `threads`. Both are ignored on TensorRT. cache_dir: where OpenVINO caches its compiled models (default:
    `<engine dir>.openvino-cache` beside the engine directory), so that the next start does not compile again.
    On the CPU the encoder and the guided prior open on their first call (edit, encode, reconstruct; guidance):
    a plain `sample` never holds them. Their files are verified here all the same; `warm_up()` opens them now.
    `with Generator(dir) as gen:` frees the engines' memory at the end of the block (or call `close()`).
    """

    def __init__(
        self,
        engine_dir: "str | os.PathLike[str] | EngineDir",
        backend: str = "auto",
        precision: str = "auto",
        batch_size: Optional[int] = None,
        threads: Optional[int] = None,
        shared_pool: bool = False,
        cache_dir: "str | os.PathLike[str] | None" = None,
        memory_budget: "str | int | None" = None,
    ):
        for name, value in (("batch_size", batch_size), ("threads", threads)):
            if value is not None and not (sampling.is_int(value) and value > 0):
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.engine_dir = engine_dir if isinstance(engine_dir, EngineDir) else EngineDir.load(engine_dir)
        self.backend = open_runners(self.engine_dir, backend=backend, precision=precision, threads=threads,
                                    shared_pool=bool(shared_pool), cache_dir=cache_dir)
        self.backend_name = self.backend.name
        self.backend_reason = self.backend.reason
        self.precision = self.backend.precision
        self.placement = self.backend.placement  # graph -> backend and precision (the CPU paths; empty on GPUs)
        runners = self.backend.runners
        for name in self.engine_dir.graph_names:  # a graph from another export or another version is refused here
            expected = contract.graph_io(name, self.image_size, self.grid, conditional=self.num_classes > 0)
            check = functools.partial(contract.check_runner, expected=expected, where=str(self.engine_dir.path))
            if isinstance(runners[name], DeferredRunner):
                runners[name].when_opened(check)  # or at its first call, when it opens
            else:
                check(runners[name])
        self._encoder, self._decoder, self._prior = runners["encoder"], runners["decoder"], runners["prior"]
        self._prior_guided = runners.get(contract.GUIDED_PRIOR)  # None: no classifier-free guidance

        self.memory_budget = MemoryBudget.resolve(memory_budget, "memory_budget")

        def limit(default: int, graphs: List[str]) -> int:
            caps = [batch_size or default] + [runners[g].max_batch for g in graphs if runners[g].max_batch is not None]
            if self.placement:  # the CPU: host memory holds each call's activations
                caps += [fits for fits in map(self._images_in_budget, graphs) if fits is not None]
            return min(caps)

        self.batch_size = limit(DEFAULT_PRIOR_BATCH, [g for g in contract.PRIOR_GRAPHS if g in runners])  # per step
        self.image_batch_size = limit(DEFAULT_IMAGE_BATCH, ["encoder", "decoder"])  # per encode / decode

    def _images_in_budget(self, graph: str) -> Optional[int]:
        """Images per call of `graph` within the memory budget (None: the export recorded no figure)."""
        per_image = (self.engine_dir.graph("fp32", graph) or {}).get("memory_per_image", {}).get("peak")
        if per_image is None:
            return None
        return self.memory_budget.items(per_image, f"running the {graph} graph ({self.image_size}x{self.image_size})")

    # ---- what the engine directory says ----------------------------------------------------------------------
    @property
    def grid(self) -> "tuple[int, int, int]":
        return self.engine_dir.grid.shape

    @property
    def num_slots(self) -> int:
        return self.engine_dir.grid.num_slots

    @property
    def codebook_size(self) -> int:
        return self.engine_dir.codebook_size

    @property
    def mask_id(self) -> int:
        return self.engine_dir.mask_id

    @property
    def image_size(self) -> int:
        return self.engine_dir.image_size

    @property
    def num_classes(self) -> int:
        return self.engine_dir.num_classes

    @property
    def class_names(self) -> List[str]:
        return self.engine_dir.class_names

    @property
    def default_steps(self) -> int:
        return self.engine_dir.sampling.steps

    def __repr__(self) -> str:
        return (f"Generator({str(self.engine_dir.path)!r}, backend={self.backend_name!r}, "
                f"precision={self.precision!r}, image_size={self.image_size}, grid={self.grid})")

    # ---- lifetime ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Frees the runners' engines and buffers now (GPU memory on TensorRT); the Generator is unusable after."""
        for runner in self.backend.runners.values():
            close = getattr(runner, "close", None)
            if close is not None:
                close()

    def warm_up(self) -> "Generator":
        """Opens now the graphs that otherwise open on their first call (on the CPU the encoder and the guided prior:
        movq_deploy.backends.deferred), so that no later call waits for their compilation; returns self."""
        for runner in self.backend.runners.values():
            if isinstance(runner, DeferredRunner):
                runner.open()
        return self

    def __enter__(self) -> "Generator":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- sampling ----------------------------------------------------------------------------------------------
    def sample(
        self,
        n: int = 64,
        steps: Optional[int] = None,
        seed: Optional[int] = None,
        class_labels: sampling.ClassLabels = None,
        temperature: Optional[sampling.PerImage] = None,
        choice_temperature: Optional[sampling.PerImage] = None,
        guidance_scale: Optional[sampling.PerImage] = None,
        output_type: str = "pil",
        progress: Optional[Progress] = None,
    ) -> Output:
        """n new images: a list of PIL images, uint8 [n,H,W,3] with output_type="np", or the token grids int32
        [n, N] (N = h*w*c, row-major over (h, w, c)) with output_type="tokens".

        seed=None draws a fresh seed. Image i of a call depends on (seed, i) only, not on the batch size or backend.
        class_labels (conditional models): None (the null class), one label, or n labels (ints or class names).
        guidance_scale (class-conditional models with the prior_guided graph): classifier-free guidance w >= 0,
        logits = cond + w * (cond - uncond); 0 gives exactly the unguided images.
        steps, temperature, choice_temperature and guidance_scale default to the engine directory's sampling
        defaults; the two temperatures and guidance_scale may be one number or one per image.
        """
        check_output_type(output_type, OUTPUT_TYPES)
        n = sampling.check_count(n)
        options = self.sampling_options(n, steps, seed, class_labels, temperature, choice_temperature,
                                        guidance_scale)
        decode = output_type != "tokens"
        ticker = _Ticker(progress, sampling.prior_calls(n, options.steps, self.batch_size)
                         + decode * self._image_calls(n))
        tokens = sampling.sample_tokens(self._step_fn(ticker), n, self.num_slots, self.mask_id, options.steps,
                                        options.seed, options.class_labels, options.temperature,
                                        options.choice_temperature, max_batch=self.batch_size,
                                        guidance_scale=options.guidance_scale)
        return tokens if not decode else to_output(self._decode(tokens.reshape(n, *self.grid), ticker), output_type)

    def sample_tokens(self, n: int = 64, **options) -> np.ndarray:
        """`sample(n, ..., output_type="tokens")`: the token grids `sample` decodes, int32 [n, N]."""
        return self.sample(n, output_type="tokens", **options)

    # ---- editing -----------------------------------------------------------------------------------------------
    def edit(
        self,
        images: ImagesLike,
        masks,
        steps: Optional[int] = None,
        seed: Optional[int] = None,
        class_labels: sampling.ClassLabels = None,
        temperature: Optional[sampling.PerImage] = None,
        choice_temperature: Optional[sampling.PerImage] = None,
        guidance_scale: Optional[sampling.PerImage] = None,
        output_type: str = "pil",
        paste_original: bool = False,
        feather: int = 2,
        progress: Optional[Progress] = None,
    ) -> Output:
        """Regenerates the masked regions of images (inpainting; outpainting with images.extend_canvas).

        masks: one per image, PIL "L"/"1" images or bool arrays [H,W] (True / white = regenerate). A latent
        position is regenerated when its cell holds any masked pixel. With paste_original, pixels outside the mask
        are the original ones, joined to the generated region over a seam of about 2*feather pixels.
        An all-masked edit gives what `sample` gives for the same seed; an empty mask gives the reconstruction.
        output_type="tokens" returns the edited token grids int32 [B, N] (slots outside the masked cells keep the
        images' tokens). The other arguments are `sample`'s.
        """
        check_output_type(output_type, OUTPUT_TYPES)
        if not (sampling.is_int(feather) and feather >= 0):
            raise ValueError(f"feather must be a non-negative int (pixels), got {feather!r}")
        decode = output_type != "tokens"
        if paste_original and not decode:
            raise ValueError("paste_original pastes pixels: it needs output_type 'pil' or 'np', not 'tokens'")
        pixels = to_uint8_images(images, self.image_size)
        pixel_masks = to_bool_masks(masks, len(pixels), self.image_size)
        count = len(pixels)
        options = self.sampling_options(count, steps, seed, class_labels, temperature, choice_temperature,
                                        guidance_scale)
        slot_mask = sampling.slot_mask_from_pixels(pixel_masks, self.grid)  # (B, N)
        edited = len(sampling.rows_to_generate(slot_mask))
        ticker = _Ticker(progress, self._image_calls(count) * (1 + decode)
                         + sampling.prior_calls(edited, options.steps, self.batch_size))
        tokens = self._encode(pixels, ticker).reshape(count, self.num_slots)  # (B, N)
        tokens = sampling.edit_tokens(self._step_fn(ticker), tokens, slot_mask, self.mask_id, options.steps,
                                      options.seed, options.class_labels, options.temperature,
                                      options.choice_temperature, max_batch=self.batch_size,
                                      guidance_scale=options.guidance_scale)
        if not decode:
            return tokens
        images = self._decode(tokens.reshape(count, *self.grid), ticker)
        if paste_original:
            images = paste_outside_mask(pixels, images, pixel_masks, feather)
        return to_output(images, output_type)

    def edit_tokens(self, images: ImagesLike, masks, **options) -> np.ndarray:
        """`edit(images, masks, ..., output_type="tokens")`: the token grids `edit` decodes, int32 [B, N]."""
        return self.edit(images, masks, output_type="tokens", **options)

    # ---- tokenizer graphs --------------------------------------------------------------------------------------
    def encode(self, images: ImagesLike) -> np.ndarray:
        """PIL image(s) or uint8 [B,H,W,3] -> token indices int32 [B,h,w,c]."""
        return self._encode(to_uint8_images(images, self.image_size), None)

    def decode(self, indices: np.ndarray, output_type: str = "pil") -> Output:
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

    def reconstruct(self, images: ImagesLike, output_type: str = "pil") -> Output:
        """encode then decode: what the tokenizer keeps of the images."""
        check_output_type(output_type)
        pixels = to_uint8_images(images, self.image_size)
        return to_output(self._decode(self._encode(pixels, None), None), output_type)

    # ---- internals ---------------------------------------------------------------------------------------------
    def sampling_options(self, n: int, steps=None, seed=None, class_labels=None, temperature=None,
                         choice_temperature=None, guidance_scale=None) -> sampling.SamplingOptions:
        """The checked arguments of a call that makes n images, as `sample` checks them (the engine directory's
        defaults for None; a fresh seed for seed=None); ValueError in one line."""
        return sampling.check_options(n, steps, seed, class_labels, temperature, choice_temperature, guidance_scale,
                                      num_classes=self.num_classes, class_names=self.class_names,
                                      defaults=self.engine_dir.sampling, no_guidance=self.no_guidance)

    @property
    def no_guidance(self) -> Optional[str]:
        """Why this Generator cannot sample with classifier-free guidance, or None when it can."""
        if self.num_classes == 0:
            return "classifier-free guidance needs a class-conditional prior, and this model is unconditional"
        if self._prior_guided is None:
            return (f"{self.engine_dir.path} has no prior_guided graph (exported before guidance); re-export it "
                    f"with export/to_onnx.py to sample with guidance")
        return None

    def prior_step_fn(self, after_call: Optional[Callable[[], None]] = None) -> sampling.StepFn:
        """The sampling loop's StepFn over this Generator's prior-step runners (rows with guidance_scale 0 on the
        prior graph, the others on prior_guided); the server's schedulers use it too."""
        return contract.runner_step_fn(self._prior, after_call, guided_runner=self._prior_guided)

    def _step_fn(self, ticker: "_Ticker") -> sampling.StepFn:
        return self.prior_step_fn(after_call=ticker.tick)

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

    def _image_calls(self, n: int) -> int:
        return math.ceil(n / self.image_batch_size)


class _Ticker:
    """Counts engine calls and reports them to a progress callback (if any)."""

    def __init__(self, callback: Optional[Progress], total: int):
        self.callback, self.total, self.done = callback, total, 0

    def tick(self) -> None:
        self.done += 1
        if self.callback is not None:
            self.callback(self.done, self.total)
