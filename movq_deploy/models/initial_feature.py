"""The decoder's initial feature F0 other than VQGAN's post_quant_conv (MoVQConfig.f0; paper §3.1, Fig. 6a row C).

Each maps z_q (B, n_z, h, w) to the decoder's conv_in input (B, z_channels, h, w). Why these widths and this sigma:
movq_deploy/models/movq.py's module docstring.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

FOURIER_SIGMA = 1.0  # the std of B's entries times sqrt(n_z)


class FourierFeatures(nn.Module):
    """gamma(z_q) = [cos 2piB.z_q, sin 2piB.z_q] per position: z_q (B, n_z, h, w) -> (B, width, h, w).

    2piB is one fixed buffer [width/2, n_z, 1, 1], so the phase is a single 1x1 Conv; fp16 exports keep that Conv
    and the Sin/Cos in fp32 (a phase of tens of radians keeps only ~0.03 rad of precision in fp16).
    """

    def __init__(self, zq_channels: int, width: int, sigma: float = FOURIER_SIGMA):
        super().__init__()
        b = torch.randn(width // 2, zq_channels) * (sigma / math.sqrt(zq_channels))
        self.register_buffer("frequencies", (2 * math.pi * b)[:, :, None, None])

    def forward(self, zq: torch.Tensor) -> torch.Tensor:
        phase = F.conv2d(zq.float(), self.frequencies)  # (B, width/2, h, w)
        return torch.cat([phase.cos(), phase.sin()], dim=1)  # (B, width, h, w)


def sinusoid_table(width: int, h: int, w: int) -> torch.Tensor:
    """2-D sinusoidal positional embedding (Transformer frequencies; half the channels for y, half for x):
    (1, width, h, w)."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (width/4,)

    def embed(positions: torch.Tensor) -> torch.Tensor:  # (n,) -> (width/2, n)
        angles = omega[:, None] * positions[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=0)

    ys = embed(torch.arange(h, dtype=torch.float64))[:, :, None].expand(-1, h, w)
    xs = embed(torch.arange(w, dtype=torch.float64))[:, None, :].expand(-1, h, w)
    return torch.cat([ys, xs], dim=0)[None].float()


class SinusoidFeature(nn.Module):
    """F0 = a fixed 2-D sinusoidal positional embedding, the same for every image (z_q only modulates)."""

    def __init__(self, width: int, h: int, w: int):
        super().__init__()
        self.register_buffer("table", sinusoid_table(width, h, w), persistent=False)  # a function of the config

    def forward(self, zq: torch.Tensor) -> torch.Tensor:
        return self.table.expand(zq.shape[0], -1, -1, -1)  # (B, width, h, w)


class LearnedFeature(nn.Module):
    """F0 = a learned constant (StyleGAN's input), the same for every image (z_q only modulates)."""

    def __init__(self, width: int, h: int, w: int):
        super().__init__()
        self.constant = nn.Parameter(torch.randn(1, width, h, w))

    def forward(self, zq: torch.Tensor) -> torch.Tensor:
        return self.constant.expand(zq.shape[0], -1, -1, -1)  # (B, width, h, w)


def make_initial_feature(cfg) -> nn.Module:
    """F0 for cfg.f0 other than "conv": z_q (B, n_z, h, w) -> (B, z_channels, h, w), the decoder's conv_in input."""
    if cfg.f0 == "fourier":
        return FourierFeatures(cfg.latent_channels, cfg.z_channels)
    if cfg.f0 == "sinusoid":
        return SinusoidFeature(cfg.z_channels, cfg.latent_size, cfg.latent_size)
    return LearnedFeature(cfg.z_channels, cfg.latent_size, cfg.latent_size)
