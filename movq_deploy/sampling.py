"""MaskGIT decoding, extended to c channels per position: the schedule, the seeded noise and the loop.

numpy only. Every backend (ONNX Runtime, TensorRT, the PyTorch reference) plugs a `StepFn` into `unmask`, so the
schedule, the noise and the re-mask choice are written once. See DESIGN.md, "Sampling".
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np

# One step of the prior: (tokens [B,N] int32, class_labels [B] int32 or None, uniform [B,N] f32, gumbel [B,N] f32,
# temperature, choice_scale) -> (sampled [B,N] int32, confidence [B,N] f32). Known slots keep their token and get
# confidence +inf; masked slots get a token drawn by inverse CDF from softmax(logits / temperature) with `uniform`,
# and confidence log p(token) + choice_scale * gumbel.
StepFn = Callable[
    [np.ndarray, Optional[np.ndarray], np.ndarray, np.ndarray, float, float], "tuple[np.ndarray, np.ndarray]"
]


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


def choice_scale(step: int, steps: int, choice_temperature: float) -> float:
    """The Gumbel noise scale of the confidence at `step`: choice_temperature * (1 - (t+1)/T); 0 at the last step."""
    return float(choice_temperature * (1.0 - (step + 1) / steps))


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
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
) -> np.ndarray:
    """Runs the T steps of MaskGIT decoding on `tokens` (int32 [B,N], `mask_id` where unknown); returns int32 [B,N].

    T is the noise's second axis. N0 is counted per image, so an editing batch may mix masks of different sizes.
    """
    steps = uniform.shape[1]
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    num_masked = (tokens == mask_id).sum(axis=1)
    counts = np.stack([remask_counts(int(n), steps) for n in num_masked])  # (B, T)
    for t in range(steps):
        sampled, confidence = step_fn(
            tokens, class_labels, uniform[:, t], gumbel[:, t], float(temperature),
            choice_scale(t, steps, choice_temperature),
        )
        # After the last step nothing is masked again (its count is 0): the samples are the result.
        tokens = np.where(select_remask(confidence, counts[:, t]), np.int32(mask_id), sampled).astype(np.int32)
    return tokens


def resolve_class_labels(class_labels, n: int, num_classes: int) -> Optional[np.ndarray]:
    """The class-label input of the prior for `n` images: None for an unconditional model (num_classes == 0).

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


def _chunks(indices: np.ndarray, max_batch: Optional[int]) -> "list[np.ndarray]":
    if max_batch is not None and max_batch <= 0:
        raise ValueError(f"max_batch must be positive, got {max_batch}")
    size = len(indices) if max_batch is None else max_batch
    return [indices[start:start + size] for start in range(0, len(indices), max(size, 1))]


def sample_tokens(
    step_fn: StepFn,
    n: int,
    num_slots: int,
    mask_id: int,
    steps: int = 8,
    seed: int = 0,
    class_labels: Optional[np.ndarray] = None,
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
    max_batch: Optional[int] = None,
    first_index: int = 0,
) -> np.ndarray:
    """Samples n token grids from scratch (every slot masked); returns int32 [n, num_slots].

    Runs in chunks of at most `max_batch` images; image i always uses noise stream (seed, first_index + i), so the
    result does not depend on `max_batch`, and a call with first_index=k continues one that sampled k images.
    `class_labels` is int32 [n] (see `resolve_class_labels`) or None.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    tokens = np.full((n, num_slots), mask_id, dtype=np.int32)
    slot_mask = np.ones((n, num_slots), dtype=bool)
    return edit_tokens(step_fn, tokens, slot_mask, mask_id, steps, seed, class_labels, temperature,
                       choice_temperature, max_batch, first_index)


def edit_tokens(
    step_fn: StepFn,
    tokens: np.ndarray,
    slot_mask: np.ndarray,
    mask_id: int,
    steps: int = 8,
    seed: int = 0,
    class_labels: Optional[np.ndarray] = None,
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
    max_batch: Optional[int] = None,
    first_index: int = 0,
) -> np.ndarray:
    """Regenerates the slots of `tokens` (int [B,N]) where `slot_mask` (bool [B,N]) is True; returns int32 [B,N].

    The decoding loop starts with N0 = the masked slots of each image; all other slots are kept exactly. Image i
    uses noise stream (seed, first_index + i) over all N slots, so an all-masked edit equals `sample_tokens` with
    the same seed. Images with nothing masked are returned unchanged without running the prior.
    """
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    if not temperature > 0 or not choice_temperature >= 0:
        raise ValueError(f"temperature must be > 0 and choice_temperature >= 0, got {temperature}, "
                         f"{choice_temperature}")
    if seed < 0 or first_index < 0:
        raise ValueError(f"seed and first_index must be >= 0, got {seed}, {first_index}")
    tokens = np.asarray(tokens)
    slot_mask = np.asarray(slot_mask)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, N], got shape {tokens.shape}")
    if slot_mask.shape != tokens.shape or slot_mask.dtype != bool:
        raise ValueError(f"slot_mask must be bool with the tokens' shape {tokens.shape}, got {slot_mask.dtype} "
                         f"{slot_mask.shape}")
    batch, num_slots = tokens.shape
    known = tokens[~slot_mask]
    if known.size and (known.min() < 0 or known.max() >= mask_id):
        raise ValueError(f"known tokens must lie in [0, {mask_id}), got [{known.min()}, {known.max()}]")
    if class_labels is not None and np.shape(class_labels) != (batch,):
        raise ValueError(f"class_labels must have shape ({batch},), got {np.shape(class_labels)}")
    out = np.where(slot_mask, np.int32(mask_id), tokens).astype(np.int32)
    todo = np.flatnonzero(slot_mask.any(axis=1))
    for rows in _chunks(todo, max_batch):
        uniform, gumbel = draw_noise(seed, first_index + rows, steps, num_slots)
        labels = None if class_labels is None else np.asarray(class_labels, dtype=np.int32)[rows]
        out[rows] = unmask(step_fn, out[rows], mask_id, uniform, gumbel, labels, temperature, choice_temperature)
    return out


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
