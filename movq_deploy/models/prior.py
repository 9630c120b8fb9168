"""The MaskGIT prior of MoVQ: a bidirectional transformer over the multichannel token grid.

The tokenizer turns an image into an (h, w, c) grid of indices into one shared codebook of K codes. The prior sees
the grid row-major as N = h*w*c slots (the c indices of a position adjacent), some of them set to the mask id K.
Following the paper ("inversely concatenate chunks along the channel as one token"), the c indices of a position
are embedded separately and concatenated into one vector, so the transformer runs over h*w positions (plus an
optional class token), and its output head predicts the c indices of each position: logits [B, N, K].

Attention is written with plain matmuls and a softmax (not scaled_dot_product_attention) so that the exported ONNX
graph has the MatMul/Softmax/MatMul pattern that ONNX Runtime's transformer optimizer fuses, and parses in TensorRT.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn as nn

from movq_deploy.models.movq import config_from_dict


@dataclass
class PriorConfig:
    h: int = 16  # latent grid height
    w: int = 16  # latent grid width
    c: int = 4  # index channels (chunks) per position
    codebook_size: int = 1024  # K; the mask id is K
    num_classes: int = 0  # 0 = unconditional; conditional models reserve id num_classes for "no class"
    width: int = 1024  # transformer width; each of the c indices gets width // c of it
    depth: int = 24
    heads: int = 16
    mlp_dim: int = 4096
    dropout: float = 0.1
    class_dropout: float = 0.1  # training only: probability of replacing a label by the null class

    def __post_init__(self):
        if min(self.h, self.w, self.c, self.codebook_size, self.width, self.depth, self.heads, self.mlp_dim) <= 0:
            raise ValueError(f"PriorConfig sizes must be positive: {self}")
        if self.num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {self.num_classes}")
        if self.width % self.c:
            raise ValueError(f"width {self.width} must be divisible by the channels per position c = {self.c}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be divisible by heads {self.heads}")

    @property
    def grid(self) -> "tuple[int, int, int]":
        return (self.h, self.w, self.c)

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def num_positions(self) -> int:
        return self.h * self.w

    @property
    def num_slots(self) -> int:
        return self.h * self.w * self.c

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PriorConfig":
        return config_from_dict(cls, d)

    @classmethod
    def preset(cls, name: str, tokenizer, num_classes: int = 0) -> "PriorConfig":
        """"paper" (24 layers, 16 heads, width 1024, MLP 4096: the paper's ~307M prior) or "tiny" (2 CPU cores).

        `tokenizer` is the MoVQConfig whose grid and codebook size the prior models.
        """
        h, w, c = tokenizer.grid
        base = dict(h=h, w=w, c=c, codebook_size=tokenizer.codebook_size, num_classes=num_classes)
        if name == "paper":
            return cls(**base, width=1024, depth=24, heads=16, mlp_dim=4096, dropout=0.1, class_dropout=0.1)
        if name == "tiny":
            return cls(**base, width=128, depth=4, heads=4, mlp_dim=512, dropout=0.0, class_dropout=0.1)
        raise ValueError(f"unknown prior preset {name!r}; choose 'paper' or 'tiny'")


class SelfAttention(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.width // config.heads
        # Separate q/k/v projections: the layout ONNX Runtime's BERT attention fusion recognises.
        self.query = nn.Linear(config.width, config.width)
        self.key = nn.Linear(config.width, config.width)
        self.value = nn.Linear(config.width, config.width)
        self.out = nn.Linear(config.width, config.width)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, heads, T, head_dim)
            return t.reshape(batch, length, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, heads, T, T); bidirectional, no mask
        weights = self.dropout(scores.softmax(dim=-1))
        y = (weights @ v).transpose(1, 2).reshape(batch, length, width)  # (B, T, C)
        return self.dropout(self.out(y))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width)
        self.attn = SelfAttention(config)
        self.norm2 = nn.LayerNorm(config.width)
        self.mlp = nn.Sequential(
            nn.Linear(config.width, config.mlp_dim),
            nn.GELU(),
            nn.Linear(config.mlp_dim, config.width),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Branch first: ONNX Runtime's attention fusion looks for the branch's Add among the residual Add's
        # inputs and takes the first Add it finds, which in block 0 would be the embedding sum.
        x = self.attn(self.norm1(x)) + x
        return self.mlp(self.norm2(x)) + x


class MaskGITPrior(nn.Module):
    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        # One table for the c channels (the codebook is shared), K + 1 entries: the last is the mask token.
        self.token_embedding = nn.Embedding(config.codebook_size + 1, config.width // config.c)
        self.position_embedding = nn.Parameter(torch.zeros(1, config.num_positions, config.width))
        if config.conditional:
            # num_classes + 1 entries: the last is the null class (no label / class dropout).
            self.class_embedding = nn.Embedding(config.num_classes + 1, config.width)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = nn.LayerNorm(config.width)
        self.head = nn.Linear(config.width, config.c * config.codebook_size)
        self.apply(self._init_weights)
        nn.init.trunc_normal_(self.position_embedding, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT / MaskGIT style: truncated normal(0.02) weights, zero biases.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """tokens int [B, N] (mask id = K where unknown), class_labels int [B] or None -> logits [B, N, K]."""
        config = self.config
        # (Not while the TorchScript exporter traces: there shapes are tensors and the check would be baked in.)
        if not torch.jit.is_tracing() and (tokens.dim() != 2 or tokens.shape[1] != config.num_slots):
            raise ValueError(f"tokens must be [B, {config.num_slots}] (h*w*c), got {list(tokens.shape)}")
        batch = tokens.shape[0]
        x = self.token_embedding(tokens.long())  # (B, N, width / c)
        x = x.reshape(batch, config.num_positions, config.width)  # (B, h*w, width): the c embeddings concatenated
        x = x + self.position_embedding
        if config.conditional:
            if class_labels is None:
                class_labels = torch.full((batch,), config.num_classes, dtype=torch.long, device=tokens.device)
            class_labels = class_labels.long()
            if self.training and config.class_dropout > 0:
                dropped = torch.rand(batch, device=tokens.device) < config.class_dropout
                class_labels = class_labels.masked_fill(dropped, config.num_classes)
            cls = self.class_embedding(class_labels)[:, None]  # (B, 1, width)
            x = torch.cat([cls, x], dim=1)  # (B, 1 + h*w, width)
        elif class_labels is not None:
            raise ValueError("class_labels were given, but the prior is unconditional (num_classes = 0)")
        x = self.dropout(x)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if config.conditional:
            x = x[:, 1:]  # drop the class token
        logits = self.head(x)  # (B, h*w, c*K)
        return logits.reshape(batch, config.num_slots, config.codebook_size)  # (B, N, K), position-major

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def configure_optimizers(self, weight_decay: float, learning_rate: float) -> torch.optim.AdamW:
        """AdamW (MaskGIT's betas) with weight decay on the matrices only: no decay on biases, norms and embeddings
        (as nanoGPT and MaskGIT)."""
        decay = [p for n, p in self.named_parameters() if p.dim() >= 2 and "embedding" not in n]
        no_decay = [p for n, p in self.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
        return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate, betas=(0.9, 0.96))
