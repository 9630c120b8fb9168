"""Dense FLOPs of a graph, counted from its torch module (matmuls, convolutions, attention products).

One multiply-add is 2 FLOPs. Norms, softmax, the inverse-CDF draw and elementwise ops are not counted: they are
memory-bound extras that the GEMM rate does not bound. The export records each graph's count per image in the
manifest (`flops_per_image`), where the runtime's CPU choice reads it (movq_deploy.backends.cpu_choice); the
benchmarks hold stages against the GEMM rate with it.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def counted_flops(fn: Callable[[], object]) -> float:
    """FLOPs of the torch ops that `fn` runs (matmul, convolution, attention), counted with torch's FlopCounterMode.

    scaled_dot_product_attention is forced onto its math kernel while counting: the fused CPU kernel is not in the
    counter's registry and would count as 0.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def flops_per_image(spec) -> int:
    """Dense FLOPs of one call of the graph of `spec` (a movq_deploy.export.specs.GraphSpec) on one image."""
    from movq_deploy.export.specs import run_torch

    feeds = spec.make_inputs(1, np.random.default_rng(0))
    # Parameters frozen while counting: the counter hooks the gradient of every module output that requires one,
    # and a module may return a parameter itself (a learned F0), which has no gradient function to hook.
    trainable = [p for p in spec.module.parameters() if p.requires_grad]
    for parameter in trainable:
        parameter.requires_grad_(False)
    try:
        return int(counted_flops(lambda: run_torch(spec, feeds)))
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
