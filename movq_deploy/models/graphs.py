"""The torch modules that ARE the exported ONNX graphs: their inputs and outputs are the deployment boundary.

- EncoderGraph: image uint8 [B,H,W,3] -> indices int32 [B,h,w,c]
- DecoderGraph: indices int32 [B,h,w,c] -> image uint8 [B,H,W,3]
- PriorStepGraph: one MaskGIT step; the logits [B,N,K] stay inside, only O(B*N) tensors cross the boundary.
- GuidedPriorStepGraph: the same step with classifier-free guidance (class-conditional priors): the conditional
  and null-class rows in one batched prior call inside, logits = cond + w * (cond - uncond), the same tail.

Their input and output names and types are movq_deploy.contract's.

Uint8 images and int32 indices keep host<->device traffic small and make every backend agree on the exact
conversion (scale, clamp, round) because it is part of the graph. The randomness is an input (host noise from
movq_deploy.sampling): no Random*/Multinomial ops, which TensorRT either rejects or does not seed.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from movq_deploy.contract import PRIOR_OUTPUTS, prior_input_names
from movq_deploy.models.prior import MaskGITPrior

# Codes per block of the two-level categorical draw (see `inverse_cdf_draw`).
DRAW_BLOCK = 32


def inverse_cdf_draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The code whose cumulative probability first reaches uniform * total: int64 [B,N] from probs [B,N,K].

    Drawn in two levels, the block of (up to) DRAW_BLOCK codes and then the code inside it, so the graph cumulates
    B*N*(K/S + S) values instead of B*N*K (a flat CumSum over K was a large share of the tiny prior step on ONNX
    Runtime: BENCHMARKS.md, benchmarks/step_tail.py). Comparisons are counted in float (exact below 2^24) so that no int64
    reduction reaches TensorRT.
    """
    num_codes = probs.shape[-1]
    # The largest block size <= DRAW_BLOCK that divides K (32 for the usual power-of-two codebooks); no padding,
    # because the TorchScript exporter mis-slices a padded last axis at opset 17.
    block_size = max(size for size in range(1, min(DRAW_BLOCK, num_codes) + 1) if num_codes % size == 0)
    blocks = probs.unflatten(-1, (num_codes // block_size, block_size))  # (B, N, G, S)
    block_cdf = blocks.sum(dim=-1).cumsum(dim=-1)  # (B, N, G)
    threshold = uniform[..., None] * block_cdf[..., -1:]  # (B, N, 1); the total, not 1, absorbs rounding
    last_block = num_codes // block_size - 1
    # Counted and clamped in float, then cast: TensorRT's operator table has no Clip on INT64.
    block_count = (block_cdf < threshold).float().sum(dim=-1).clamp(max=last_block)  # (B, N)
    block = block_count.to(torch.int64)
    previous = (block_count - 1).clamp(min=0).to(torch.int64)  # (B, N)
    mass_before = block_cdf.gather(-1, previous[..., None])[..., 0]  # (B, N)
    mass_before = torch.where(block > 0, mass_before, torch.zeros_like(mass_before))
    inside = blocks.gather(2, block[..., None, None].expand(-1, -1, 1, block_size))[:, :, 0]  # (B, N, S)
    cdf = inside.cumsum(dim=-1) + mass_before[..., None]  # (B, N, S)
    code = (cdf < threshold).float().sum(dim=-1).clamp(max=block_size - 1).to(torch.int64)  # (B, N)
    return block * block_size + code


class EncoderGraph(nn.Module):
    """image uint8 [B,H,W,3] -> indices int32 [B,h,w,c] (the nearest-code argmin inside)."""

    input_names = ["image"]
    output_names = ["indices"]

    def __init__(self, movq):
        super().__init__()
        self.movq = movq

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # Cast before any other op: TensorRT's ONNX parser allows UINT8 only at the network's edges, straight into
        # (or out of) a Cast, so a Transpose on the uint8 image would fail to parse.
        x = image.float().permute(0, 3, 1, 2) / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        return self.movq.encode(x).to(torch.int32)  # (B, h, w, c)


class DecoderGraph(nn.Module):
    """indices int32 [B,h,w,c] -> image uint8 [B,H,W,3]: clamp to [-1, 1], (x + 1) * 127.5, round half to even."""

    input_names = ["indices"]
    output_names = ["image"]

    def __init__(self, movq):
        super().__init__()
        self.movq = movq

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.movq.decode(indices.long())  # (B, 3, H, W), ~[-1, 1]
        x = ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
        return x.permute(0, 2, 3, 1).to(torch.uint8)  # (B, H, W, 3); the Cast is the last op (uint8 edge rule)


class PriorStepGraph(nn.Module):
    """One step of MaskGIT decoding, semantics of movq_deploy.sampling.StepFn.

    For masked slots (token == K): token = #{k : cdf[k] < uniform * cdf[K-1]} clamped to K-1 (inverse CDF of
    softmax(logits / temperature), one host uniform per slot) and confidence = log_softmax(logits / temperature)
    [token] + choice_scale * gumbel. Known slots keep their token and get confidence +inf. temperature and
    choice_scale are per image, so one call may serve images of different requests at different steps.
    """

    output_names = list(PRIOR_OUTPUTS)

    def __init__(self, prior: MaskGITPrior):
        super().__init__()
        self.prior = prior

    @property
    def input_names(self) -> "list[str]":
        return prior_input_names(self.prior.config.conditional)

    def logits(self, tokens: torch.Tensor, class_labels: Optional[torch.Tensor]) -> torch.Tensor:
        """The prior's logits (B, N, K), in fp32 even when the rest of the graph is converted to fp16."""
        return self.prior(tokens, class_labels).float()

    def forward(
        self,
        tokens: torch.Tensor,  # int32 [B, N]
        class_labels: Optional[torch.Tensor],  # int32 [B] for conditional priors, else None
        uniform: torch.Tensor,  # f32 [B, N] in [0, 1)
        gumbel: torch.Tensor,  # f32 [B, N]
        temperature: torch.Tensor,  # f32 [B]
        choice_scale: torch.Tensor,  # f32 [B]
    ) -> "tuple[torch.Tensor, torch.Tensor]":
        return self.draw(self.logits(tokens, class_labels), tokens, uniform, gumbel, temperature, choice_scale)

    def draw(self, logits, tokens, uniform, gumbel, temperature, choice_scale) -> "tuple[torch.Tensor, torch.Tensor]":
        """The sampling tail every prior-step graph shares: logits (B, N, K) -> (sampled, confidence)."""
        num_codes = self.prior.config.codebook_size
        logits = logits / temperature[:, None, None]  # (B, N, K); the softmax statistics in fp32
        log_probs = logits.log_softmax(dim=-1)  # (B, N, K)
        drawn = inverse_cdf_draw(log_probs.exp(), uniform)  # (B, N)
        log_prob = log_probs.gather(-1, drawn[..., None])[..., 0]  # (B, N)
        confidence = log_prob + choice_scale[:, None] * gumbel
        known = tokens != num_codes
        sampled = torch.where(known, tokens, drawn.to(torch.int32))
        confidence = torch.where(known, torch.full_like(confidence, float("inf")), confidence)
        return sampled, confidence


class GuidedPriorStepGraph(PriorStepGraph):
    """PriorStepGraph with classifier-free guidance, for class-conditional priors (trained with a null class).

    The prior runs once on 2B rows (the tokens twice: with class_labels, then with the null class id num_classes);
    logits = cond + guidance_scale * (cond - uncond) (MUSE's form; w = 0 is the conditional prior), then the same
    tail as PriorStepGraph. Only O(B*N) tensors cross the boundary, as in the plain step.
    """

    def __init__(self, prior: MaskGITPrior):
        if not prior.config.conditional:
            raise ValueError("classifier-free guidance needs a class-conditional prior (num_classes > 0)")
        super().__init__(prior)

    @property
    def input_names(self) -> "list[str]":
        return prior_input_names(conditional=True, guided=True)

    def logits(self, tokens, class_labels, guidance_scale=None) -> torch.Tensor:
        null = torch.full_like(class_labels, self.prior.config.num_classes)  # (B,)
        both = self.prior(torch.cat([tokens, tokens]), torch.cat([class_labels, null])).float()  # (2B, N, K)
        cond, uncond = both.unflatten(0, (2, tokens.shape[0])).unbind(0)  # (B, N, K) each
        return cond + guidance_scale[:, None, None] * (cond - uncond)

    def forward(self, tokens, class_labels, uniform, gumbel, temperature, choice_scale, guidance_scale):
        # tokens int32 [B,N], class_labels int32 [B], uniform / gumbel f32 [B,N], the three scales f32 [B]
        logits = self.logits(tokens, class_labels, guidance_scale)
        return self.draw(logits, tokens, uniform, gumbel, temperature, choice_scale)
