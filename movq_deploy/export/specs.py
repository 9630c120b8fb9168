"""What an export writes: one GraphSpec per graph (a module whose positional arguments are exactly the ONNX inputs,
its I/O names and fixed-seed input makers), and the error an export fails with."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from movq_deploy import contract
from movq_deploy.export.ties import encoder_ties, prior_ties
from movq_deploy.models.graphs import DecoderGraph, EncoderGraph, GuidedPriorStepGraph, PriorStepGraph

EXAMPLE_BATCH = 2  # torch.export specializes dimensions of size 0 and 1: trace with 2


class ExportError(RuntimeError):
    """An exported graph is malformed or disagrees with PyTorch beyond tolerance."""


def one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


@dataclass
class GraphSpec:
    """One graph to export: a module whose positional arguments are exactly the ONNX inputs (every one batched)."""

    name: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
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


class _GuidedPriorStep(nn.Module):
    """GuidedPriorStepGraph (class-conditional priors), arguments in ONNX input order."""

    def __init__(self, step: GuidedPriorStepGraph):
        super().__init__()
        self.step = step

    def forward(self, tokens, class_labels, uniform, gumbel, temperature, choice_scale, guidance_scale):
        return self.step(tokens, class_labels, uniform, gumbel, temperature, choice_scale, guidance_scale)


def graph_specs(movq, prior) -> "dict[str, GraphSpec]":
    """The graphs of an engine directory (encoder, decoder, prior, and prior_guided for a class-conditional
    prior), with fixed-seed input makers for export and validation."""
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
        # The null class (num_classes) included.
        labels = rng.integers(0, pconfig.num_classes + 1, batch, dtype=np.int32) if pconfig.conditional else None
        uniform, gumbel = rng.random((batch, n), dtype=np.float32), rng.gumbel(size=(batch, n))
        return contract.prior_step_feeds(tokens, labels, uniform, gumbel, temperature=1.0, choice_scale=2.0)

    def guided_inputs(batch, rng):
        feeds = prior_inputs(batch, rng)
        guidance = rng.uniform(0.5, 4.0, batch)
        guidance[1::3] = 0.0  # unguided rows too (from batch 2 on)
        return {**feeds, "guidance_scale": guidance.astype(np.float32)}

    prior_module = _PriorStep(step) if pconfig.conditional else _UnconditionalPriorStep(step)
    modules = {"encoder": EncoderGraph(movq).eval(), "decoder": DecoderGraph(movq).eval(), "prior": prior_module}
    makers = {"encoder": (images, encoder_ties(movq)), "decoder": (indices, None),
              "prior": (prior_inputs, prior_ties(step))}
    if pconfig.conditional:
        guided = GuidedPriorStepGraph(prior).eval()
        modules[contract.GUIDED_PRIOR] = _GuidedPriorStep(guided)
        makers[contract.GUIDED_PRIOR] = (guided_inputs, prior_ties(guided))
    specs = {}
    for name, module in modules.items():
        io = contract.graph_io(name, size, grid, pconfig.conditional)
        specs[name] = GraphSpec(name, module, io.input_names, io.output_names, *makers[name])
    return specs


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
