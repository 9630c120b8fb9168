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
        if t == steps - 1:
            return np.ascontiguousarray(sampled, dtype=np.int32)
        tokens = np.where(select_remask(confidence, counts[:, t]), np.int32(mask_id), sampled).astype(np.int32)
    raise AssertionError("unreachable")
