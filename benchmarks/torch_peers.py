"""The PyTorch peers a user would otherwise pick: the exported graphs' torch modules, eager or torch.compile'd.

They sit behind the same numpy interface as a backend's runners (`run(feeds) -> {name: array}`), so the benchmark
times every backend with the same code, and the same sampling loop (movq_deploy.sampling) drives them.
"""
from __future__ import annotations

import numpy as np
import torch

from movq_deploy import contract, sampling
from movq_deploy.models.graphs import DecoderGraph, EncoderGraph, PriorStepGraph
from movq_deploy.models.reference import TorchRunner, prior_step_runner

EAGER, COMPILE = "pytorch-eager", "torch-compile"  # the peers' backend names in benchmark rows


AUTOCAST = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}  # a peer's precision -> torch.autocast


class TorchPeer:
    """Encoder, decoder and prior-step graphs in PyTorch, `mode` "eager" or "compile" (torch.compile, dynamic
    shapes so that one compilation serves every batch size), at `precision` "fp32", "bf16" (torch.autocast: what
    a CPU user with bf16 hardware would try first) or "fp16" (CUDA)."""

    def __init__(self, movq, prior, mode: str = "eager", device: str = "cpu", precision: str = "fp32"):
        if mode not in ("eager", "compile"):
            raise ValueError(f"mode must be 'eager' or 'compile', got {mode!r}")
        if precision not in AUTOCAST:
            raise ValueError(f"precision must be one of {', '.join(AUTOCAST)}, got {precision!r}")
        if precision == "fp16" and device == "cpu":
            raise ValueError("fp16 PyTorch peers run on CUDA only (CPU fp16 matmuls are not a path anyone deploys)")
        self.name = EAGER if mode == "eager" else COMPILE
        self.precision = precision
        modules = {"encoder": EncoderGraph(movq), "decoder": DecoderGraph(movq), "prior": PriorStepGraph(prior)}
        for name, module in modules.items():
            module = module.to(device).eval()
            modules[name] = torch.compile(module, dynamic=True) if mode == "compile" else module
        dtype = AUTOCAST[precision]
        self.runners = {
            "encoder": TorchRunner(modules["encoder"], ["image"], ["indices"], device, dtype),
            "decoder": TorchRunner(modules["decoder"], ["indices"], ["image"], device, dtype),
            "prior": prior_step_runner(modules["prior"], device, dtype),
        }


def loop_sample(runners, grid, mask_id: int, num_classes: int, n: int, steps: int, seed: int = 0) -> np.ndarray:
    """n images by the shared MaskGIT loop (movq_deploy.sampling) over `runners` ({"prior", "decoder"}), in one
    chunk, conditional priors on the null class: uint8 [n,H,W,3]."""
    h, w, c = grid
    tokens = sampling.sample_tokens(
        contract.runner_step_fn(runners["prior"]), n=n, num_slots=h * w * c, mask_id=mask_id, steps=steps, seed=seed,
        class_labels=sampling.resolve_class_labels(None, n, num_classes), max_batch=n,
    )
    return runners["decoder"].run({"indices": tokens.reshape(n, h, w, c)})["image"]
