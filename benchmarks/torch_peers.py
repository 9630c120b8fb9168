"""The PyTorch peers a user would otherwise pick: the exported graphs' torch modules, eager or torch.compile'd.

They sit behind the same numpy interface as a backend's runners (`run(feeds) -> {name: array}`), so the benchmark
times every backend with the same code, and the same sampling loop (movq_deploy.sampling) drives them.
"""
from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from movq_deploy import sampling
from movq_deploy.models.graphs import DecoderGraph, EncoderGraph, PriorStepGraph


class TorchRunner:
    """One graph module behind `run(feeds)`: numpy in, numpy out, inference mode, optional fp16 autocast on CUDA."""

    def __init__(self, module: torch.nn.Module, input_names, output_names, device: str, autocast_fp16: bool):
        self.module = module
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.device = torch.device(device)
        self.autocast_fp16 = autocast_fp16

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        args = [None if feeds.get(name) is None else torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device)
                for name in self.input_names]
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.autocast_fp16):
            outputs = self.module(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return {name: out.cpu().numpy() for name, out in zip(self.output_names, outputs)}


class TorchPeer:
    """Encoder, decoder and prior-step graphs in PyTorch, `mode` "eager" or "compile" (torch.compile, dynamic
    shapes so that one compilation serves every batch size)."""

    def __init__(self, movq, prior, mode: str = "eager", device: str = "cpu", precision: str = "fp32"):
        if mode not in ("eager", "compile"):
            raise ValueError(f"mode must be 'eager' or 'compile', got {mode!r}")
        if precision == "fp16" and device == "cpu":
            raise ValueError("fp16 PyTorch peers run on CUDA only (CPU fp16 matmuls are not a path anyone deploys)")
        self.name = "pytorch-eager" if mode == "eager" else "torch-compile"
        self.precision = precision
        step = PriorStepGraph(prior)
        graphs = {
            "encoder": (EncoderGraph(movq), ["image"], ["indices"]),
            "decoder": (DecoderGraph(movq), ["indices"], ["image"]),
            # class_labels is always an argument of forward; it stays None for an unconditional prior.
            "prior": (step, ["tokens", "class_labels", "uniform", "gumbel", "temperature", "choice_scale"],
                      ["sampled", "confidence"]),
        }
        self.runners = {}
        for name, (module, inputs, outputs) in graphs.items():
            module = module.to(device).eval()
            if mode == "compile":
                module = torch.compile(module, dynamic=True)
            self.runners[name] = TorchRunner(module, inputs, outputs, device, autocast_fp16=precision == "fp16")


def runner_step_fn(runner):
    """A movq_deploy.sampling.StepFn that calls a prior-step runner."""

    def step(tokens, class_labels, uniform, gumbel, temperature, choice_scale):
        feeds = {
            "tokens": tokens, "uniform": uniform, "gumbel": gumbel,
            "temperature": np.array([temperature], np.float32), "choice_scale": np.array([choice_scale], np.float32),
        }
        if class_labels is not None:
            feeds["class_labels"] = class_labels
        out = runner.run(feeds)
        return out["sampled"], out["confidence"]

    return step


def loop_sample(runners, grid, mask_id: int, num_classes: int, n: int, steps: int, seed: int = 0) -> np.ndarray:
    """n images by the shared MaskGIT loop (movq_deploy.sampling) over `runners` ({"prior", "decoder"}), in one
    chunk, conditional priors on the null class: uint8 [n,H,W,3]."""
    h, w, c = grid
    tokens = sampling.sample_tokens(
        runner_step_fn(runners["prior"]), n=n, num_slots=h * w * c, mask_id=mask_id, steps=steps, seed=seed,
        class_labels=sampling.resolve_class_labels(None, n, num_classes), max_batch=n,
    )
    return runners["decoder"].run({"indices": tokens.reshape(n, h, w, c)})["image"]
