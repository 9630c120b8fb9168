"""The PyTorch reference sampler: the ground truth every exported backend must reproduce.

It runs the very modules that are exported (movq_deploy.models.graphs) under torch.no_grad and plugs them into the
numpy decoding loop of movq_deploy.sampling through the same feeds and adapter as the runtime
(movq_deploy.contract), so it consumes exactly the host noise the runtime consumes.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np
import torch

from movq_deploy import contract, sampling
from movq_deploy.memory import MemoryBudget
from movq_deploy.models import footprint
from movq_deploy.models.graphs import DecoderGraph, EncoderGraph, GuidedPriorStepGraph, PriorStepGraph
from movq_deploy.models.movq import MoVQ
from movq_deploy.models.prior import MaskGITPrior
from movq_deploy.sampling import DEFAULTS


class TorchRunner:
    """A graph module behind a runner's `run(feeds) -> {name: array}`: numpy in, numpy out, inference mode.

    `argument_names` are the module's forward arguments in order; one missing from the feeds is passed as None
    (class_labels of an unconditional prior). `autocast`: a dtype to autocast to (torch.float16 on CUDA,
    torch.bfloat16 on either device: the benchmarks' reduced-precision peers), None for fp32.
    """

    def __init__(self, module: torch.nn.Module, argument_names: Sequence[str], output_names: Sequence[str],
                 device="cpu", autocast: Optional[torch.dtype] = None):
        self.module = module
        self.argument_names = list(argument_names)
        self.output_names = list(output_names)
        self.device = torch.device(device)
        self.autocast = autocast

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        args = [None if feeds.get(name) is None else torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device)
                for name in self.argument_names]
        with torch.inference_mode(), autocast(self.device, self.autocast):
            outputs = self.module(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return {name: out.cpu().numpy() for name, out in zip(self.output_names, outputs)}


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """torch.autocast to `dtype` on `device`'s type; a no-op context for dtype None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def prior_step_runner(step: torch.nn.Module, device="cpu", autocast: Optional[torch.dtype] = None,
                      guided: bool = False) -> TorchRunner:
    """PriorStepGraph (or its torch.compile'd module; GuidedPriorStepGraph with guided=True) behind `run(feeds)`,
    fed by movq_deploy.contract's names."""
    return TorchRunner(step, contract.prior_input_names(conditional=True, guided=guided), contract.PRIOR_OUTPUTS,
                       device, autocast)


MOST_PER_CALL = 64  # images per call where memory allows (the reference's calls were always this wide)


