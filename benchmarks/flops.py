"""The prior step's FLOPs, analytic from its config and by part (the torch count of every graph is
movq_deploy.export.flops.counted_flops, which these are checked against).

One multiply-add is 2 FLOPs. Only the dense work is counted (matmuls, convolutions, attention products): norms,
softmax, the inverse-CDF draw and elementwise ops are memory-bound extras that the GEMM rate does not bound.
"""
from __future__ import annotations


def prior_step_flops(prior_config, batch: int = 1) -> dict:
    """Analytic FLOPs of one prior step for `batch` images, by part, from a PriorConfig.

    The transformer runs over the h*w positions (+1 class token when conditional), width W, MLP width M, the
    c indices of a position embedded (a lookup: 0 FLOPs) and predicted together by a W -> c*K head.
    """
    cfg = prior_config
    positions = cfg.h * cfg.w
    length = positions + (1 if cfg.num_classes > 0 else 0)
    width, mlp = cfg.width, cfg.mlp_dim
    per_layer = {
        "attention_qkv_proj": 2 * length * width * width * 4,  # q, k, v and output projections
        "attention_scores": 2 * length * length * width * 2,  # q k^T and weights @ v, all heads together
        "mlp": 2 * length * width * mlp * 2,
    }
    parts = {name: batch * cfg.depth * value for name, value in per_layer.items()}
    parts["embeddings"] = 0  # table lookups and a position add: no multiply-adds
    parts["head"] = batch * 2 * positions * width * cfg.c * cfg.codebook_size
    parts["total"] = sum(parts.values())
    return parts
