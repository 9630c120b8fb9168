"""The prior-step call as a sampling.StepFn over a Generator's runner, and request-level batching on top of it.

Request-level batching is the conventional way (Ray Serve's @serve.batch): the requests that arrived together run all
their T steps together, and a request arriving meanwhile waits for the whole batch. The service offers it beside
step-level continuous batching (scheduler.py) so that the load test can compare the two on the same graphs.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from movq_deploy import sampling
from movq_deploy.generator import Generator


def prior_step_fn(generator: Generator) -> sampling.StepFn:
    """A StepFn over the generator's prior-step graphs (any batch size; each row guided or not by its own
    guidance_scale)."""
    return generator.prior_step_fn()


@dataclass(frozen=True)
class SampleArgs:
    """One sample request, checked: image i of it uses noise stream (seed, i)."""

    n: int
    options: sampling.SamplingOptions


def sample_batch(generator: Generator, requests: List[SampleArgs]) -> List[np.ndarray]:
    """Runs several sample requests as one batch: uint8 [n,H,W,3] per request, equal to Generator.sample's images.

    Rows with the same step count share every prior call (temperatures, guidance and labels are per row), in chunks
    of the generator's batch size; all rows are decoded together at the end.
    """
    step_fn = prior_step_fn(generator)
    rows: List[Tuple[int, int]] = [(r, i) for r, request in enumerate(requests) for i in range(request.n)]
    by_steps: Dict[int, List[int]] = collections.defaultdict(list)
    for row, (r, _) in enumerate(rows):
        by_steps[requests[r].options.steps].append(row)
    tokens = np.full((len(rows), generator.num_slots), generator.mask_id, dtype=np.int32)
    for steps, members in by_steps.items():
        for start in range(0, len(members), generator.batch_size):
            chunk = members[start:start + generator.batch_size]
            options = [(requests[rows[row][0]].options, rows[row][1]) for row in chunk]  # (options, image index)
            uniform, gumbel = _noise(options, steps, generator.num_slots)
            labels = None
            if options[0][0].class_labels is not None:
                labels = np.array([o.class_labels[i] for o, i in options], dtype=np.int32)  # (B,)
            temperature = np.array([of_image(o.temperature, i) for o, i in options])  # (B,)
            choice_temperature = np.array([of_image(o.choice_temperature, i) for o, i in options])  # (B,)
            guidance_scale = np.array([of_image(o.guidance_scale, i) for o, i in options])  # (B,)
            tokens[chunk] = sampling.unmask(step_fn, tokens[chunk], generator.mask_id, uniform, gumbel, labels,
                                            temperature, choice_temperature, guidance_scale)
    images = generator.decode(tokens, output_type="np")  # (rows, H, W, 3)
    bounds = np.cumsum([0] + [request.n for request in requests])
    return [images[bounds[r]:bounds[r + 1]] for r in range(len(requests))]


def of_image(value: "float | np.ndarray", index: int) -> float:
    """One image's value of a per-call option that is one number or one per image."""
    return float(value) if np.ndim(value) == 0 else float(value[index])


def _noise(rows: "List[Tuple[sampling.SamplingOptions, int]]", steps: int, num_slots: int):
    """uniform, gumbel [B,T,N] of (options, image index) rows, each from its request's own (seed, index) stream."""
    drawn = [sampling.draw_noise(options.seed, [index], steps, num_slots) for options, index in rows]
    return np.concatenate([u for u, _ in drawn]), np.concatenate([g for _, g in drawn])
