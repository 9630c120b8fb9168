"""The prior-step call as a sampling.StepFn over a Generator's runner, and request-level batching on top of it.

Request-level batching is the conventional way (Ray Serve's @serve.batch): the requests that arrived together run all
their T steps together, and a request arriving meanwhile waits for the whole batch. The service offers it beside
step-level continuous batching (scheduler.py) so that the load test can compare the two on the same graphs.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

from movq_deploy import contract, sampling
from movq_deploy.generator import Generator


def prior_step_fn(generator: Generator) -> sampling.StepFn:
    """A StepFn that runs one call of the generator's prior-step graph (any batch size)."""
    return contract.runner_step_fn(generator.backend.runners["prior"])


@dataclass(frozen=True)
class SampleArgs:
    """One sample request, checked: image i of it uses noise stream (seed, i)."""

    n: int
    steps: int
    seed: int
    labels: Optional[np.ndarray]  # int32 [n], None for an unconditional prior
    temperature: float
    choice_temperature: float


def sample_batch(generator: Generator, requests: List[SampleArgs]) -> List[np.ndarray]:
    """Runs several sample requests as one batch: uint8 [n,H,W,3] per request, equal to Generator.sample's images.

    Rows sharing (steps, temperature, choice_temperature) share every prior call, in chunks of the generator's batch
    size; all rows are decoded together at the end.
    """
    step_fn = prior_step_fn(generator)
    rows: List[Tuple[int, int]] = [(r, i) for r, request in enumerate(requests) for i in range(request.n)]
    groups: Dict[tuple, List[int]] = collections.defaultdict(list)
    for row, (r, _) in enumerate(rows):
        request = requests[r]
        groups[(request.steps, request.temperature, request.choice_temperature)].append(row)
    tokens = np.full((len(rows), generator.num_slots), generator.mask_id, dtype=np.int32)
    for (steps, temperature, choice_temperature), members in groups.items():
        for start in range(0, len(members), generator.batch_size):
            chunk = members[start:start + generator.batch_size]
            uniform, gumbel = _noise([rows[row] for row in chunk], requests, steps, generator.num_slots)
            labels = None
            if requests[0].labels is not None:
                labels = np.array([requests[rows[row][0]].labels[rows[row][1]] for row in chunk], dtype=np.int32)
            tokens[chunk] = sampling.unmask(step_fn, tokens[chunk], generator.mask_id, uniform, gumbel, labels,
                                            temperature, choice_temperature)
    images = generator.decode(tokens, output_type="np")  # (rows, H, W, 3)
    bounds = np.cumsum([0] + [request.n for request in requests])
    return [images[bounds[r]:bounds[r + 1]] for r in range(len(requests))]


def _noise(rows: List[Tuple[int, int]], requests: List[SampleArgs], steps: int, num_slots: int):
    """uniform, gumbel [B,T,N] of (request, image index) rows, each from its request's own (seed, index) stream."""
    drawn = [sampling.draw_noise(requests[r].seed, [i], steps, num_slots) for r, i in rows]
    return np.concatenate([u for u, _ in drawn]), np.concatenate([g for _, g in drawn])
