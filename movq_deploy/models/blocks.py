"""The MoVQ tokenizer's building blocks: resnets, attention, up/down sampling and the norms, plain (GroupNorm) or
modulated by z_q (SpatialNorm, paper eq. 4). The layout and parameter names follow diffusers' VAE blocks, so that
`MoVQ.from_diffusers` is a key rename; movq.py composes them into the encoder and decoder."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SpatialNorm(nn.Module):
    """Paper eq. 4: GroupNorm(f) * gamma(z_q) + beta(z_q); gamma, beta = 1x1 convs of z_q resized (nearest) to f."""

    def __init__(self, channels: int, zq_channels: int, groups: int):
        super().__init__()
        # Names as diffusers' SpatialNorm, so weights map one to one.
        self.norm_layer = nn.GroupNorm(groups, channels, eps=1e-6, affine=True)
        self.conv_y = nn.Conv2d(zq_channels, channels, kernel_size=1)
        self.conv_b = nn.Conv2d(zq_channels, channels, kernel_size=1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        zq = F.interpolate(zq, size=f.shape[-2:], mode="nearest")  # (B, n_z, H_f, W_f)
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class GroupNorm(nn.GroupNorm):
    """Plain GroupNorm (eps 1e-6) that accepts, and ignores, the z_q argument SpatialNorm takes."""

    def __init__(self, channels: int, groups: int):
        super().__init__(groups, channels, eps=1e-6, affine=True)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x)


def make_norm(channels: int, groups: int, zq_channels: int | None = None) -> nn.Module:
    """GroupNorm, or the modulated SpatialNorm when `zq_channels` (n_z) is given; both called as norm(x, zq)."""
    return GroupNorm(channels, groups) if zq_channels is None else SpatialNorm(channels, zq_channels, groups)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int, zq_channels: int | None = None):
        super().__init__()
        self.norm1 = make_norm(in_ch, groups, zq_channels)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = make_norm(out_ch, groups, zq_channels)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x, zq)))
        h = self.conv2(F.silu(self.norm2(h, zq)))
        skip = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return skip + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the h*w positions (VQGAN's AttnBlock; diffusers' deprecated attn block)."""

    def __init__(self, channels: int, groups: int, zq_channels: int | None = None):
        super().__init__()
        self.norm = make_norm(channels, groups, zq_channels)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x, zq).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        # Written out (not F.scaled_dot_product_attention) so every exporter lowers it to MatMul/Softmax.
        attn = torch.softmax((q @ k.transpose(1, 2)) * C ** -0.5, dim=-1)  # (B, HW, HW)
        h = self.to_out(attn @ v)  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad as taming/diffusers: H -> H/2 exactly


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: resnets (each followed by attention if enabled), then an optional resampler."""

    def __init__(self, in_ch: int, out_ch: int, num_resnets: int, attention: bool, groups: int,
                 zq_channels: int | None, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups, zq_channels) for i in range(num_resnets))
        self.attentions = nn.ModuleList(
            AttentionBlock(out_ch, groups, zq_channels) for _ in range(num_resnets)) if attention else None
        self.downsample = Downsample(out_ch) if resample == "down" else None
        self.upsample = Upsample(out_ch) if resample == "up" else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, zq)
            if self.attentions is not None:
                x = self.attentions[i](x, zq)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class MidBlock(nn.Module):
    def __init__(self, channels: int, attention: bool, groups: int, zq_channels: int | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(channels, channels, groups, zq_channels) for _ in range(2))
        self.attentions = nn.ModuleList([AttentionBlock(channels, groups, zq_channels)]) if attention else None

    def forward(self, x: torch.Tensor, zq: torch.Tensor | None = None) -> torch.Tensor:
        x = self.resnets[0](x, zq)
        if self.attentions is not None:
            x = self.attentions[0](x, zq)
        return self.resnets[1](x, zq)
