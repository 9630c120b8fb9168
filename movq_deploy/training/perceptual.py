"""LPIPS-style perceptual loss on VGG16 features, used only when its weights are already on this machine.

Weights are never downloaded. The VGG16 weights are torchvision's `vgg16-397923af.pth` layout (looked for in the
torch hub cache, or given with --perceptual-weights); LPIPS' learned per-channel weights (`lpips/weights/v0.1/
vgg.pth`) are used when the lpips package is installed, otherwise every channel weighs the same (the "baseline"
variant of Zhang et al. 2018, which still correlates well with perception).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
import torch.nn as nn

VGG_FILE = "vgg16-397923af.pth"
# torchvision's vgg16().features: conv widths, "M" = max-pool; LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16_LAYOUT = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
TAPS = (3, 8, 15, 22, 29)  # indices (in torchvision's features Sequential) of the ReLUs LPIPS reads


def default_vgg_path() -> Path:
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    return torch_home / "hub" / "checkpoints" / VGG_FILE


def _lpips_lin_path() -> Path | None:
    spec = importlib.util.find_spec("lpips")  # locate the package's data without importing it (it needs torchvision)
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"
    return path if path.is_file() else None


class PerceptualLoss(nn.Module):
    """LPIPS(vgg) distance of images in [-1, 1]: mean over images of sum over taps of the weighted squared
    difference of unit-normalised features, averaged over positions. Frozen; gradients flow to the inputs."""

    def __init__(self, vgg_state: dict, lin_state: dict | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, item, 3, padding=1), nn.ReLU(inplace=False)]
                in_ch = item
        self.features = nn.Sequential(*layers)
        features = {k.removeprefix("features."): v for k, v in vgg_state.items() if k.startswith("features.")}
        self.features.load_state_dict(features)
        widths = [64, 128, 256, 512, 512]
        lins = [torch.ones(1, c, 1, 1) for c in widths]
        if lin_state is not None:
            lins = [lin_state[f"lin{i}.model.1.weight"].reshape(1, -1, 1, 1) for i in range(len(widths))]
        for i, w in enumerate(lins):
            self.register_buffer(f"lin{i}", w.float())
        # LPIPS' input scaling (its ScalingLayer), for images in [-1, 1].
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        h = (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
            if i == TAPS[-1]:
                break
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(())
        for i, (fx, fy) in enumerate(zip(self._taps(x), self._taps(y))):
            total = total + ((fx - fy).pow(2) * getattr(self, f"lin{i}")).sum(1).mean()
        return total

    def train(self, mode: bool = True):  # always frozen
        return super().train(False)


def load_perceptual(path: "str | Path | None" = None) -> tuple[PerceptualLoss | None, str]:
    """-> (loss or None, a one-line notice saying what was used). Never downloads anything."""
    vgg_path = Path(path) if path is not None else default_vgg_path()
    if not vgg_path.is_file():
        return None, (f"perceptual loss off: no VGG16 weights at {vgg_path} (nothing is downloaded; pass "
                      f"--perceptual-weights FILE with torchvision's {VGG_FILE} to enable it)")
    try:
        vgg_state = torch.load(vgg_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot load VGG16 weights {vgg_path}: {str(e).splitlines()[0]}") from None
    lin_path = _lpips_lin_path()
    lin_state = torch.load(lin_path, map_location="cpu", weights_only=True) if lin_path else None
    which = f"LPIPS weights {lin_path}" if lin_path else "uniform channel weights (lpips not installed)"
    return PerceptualLoss(vgg_state, lin_state), f"perceptual loss on: VGG16 {vgg_path}, {which}"
