"""Reconstruction metrics of uint8 image sets [n, H, W, 3]: SSIM, LPIPS (given VGG16 weights) and rFID (given a
TorchScript FID Inception). Nothing is downloaded: the weighted metrics take their weights by path."""
from __future__ import annotations

import numpy as np
import torch
from scipy import linalg
from skimage.metrics import structural_similarity

from movq_deploy.memory import MemoryBudget
from movq_deploy.models import footprint
from movq_deploy.training.data import to_tensor
from movq_deploy.training.perceptual import load_perceptual


def ssim(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-image SSIM (skimage, colour, data range 255)."""
    return np.array([structural_similarity(a, b, channel_axis=-1, data_range=255) for a, b in zip(reference, test)])


def batch_in_budget(call, size: int, what: str, budget=None) -> int:
    """Image pairs per call of `call(batch)` on `size`x`size` images within the memory budget (measured)."""
    return footprint.batch_size(call, MemoryBudget.resolve(budget), f"{what} of {size}x{size} images", most=64)


@torch.no_grad()
def lpips_distance(reference: np.ndarray, test: np.ndarray, vgg_weights: str, batch_size: "int | None" = None) -> float:
    """Mean LPIPS(vgg) over the pairs, with the training code's network (movq_deploy.training.perceptual);
    `batch_size` pairs per call (default: what the memory budget holds)."""
    network, _ = load_perceptual(vgg_weights)
    if network is None:
        raise FileNotFoundError(f"no VGG16 weights at {vgg_weights}")
    if batch_size is None:
        size = reference.shape[1]

        @torch.no_grad()
        def blank(batch):
            network(torch.zeros(batch, 3, size, size), torch.zeros(batch, 3, size, size))

        batch_size = batch_in_budget(blank, size, "LPIPS")
    total = 0.0
    for start in range(0, len(reference), batch_size):
        a, b = to_tensor(reference[start:start + batch_size]), to_tensor(test[start:start + batch_size])
        total += float(network(a, b)) * len(a)
    return total / len(reference)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """||mu_a - mu_b||² + Tr(S_a + S_b - 2 (S_a S_b)^1/2) of two feature sets [n, d] (Heusel et al. 2017)."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular product (few samples): offset both, as the reference code does
        offset = np.eye(len(cov_a)) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root.real))


@torch.no_grad()
def rfid(reference: np.ndarray, test: np.ndarray, inception_path: str, batch_size: "int | None" = None) -> float:
    """rFID with the FID reference Inception as TorchScript (StyleGAN3's / clean-fid's inception-2015-12-05.pt,
    called as model(images [n, 3, H, W] in 0..255, return_features=True) -> [n, 2048]; it resizes to 299 itself).
    With a few dozen images the 2048-d covariances are rank-deficient: compare such figures only with each other.
    `batch_size` images per call (default: what the memory budget holds)."""
    model = torch.jit.load(inception_path, map_location="cpu").eval()
    if batch_size is None:
        size = reference.shape[1]

        @torch.no_grad()
        def blank(batch):
            model(torch.zeros(batch, 3, size, size), return_features=True)

        batch_size = batch_in_budget(blank, size, "Inception features")

    def features(images: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
            out.append(model(x.float(), return_features=True).double().numpy())
        return np.concatenate(out)

    return frechet_distance(features(reference), features(test))
