"""The multichannel quantizer (paper §3.2): n_z channels split into c chunks, each snapped to its nearest entry of
one shared codebook."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MultichannelQuantizer(nn.Module):
    """z (B, n_z, h, w) -> c chunks of d channels per position, each snapped to the nearest of K shared codes.

    Chunk j of a position holds channels [j*d, (j+1)*d) of z. With c = 1 this is exactly the VQ-VAE/VQGAN
    quantizer: loss = ||sg(z_q) - z||²·beta + ||z_q - sg(z)||² (codebook + beta·commitment; diffusers' `legacy`
    quantizer swaps the two weights), straight-through gradient z + sg(z_q - z).
    """

    def __init__(self, codebook_size: int, code_dim: int, num_chunks: int, beta: float):
        super().__init__()
        self.codebook_size, self.code_dim, self.num_chunks, self.beta = codebook_size, code_dim, num_chunks, beta
        self.codebook = nn.Embedding(codebook_size, code_dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)  # as taming/diffusers

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices int64 (B, h, w, c) of the nearest codes (L2), as one MatMul + ArgMin in an exported graph.

        ||z - e||² = ||z||² - 2 z·e + ||e||²; the ||z||² term is the same for every code of a row, so the argmin
        is taken over ||e||² - 2 z·e: same indices, less work and less cancellation (keep it fp32 in fp16 graphs).
        """
        _, _, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.code_dim)  # (B*h*w*c, d), the c chunks of a position adjacent
        e = self.codebook.weight  # (K, d)
        dist = e.pow(2).sum(1)[None, :] - 2.0 * flat @ e.t()  # (B*h*w*c, K), ||z - e||² - ||z||²
        return dist.argmin(dim=1).reshape(-1, h, w, self.num_chunks)

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Indices (B, h, w, c), any integer dtype -> z_q (B, n_z, h, w)."""
        _, h, w, c = indices.shape
        zq = self.codebook(indices.long())  # (B, h, w, c, d)
        return zq.reshape(-1, h, w, c * self.code_dim).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor):
        """-> (z_q with straight-through gradient, loss, info dict). Under autocast, all of it runs in fp32: in bf16
        the distances of neighbouring codes round to the same value and the argmin flips codes."""
        if z.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(z.device.type):
            with torch.autocast(z.device.type, enabled=False):
                return self._quantize(z.float())
        return self._quantize(z)

    def _quantize(self, z: torch.Tensor):
        indices = self.nearest(z)
        zq = self.lookup(indices)
        codebook_loss = F.mse_loss(zq, z.detach())
        commitment_loss = F.mse_loss(z, zq.detach())
        loss = codebook_loss + self.beta * commitment_loss
        zq = z + (zq - z).detach()
        with torch.no_grad():
            flat = indices.flatten()
            # scatter_add, not bincount: it also runs on the meta device and under torch.compile.
            counts = torch.zeros(self.codebook_size, dtype=torch.int64, device=z.device).scatter_add_(
                0, flat, torch.ones_like(flat))  # (K,) code use in this batch; all-reduce it across DDP ranks
            probs = counts.float() / counts.sum()
            perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        info = {"indices": indices, "perplexity": perplexity, "code_counts": counts,
                "usage": (counts > 0).float().mean(), "codebook_loss": codebook_loss.detach(),
                "commitment_loss": commitment_loss.detach()}
        return zq, loss, info
