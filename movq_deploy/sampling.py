"""MaskGIT decoding, extended to c channels per position: the schedule, the seeded noise, the loop, and the checks
of every sampling argument.

numpy only. Every backend (ONNX Runtime, TensorRT, the PyTorch reference) plugs a `StepFn` into `unmask`
(movq_deploy.contract.runner_step_fn adapts a runner), so the schedule, the noise and the re-mask choice are written
once; so are the argument checks and the class-label resolution, which the Generator and the server share. See
docs/DESIGN.md, "Sampling".
"""
from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np

# One step of the prior: (tokens [B,N] int32, class_labels [B] int32 or None, uniform [B,N] f32, gumbel [B,N] f32,
# temperature [B], choice_scale [B], guidance_scale [B]) -> (sampled [B,N] int32, confidence [B,N] f32). Known slots
# keep their token and get confidence +inf; masked slots get a token drawn by inverse CDF from
# softmax(logits / temperature) with `uniform`, and confidence log p(token) + choice_scale * gumbel. With
# guidance_scale w != 0 (class-conditional priors) the logits are cond + w * (cond - uncond), uncond those of the
# null class. temperature, choice_scale and guidance_scale are per image.
StepFn = Callable[
    [np.ndarray, Optional[np.ndarray], np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    "tuple[np.ndarray, np.ndarray]",
]
PerImage = Union[float, Sequence[float], np.ndarray]  # one value for every image, or one per image
# A class label is a class id, a class name or None (no class); a call takes one for all images, or one per image.
ClassLabels = Union[None, int, str, Sequence[Union[int, str, None]], np.ndarray]


@dataclass(frozen=True)
class SamplingDefaults:
    """What sampling uses when the caller does not say; an engine directory stores its own (manifest "sampling")."""

    steps: int = 8  # T (the paper's FFHQ setting)
    temperature: float = 1.0  # of the token draw
    choice_temperature: float = 4.5  # scale of the Gumbel noise on the confidence (MaskGIT's)
    guidance_scale: float = 0.0  # classifier-free guidance w (class-conditional priors); 0 = unguided


DEFAULTS = SamplingDefaults()


def remask_counts(num_masked: int, steps: int) -> np.ndarray:
    """How many of the `num_masked` starting slots are masked again after each of `steps` steps (int64 [steps]).

    floor(N0 * cos(pi/2 * (t+1)/T)), clamped to [1, unknown-1] before the last step (as google-research/maskgit
    does), 0 after the last step. With nothing masked there is nothing to schedule: all zeros.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if num_masked < 0:
        raise ValueError(f"num_masked must be >= 0, got {num_masked}")
    counts = np.zeros(steps, dtype=np.int64)
    if num_masked == 0:
        return counts
    unknown = num_masked
    for t in range(steps - 1):
        ratio = (t + 1) / steps
        n = math.floor(num_masked * math.cos(math.pi / 2 * ratio))
        n = max(1, min(unknown - 1, n))
        counts[t] = n
        unknown = n
    return counts


def choice_scale(step: int, steps: int, choice_temperature: PerImage) -> "float | np.ndarray":
    """The Gumbel noise scale of the confidence at `step`: choice_temperature * (1 - (t+1)/T); 0 at the last step.

    A float for one choice temperature, float64 [B] for one per image.
    """
    scale = np.asarray(choice_temperature, dtype=np.float64) * (1.0 - (step + 1) / steps)
    return float(scale) if scale.ndim == 0 else scale


def draw_noise(seed: int, image_indices: Sequence[int], steps: int, num_slots: int) -> "tuple[np.ndarray, np.ndarray]":
    """The host noise of a call with `seed`, for the images numbered `image_indices` within that call.

    Image i draws from its own stream, seeded by (seed, i) only, so an image does not depend on batch size,
    chunking or backend. Returns uniform [B,T,N] in [0,1) (the categorical draw) and gumbel [B,T,N] (the
    confidence noise), both float32.
    """
    uniform = np.empty((len(image_indices), steps, num_slots), dtype=np.float32)
    gumbel = np.empty_like(uniform)
    for row, index in enumerate(image_indices):
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([int(seed), int(index)])))
        uniform[row] = rng.random((steps, num_slots), dtype=np.float32)
        gumbel[row] = rng.gumbel(size=(steps, num_slots))
    return uniform, gumbel


def select_remask(confidence: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """bool [B,N]: in row b, the counts[b] slots of lowest confidence (ties go to the lower slot index)."""
    batch, num_slots = confidence.shape
    order = np.argsort(confidence, axis=1, kind="stable")
    ranks = np.empty_like(order)
    ranks[np.arange(batch)[:, None], order] = np.arange(num_slots)
    return ranks < np.asarray(counts)[:, None]


def unmask(
    step_fn: StepFn,
    tokens: np.ndarray,
    mask_id: int,
    uniform: np.ndarray,
    gumbel: np.ndarray,
    class_labels: Optional[np.ndarray] = None,
    temperature: PerImage = DEFAULTS.temperature,
    choice_temperature: PerImage = DEFAULTS.choice_temperature,
    guidance_scale: PerImage = DEFAULTS.guidance_scale,
) -> np.ndarray:
    """Runs the T steps of MaskGIT decoding on `tokens` (int32 [B,N], `mask_id` where unknown); returns int32 [B,N].

    T is the noise's second axis. N0 is counted per image, so an editing batch may mix masks of different sizes.
    temperature, choice_temperature and guidance_scale: one number, or one per image [B].
    """
    batch, steps = uniform.shape[0], uniform.shape[1]
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    temperature = np.broadcast_to(np.asarray(temperature, dtype=np.float64), (batch,))
    choice_temperature = np.broadcast_to(np.asarray(choice_temperature, dtype=np.float64), (batch,))
    guidance_scale = np.broadcast_to(np.asarray(guidance_scale, dtype=np.float64), (batch,))
    num_masked = (tokens == mask_id).sum(axis=1)
    counts = np.stack([remask_counts(int(n), steps) for n in num_masked])  # (B, T)
    for t in range(steps):
        sampled, confidence = step_fn(tokens, class_labels, uniform[:, t], gumbel[:, t], temperature,
                                      choice_scale(t, steps, choice_temperature), guidance_scale)
        # After the last step nothing is masked again (its count is 0): the samples are the result.
        tokens = np.where(select_remask(confidence, counts[:, t]), np.int32(mask_id), sampled).astype(np.int32)
    return tokens


def sample_tokens(
    step_fn: StepFn,
    n: int,
    num_slots: int,
    mask_id: int,
    steps: int = DEFAULTS.steps,
    seed: int = 0,
    class_labels: Optional[np.ndarray] = None,
    temperature: PerImage = DEFAULTS.temperature,
    choice_temperature: PerImage = DEFAULTS.choice_temperature,
    max_batch: Optional[int] = None,
    first_index: int = 0,
    guidance_scale: PerImage = DEFAULTS.guidance_scale,
) -> np.ndarray:
    """Samples n token grids from scratch (every slot masked); returns int32 [n, num_slots].

    `edit_tokens` with every slot masked: see there for the arguments.
    """
    if not (is_int(n) and n >= 0):
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    tokens = np.full((n, num_slots), mask_id, dtype=np.int32)
    slot_mask = np.ones((n, num_slots), dtype=bool)
    return edit_tokens(step_fn, tokens, slot_mask, mask_id, steps, seed, class_labels, temperature,
                       choice_temperature, max_batch, first_index, guidance_scale)


def edit_tokens(
    step_fn: StepFn,
    tokens: np.ndarray,
    slot_mask: np.ndarray,
    mask_id: int,
    steps: int = DEFAULTS.steps,
    seed: int = 0,
    class_labels: Optional[np.ndarray] = None,
    temperature: PerImage = DEFAULTS.temperature,
    choice_temperature: PerImage = DEFAULTS.choice_temperature,
    max_batch: Optional[int] = None,
    first_index: int = 0,
    guidance_scale: PerImage = DEFAULTS.guidance_scale,
) -> np.ndarray:
    """Regenerates the slots of `tokens` (int [B,N]) where `slot_mask` (bool [B,N]) is True; returns int32 [B,N].

    The decoding loop starts with N0 = the masked slots of each image; all other slots are kept exactly. It runs in
    chunks of at most `max_batch` images. Image i uses noise stream (seed, first_index + i) over all N slots, so
    the result does not depend on `max_batch`, an all-masked edit equals `sample_tokens` with the same seed, and a
    call with first_index=k continues one that did k images (as bulk generation does, split over workers).
    Images with nothing masked are returned unchanged without running the prior. `class_labels`: int32 [B] prior
    class ids (see `resolve_class_labels`) or None; temperature, choice_temperature and guidance_scale (w >= 0,
    classifier-free guidance; rows with w = 0 are unguided): one number, or one per image.
    """
    steps, seed = check_steps(steps), check_seed(seed)
    if not (is_int(first_index) and first_index >= 0):
        raise ValueError(f"first_index must be an int >= 0, got {first_index!r}")
    tokens = np.asarray(tokens)
    slot_mask = np.asarray(slot_mask)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, N], got shape {tokens.shape}")
    if slot_mask.shape != tokens.shape or slot_mask.dtype != bool:
        raise ValueError(f"slot_mask must be bool with the tokens' shape {tokens.shape}, got {slot_mask.dtype} "
                         f"{slot_mask.shape}")
    batch, num_slots = tokens.shape
    temperature, choice_temperature = check_temperatures(temperature, choice_temperature, batch)
    guidance_scale = check_guidance_scale(guidance_scale, batch)
    known = tokens[~slot_mask]
    if known.size and (known.min() < 0 or known.max() >= mask_id):
        raise ValueError(f"known tokens must lie in [0, {mask_id}), got [{known.min()}, {known.max()}]")
    if class_labels is not None and np.shape(class_labels) != (batch,):
        raise ValueError(f"class_labels must have shape ({batch},), got {np.shape(class_labels)}")
    out = np.where(slot_mask, np.int32(mask_id), tokens).astype(np.int32)
    for rows in _chunks(rows_to_generate(slot_mask), max_batch):
        uniform, gumbel = draw_noise(seed, first_index + rows, steps, num_slots)
        labels = None if class_labels is None else np.asarray(class_labels, dtype=np.int32)[rows]
        out[rows] = unmask(step_fn, out[rows], mask_id, uniform, gumbel, labels, _rows(temperature, rows),
                           _rows(choice_temperature, rows), _rows(guidance_scale, rows))
    return out


def rows_to_generate(slot_mask: np.ndarray) -> np.ndarray:
    """The images (row indices) of an edit that reach the prior: those with any slot masked."""
    return np.flatnonzero(np.asarray(slot_mask).any(axis=1))


def prior_calls(images: int, steps: int, max_batch: Optional[int]) -> int:
    """How many prior-step calls `edit_tokens` makes for `images` images to generate (a progress total)."""
    return (math.ceil(images / max_batch) if max_batch else int(images > 0)) * steps


def _chunks(indices: np.ndarray, max_batch: Optional[int]) -> "list[np.ndarray]":
    if max_batch is not None and max_batch <= 0:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    size = len(indices) if max_batch is None else max_batch
    return [indices[start:start + size] for start in range(0, len(indices), max(size, 1))]


def _rows(value: "float | np.ndarray", rows: np.ndarray) -> "float | np.ndarray":
    return value if np.ndim(value) == 0 else value[rows]


def slot_mask_from_pixels(masks: np.ndarray, grid: "tuple[int, int, int]") -> np.ndarray:
    """bool [B,H,W] pixel masks (True = regenerate) -> bool [B,N] slot mask for a (h, w, c) token grid.

    A latent position is masked when its cell of the image (H/h x W/w pixels) holds any masked pixel; all c slots
    of a masked position are masked.
    """
    masks = np.asarray(masks)
    h, w, c = grid
    if masks.dtype != bool or masks.ndim != 3:
        raise ValueError(f"masks must be a bool array [B, H, W], got {masks.dtype} with shape {masks.shape}")
    batch, height, width = masks.shape
    if height % h or width % w:
        raise ValueError(f"mask size {height}x{width} is not a multiple of the latent grid {h}x{w}")
    cells = masks.reshape(batch, h, height // h, w, width // w).any(axis=(2, 4))  # (B, h, w)
    return np.repeat(cells[..., None], c, axis=-1).reshape(batch, h * w * c)


# ---- argument checks, shared by the Generator, the reference sampler and the server ----------------------------


@dataclass(frozen=True)
class SamplingOptions:
    """The checked sampling arguments of one call of n images."""

    steps: int
    seed: int
    class_labels: Optional[np.ndarray]  # int32 [n] prior class ids, None for an unconditional prior
    temperature: "float | np.ndarray"  # one, or float64 [n]
    choice_temperature: "float | np.ndarray"
    guidance_scale: "float | np.ndarray" = 0.0  # one, or float64 [n]; 0 = unguided


def check_options(
    n: int,
    steps: Optional[int] = None,
    seed: Optional[int] = None,
    class_labels=None,
    temperature: Optional[PerImage] = None,
    choice_temperature: Optional[PerImage] = None,
    guidance_scale: Optional[PerImage] = None,
    *,
    num_classes: int = 0,
    class_names: Sequence[str] = (),
    defaults: SamplingDefaults = DEFAULTS,
    no_guidance: Optional[str] = None,
) -> SamplingOptions:
    """Checks the arguments of a call that makes n images (ValueError, one line, naming the argument); None takes
    the default (`defaults`; a fresh random seed). class_labels as `class_ids` takes them. `no_guidance`: why this
    model cannot guide (then a guidance_scale other than 0 is refused with that reason), None when it can."""
    steps = defaults.steps if steps is None else steps
    temperature = defaults.temperature if temperature is None else temperature
    choice_temperature = defaults.choice_temperature if choice_temperature is None else choice_temperature
    guidance_scale = defaults.guidance_scale if guidance_scale is None else guidance_scale
    temperature, choice_temperature = check_temperatures(temperature, choice_temperature, n)
    guidance_scale = check_guidance_scale(guidance_scale, n)
    if no_guidance is not None and np.any(guidance_scale):
        raise ValueError(f"guidance_scale must be 0 here: {no_guidance}")
    return SamplingOptions(check_steps(steps), check_seed(seed), class_ids(class_labels, n, num_classes, class_names),
                           temperature, choice_temperature, guidance_scale)


def check_count(n) -> int:
    if not (is_int(n) and n > 0):
        raise ValueError(f"n must be a positive int, got {n!r}")
    return int(n)


def check_steps(steps) -> int:
    if not (is_int(steps) and steps > 0):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    return int(steps)


def check_seed(seed) -> int:
    """The seed as an int; None draws a fresh one."""
    if seed is None:
        return secrets.randbits(63)
    if not (is_int(seed) and seed >= 0):
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    return int(seed)


def check_temperatures(temperature: PerImage, choice_temperature: PerImage, n: int) -> "tuple":
    """(temperature, choice_temperature), each a float or float64 [n]: temperature > 0, choice_temperature >= 0."""
    return (_check_per_image("temperature", temperature, n, "> 0"),
            _check_per_image("choice_temperature", choice_temperature, n, ">= 0"))


def check_guidance_scale(guidance_scale: PerImage, n: int) -> "float | np.ndarray":
    """The classifier-free guidance scale w, a float or float64 [n]: finite, >= 0 (0 = unguided)."""
    return _check_per_image("guidance_scale", guidance_scale, n, ">= 0")


def _check_per_image(name: str, value, n: int, low: str) -> "float | np.ndarray":
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        array = np.float64(value)
    elif isinstance(value, (list, tuple, np.ndarray)) and np.ndim(value) == 1 and \
            all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in np.asarray(value).tolist()):
        array = np.asarray(value, dtype=np.float64)
        if array.shape != (n,):
            raise ValueError(f"{name} must be one number or {n} (one per image), got {len(array)}")
    else:
        raise ValueError(f"{name} must be a finite number {low}, got {value!r}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} must be a finite number {low}, got {value!r}")
    if (array <= 0).any() if low == "> 0" else (array < 0).any():
        raise ValueError(f"{name} must be {low}, got {value!r}")
    return float(array) if array.ndim == 0 else array


def class_ids(class_labels, n: int, num_classes: int, class_names: Sequence[str] = ()) -> Optional[np.ndarray]:
    """int32 [n] prior class ids from what a user gives, or None for an unconditional prior.

    class_labels: None (every image gets the null class, id num_classes), one label for all images, or n labels;
    a label is a class id in [0, num_classes), a class name, or None (no class).
    """
    if num_classes == 0 or class_labels is None:
        return resolve_class_labels(class_labels, n, num_classes)
    single = isinstance(class_labels, (str, numbers.Integral)) or np.ndim(class_labels) == 0
    labels = [np.asarray(class_labels).item()] * n if single else list(class_labels)  # 0-d arrays too
    if len(labels) != n:
        raise ValueError(f"got {len(labels)} class labels for {n} images; give one label or one per image")
    ids = []
    for label in labels:
        if label is None:
            ids.append(num_classes)
        elif isinstance(label, str):
            if label not in class_names:
                raise ValueError(f"unknown class name {label!r}; this model knows {len(class_names)} names")
            ids.append(list(class_names).index(label))
        elif is_int(label):
            if not 0 <= label < num_classes:
                raise ValueError(f"class label {label} is out of range: this model has {num_classes} classes "
                                 f"(0..{num_classes - 1}; None for no class)")
            ids.append(int(label))
        else:
            raise ValueError(f"class labels must be ints, class names or None, got {label!r}")
    return np.asarray(ids, dtype=np.int32)


def resolve_class_labels(class_labels, n: int, num_classes: int) -> Optional[np.ndarray]:
    """The class-label input of the prior for `n` images, from class ids: None for an unconditional model.

    For a conditional model, `class_labels` may be None (every image gets the null class, id `num_classes`), one int
    (all images), or a sequence of n ints in [0, num_classes]. Returns int32 [n].
    """
    if num_classes == 0:
        if class_labels is not None:
            raise ValueError("class_labels were given, but the prior is unconditional (num_classes = 0)")
        return None
    if class_labels is None:
        return np.full(n, num_classes, dtype=np.int32)
    labels = np.asarray(class_labels)
    if labels.ndim == 0:
        labels = np.full(n, labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"class_labels must be one int or {n} ints, got shape {labels.shape} dtype {labels.dtype}")
    if labels.min() < 0 or labels.max() > num_classes:
        raise ValueError(f"class_labels must lie in [0, {num_classes}] ({num_classes} = no class), got "
                         f"[{labels.min()}, {labels.max()}]")
    return labels.astype(np.int32)


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
