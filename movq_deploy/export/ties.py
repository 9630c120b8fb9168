"""Validation mismatches that are exact ties: either answer is the same draw, within fp32 rounding."""
from __future__ import annotations

import numpy as np
import torch

from movq_deploy.models.graphs import PriorStepGraph  # or GuidedPriorStepGraph

# Two codebook distances closer than this (relative to their size) are a tie: argmin may pick either.
TIE_RTOL = 1e-5


def encoder_ties(movq):
    """Counts mismatched indices whose two codes are equally near z (within fp32 rounding): argmin may pick either."""

    def count(feeds, ref, cand, off) -> int:
        with torch.no_grad():
            x = torch.from_numpy(feeds["image"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            z = movq.encode_z(x).double()  # (B, n_z, h, w)
        chunks = z.permute(0, 2, 3, 1).reshape(*ref.shape, movq.config.code_dim)  # (B, h, w, c, d)
        codebook = movq.quantizer.codebook.weight.double()  # (K, d)
        vectors = chunks[tuple(torch.from_numpy(np.argwhere(off)).T)]  # (M, d)
        ref_codes = codebook[torch.from_numpy(ref[off]).long()]
        cand_codes = codebook[torch.from_numpy(cand[off]).long()]
        gap = ((vectors - ref_codes).pow(2).sum(1) - (vectors - cand_codes).pow(2).sum(1)).abs()
        scale = vectors.pow(2).sum(1) + ref_codes.pow(2).sum(1) + cand_codes.pow(2).sum(1)
        return int((gap <= TIE_RTOL * scale).sum())

    return count


def prior_ties(step: PriorStepGraph):
    """Counts mismatched tokens drawn at a CDF boundary: token = #{k : cdf[k] < u * total}, so when u * total lies
    within fp32 rounding of cdf[k] for every k between the two tokens, either token is the same draw."""

    def count(feeds, ref, cand, off) -> int:
        labels = torch.from_numpy(feeds["class_labels"]) if "class_labels" in feeds else None
        guidance = (torch.from_numpy(feeds["guidance_scale"]),) if "guidance_scale" in feeds else ()
        with torch.no_grad():
            temperature = torch.from_numpy(feeds["temperature"]).double()[:, None, None]  # per image
            logits = step.logits(torch.from_numpy(feeds["tokens"]), labels, *guidance).double() / temperature
        cdf = logits.softmax(-1).cumsum(-1).numpy()  # (B, N, K)
        threshold = feeds["uniform"].astype(np.float64) * cdf[..., -1]  # (B, N)
        ties = 0
        for b, n in np.argwhere(off):
            low, high = sorted((int(ref[b, n]), int(cand[b, n])))
            ties += bool(np.all(np.abs(cdf[b, n, low:high] - threshold[b, n]) <= TIE_RTOL))
        return ties

    return count