class ReferenceSampler:
    """Samples, encodes, decodes and edits with the exported graphs' torch modules. `autocast` (torch.bfloat16,
    or torch.float16 on CUDA) runs them under torch.autocast: the reduced-precision peer of the benchmarks; the
    ground truth is None, fp32."""

    def __init__(self, movq: MoVQ, prior: Optional[MaskGITPrior] = None, autocast: Optional[torch.dtype] = None,
                 memory_budget: "MemoryBudget | str | int | None" = None):
        if prior is not None:
            pc, mc = prior.config, movq.config
            if pc.grid != mc.grid or pc.codebook_size != mc.codebook_size:
                raise ValueError(f"prior models grid {pc.grid} with K={pc.codebook_size}, but the tokenizer has "
                                 f"grid {mc.grid} with K={mc.codebook_size}")
        self.movq = movq.eval()
        self.prior = prior.eval() if prior is not None else None
        self.encoder = EncoderGraph(self.movq).eval()
        self.decoder = DecoderGraph(self.movq).eval()
        self.prior_step = PriorStepGraph(self.prior).eval() if prior is not None else None
        conditional = prior is not None and prior.config.conditional
        self.guided_step = GuidedPriorStepGraph(self.prior).eval() if conditional else None
        self.device = next(movq.parameters()).device
        self.autocast = autocast
        self.memory_budget = MemoryBudget.resolve(memory_budget, "memory_budget")
        self._batches: Dict[str, int] = {}  # graph -> images per call within the budget (measured when first used)
        self._step_fn = None
        if prior is not None:
            guided = None if self.guided_step is None else prior_step_runner(self.guided_step, self.device, autocast,
                                                                             guided=True)
            self._step_fn = contract.runner_step_fn(prior_step_runner(self.prior_step, self.device, autocast),
                                                    guided_runner=guided)

    @property
    def grid(self) -> "tuple[int, int, int]":
        return self.movq.config.grid

    @property
    def mask_id(self) -> int:
        return self.movq.config.codebook_size

    @property
    def num_classes(self) -> int:
        return self.prior.config.num_classes if self.prior is not None else 0

    # ---- graphs, numpy in / numpy out ----------------------------------------------------------------------------
    def step_fn(self, tokens, class_labels, uniform, gumbel, temperature, choice_scale, guidance_scale=0.0):
        """A movq_deploy.sampling.StepFn running PriorStepGraph (GuidedPriorStepGraph for rows with guidance) in
        torch."""
        if self._step_fn is None:
            raise ValueError("this ReferenceSampler has no prior; it can only encode and decode")
        if np.any(guidance_scale) and self.guided_step is None:
            raise ValueError("guidance_scale must be 0: classifier-free guidance needs a class-conditional prior")
        return self._step_fn(tokens, class_labels, uniform, gumbel, temperature, choice_scale, guidance_scale)

    # ---- batches within the memory budget -------------------------------------------------------------------------
    def batch_size(self, graph: str, asked: Optional[int] = None) -> int:
        """`asked`, else the images per call of `graph` ("encoder", "decoder" or "prior") that fit the memory budget,
        measured on its module the first time (at most MOST_PER_CALL)."""
        if asked is not None:
            return asked
        if graph not in self._batches:
            self._batches[graph] = footprint.batch_size(self._probe(graph), self.memory_budget,
                                                        f"the reference {graph} ({self.movq.config.image_size}px)",
                                                        most=MOST_PER_CALL, device=str(self.device))
        return self._batches[graph]

    def _probe(self, graph: str):
        """A call of `graph` on `batch` blank images (the worst case: a guided step where the prior can guide)."""
        size, (h, w, c) = self.movq.config.image_size, self.grid
        if graph == "encoder":
            return lambda batch: self.encode(np.zeros((batch, size, size, 3), np.uint8), batch)
        if graph == "decoder":
            return lambda batch: self.decode(np.zeros((batch, h, w, c), np.int32), batch)
        guidance = 1.0 if self.guided_step is not None else 0.0
        return lambda batch: self.step_fn(
            np.full((batch, h * w * c), self.mask_id, np.int32),
            np.zeros(batch, np.int32) if self.num_classes else None,
            np.full((batch, h * w * c), 0.5, np.float32), np.zeros((batch, h * w * c), np.float32),
            np.ones(batch, np.float32), np.ones(batch, np.float32), np.full(batch, guidance, np.float32))

    # ---- graphs, numpy in / numpy out ----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
        """uint8 [B,H,W,3] -> int32 [B,h,w,c]."""
        images = np.asarray(images)
        size = self.movq.config.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise ValueError(f"images must be uint8 [B,{size},{size},3], got {images.dtype} {images.shape}")
        batch_size = self.batch_size("encoder", batch_size)
        with autocast(self.device, self.autocast):
            out = [self.encoder(torch.from_numpy(images[i:i + batch_size]).to(self.device)).cpu().numpy()
                   for i in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, *self.grid), np.int32)

    @torch.no_grad()
    def decode(self, indices: np.ndarray, batch_size: Optional[int] = None) -> np.ndarray:
        """int [B,h,w,c] (or [B,N]) -> uint8 [B,H,W,3]."""
        indices = np.asarray(indices).reshape(-1, *self.grid).astype(np.int32)
        size = self.movq.config.image_size
        batch_size = self.batch_size("decoder", batch_size)
        with autocast(self.device, self.autocast):
            out = [self.decoder(torch.from_numpy(indices[i:i + batch_size]).to(self.device)).cpu().numpy()
                   for i in range(0, len(indices), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, size, size, 3), np.uint8)

    # ---- sampling and editing ------------------------------------------------------------------------------------
    def sample_tokens(self, n: int, steps: int = DEFAULTS.steps, seed: int = 0, class_labels=None,
                      temperature: float = DEFAULTS.temperature,
                      choice_temperature: float = DEFAULTS.choice_temperature, batch_size: Optional[int] = None,
                      guidance_scale=DEFAULTS.guidance_scale) -> np.ndarray:
        """int32 [n, N]: n token grids sampled from scratch; image i uses noise stream (seed, i)."""
        h, w, c = self.grid
        labels = sampling.resolve_class_labels(class_labels, n, self.num_classes)
        return sampling.sample_tokens(self.step_fn, n, h * w * c, self.mask_id, steps, seed, labels, temperature,
                                      choice_temperature, self.batch_size("prior", batch_size),
                                      guidance_scale=guidance_scale)

    def sample(self, n: int, steps: int = DEFAULTS.steps, seed: int = 0, class_labels=None,
               temperature: float = DEFAULTS.temperature, choice_temperature: float = DEFAULTS.choice_temperature,
               batch_size: Optional[int] = None, guidance_scale=DEFAULTS.guidance_scale) -> np.ndarray:
        """uint8 [n, H, W, 3]. batch_size: images per call of each graph (default: what fits the memory budget)."""
        tokens = self.sample_tokens(n, steps, seed, class_labels, temperature, choice_temperature, batch_size,
                                    guidance_scale)
        return self.decode(tokens, batch_size)

    def edit_tokens(self, tokens: np.ndarray, slot_mask: np.ndarray, steps: int = DEFAULTS.steps, seed: int = 0,
                    class_labels=None, temperature: float = DEFAULTS.temperature,
                    choice_temperature: float = DEFAULTS.choice_temperature, batch_size: Optional[int] = None,
                    guidance_scale=DEFAULTS.guidance_scale) -> np.ndarray:
        """Regenerates the masked slots of tokens int [B,N] (slot_mask bool [B,N]); int32 [B,N]."""
        labels = sampling.resolve_class_labels(class_labels, len(tokens), self.num_classes)
        return sampling.edit_tokens(self.step_fn, tokens, slot_mask, self.mask_id, steps, seed, labels, temperature,
                                    choice_temperature, self.batch_size("prior", batch_size),
                                    guidance_scale=guidance_scale)

    def edit(self, images: np.ndarray, masks: np.ndarray, steps: int = DEFAULTS.steps, seed: int = 0,
             class_labels=None, temperature: float = DEFAULTS.temperature,
             choice_temperature: float = DEFAULTS.choice_temperature, batch_size: Optional[int] = None,
             guidance_scale=DEFAULTS.guidance_scale) -> np.ndarray:
        """Inpaints uint8 images [B,H,W,3] where the bool pixel masks [B,H,W] are True; uint8 [B,H,W,3].

        Every latent position whose cell holds a masked pixel is regenerated (all c slots); the others keep the
        image's own tokens, so an empty mask returns the reconstruction.
        """
        images, masks = np.asarray(images), np.asarray(masks)
        if masks.shape != images.shape[:3]:
            raise ValueError(f"masks must be bool [B,H,W] matching the images {images.shape[:3]}, got {masks.shape}")
        tokens = self.encode(images, batch_size).reshape(len(images), -1)
        slot_mask = sampling.slot_mask_from_pixels(masks, self.grid)
        edited = self.edit_tokens(tokens, slot_mask, steps, seed, class_labels, temperature, choice_temperature,
                                  batch_size, guidance_scale)
        return self.decode(edited, batch_size)
