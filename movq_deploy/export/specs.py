"""What an export writes: one GraphSpec per graph (a module whose positional arguments are exactly the ONNX inputs,
its I/O names and fixed-seed input makers), and the error an export fails with."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from movq_deploy.export.ties import encoder_ties, prior_ties
from movq_deploy.models.graphs import DecoderGraph, EncoderGraph, PriorStepGraph

EXAMPLE_BATCH = 2  # torch.export specializes dimensions of size 0 and 1: trace with 2


class ExportError(RuntimeError):
    """An exported graph is malformed or disagrees with PyTorch beyond tolerance."""


def one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


@dataclass
class GraphSpec:
    """One graph to export: a module whose positional arguments are exactly the ONNX inputs."""

    name: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    unbatched: tuple[str, ...]  # inputs without the batch axis (the step's scalars)
    make_inputs: Callable[[int, np.random.Generator], "dict[str, np.ndarray]"]  # (batch, rng) -> feeds
    count_ties: "Callable | None" = None  # (feeds, ref, cand, off) -> mismatches that are exact-tie flips


class _PriorStep(nn.Module):
    """PriorStepGraph of a conditional prior, arguments in ONNX input order. (The attribute is `step`, not
    `graph`: torch.fx's GraphModule owns that name.)"""

    def __init__(self, step: PriorStepGraph):
        super().__init__()
        self.step = step

    def forward(self, tokens, class_labels, uniform, gumbel, temperature, choice_scale):
        return self.step(tokens, class_labels, uniform, gumbel, temperature, choice_scale)


class _UnconditionalPriorStep(nn.Module):
    """PriorStepGraph of an unconditional prior: no class_labels input at all."""

    def __init__(self, step: PriorStepGraph):
        super().__init__()
        self.step = step

    def forward(self, tokens, uniform, gumbel, temperature, choice_scale):
        return self.step(tokens, None, uniform, gumbel, temperature, choice_scale)


def graph_specs(movq, prior) -> "dict[str, GraphSpec]":
    """The three graphs of an engine directory, with fixed-seed input makers for export and validation."""
    size, grid, num_codes = movq.config.image_size, movq.config.grid, movq.config.codebook_size
    step = PriorStepGraph(prior).eval()
    pconfig = prior.config

    def images(batch, rng):
        # Smooth colour ramps plus noise: closer to photographs than uniform noise, still every level used.
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        base = (ramp[None, :, None, None] + ramp[None, None, :, None]) / 2 * rng.random((batch, 1, 1, 3))
        noisy = base + rng.normal(0, 24, (batch, size, size, 3))
        return {"image": np.clip(noisy, 0, 255).astype(np.uint8)}

    def indices(batch, rng):
        return {"indices": rng.integers(0, num_codes, (batch, *grid), dtype=np.int32)}

    def prior_inputs(batch, rng):
        n = pconfig.num_slots
        tokens = rng.integers(0, num_codes, (batch, n), dtype=np.int32)
        tokens[rng.random((batch, n)) < 0.5] = pconfig.mask_id
        tokens[0] = pconfig.mask_id  # the first step of sampling: everything masked
        feeds = {"tokens": tokens}
        if pconfig.conditional:  # the null class (num_classes) included
            feeds["class_labels"] = rng.integers(0, pconfig.num_classes + 1, batch, dtype=np.int32)
        feeds["uniform"] = rng.random((batch, n), dtype=np.float32)
        feeds["gumbel"] = rng.gumbel(size=(batch, n)).astype(np.float32)
        feeds["temperature"] = np.array([1.0], dtype=np.float32)
        feeds["choice_scale"] = np.array([2.0], dtype=np.float32)
        return feeds

    prior_module = _PriorStep(step) if pconfig.conditional else _UnconditionalPriorStep(step)
    encoder, decoder = EncoderGraph(movq).eval(), DecoderGraph(movq).eval()
    return {
        "encoder": GraphSpec("encoder", encoder, list(encoder.input_names), list(encoder.output_names), (), images,
                             encoder_ties(movq)),
        "decoder": GraphSpec("decoder", decoder, list(decoder.input_names), list(decoder.output_names), (), indices),
        "prior": GraphSpec("prior", prior_module, step.input_names, list(step.output_names),
                           ("temperature", "choice_scale"), prior_inputs, prior_ties(step)),
    }


def run_torch(spec: GraphSpec, feeds: dict) -> "list[np.ndarray]":
    with torch.no_grad():
        outputs = spec.module(*(torch.from_numpy(feeds[name]) for name in spec.input_names))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [o.numpy() for o in outputs]


def io_shapes(spec: GraphSpec) -> "dict[str, tuple]":
    """The shape of every graph input and output at batch EXAMPLE_BATCH, from the inputs and a PyTorch run."""
    feeds = spec.make_inputs(EXAMPLE_BATCH, np.random.default_rng(0))
    shapes = {name: feeds[name].shape for name in spec.input_names}
    return {**shapes, **{name: out.shape for name, out in zip(spec.output_names, run_torch(spec, feeds))}}
