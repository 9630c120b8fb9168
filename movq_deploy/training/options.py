"""The command-line options both training scripts share for training at scale: precision and compilation, the
input pipeline, the optional TensorBoard logger, gradient accumulation and clipping."""
from __future__ import annotations

import argparse

from movq_deploy.training.mixed_precision import PRECISIONS


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_scale_arguments(parser: argparse.ArgumentParser, clip_grad: "float | None") -> None:
    group = parser.add_argument_group("training at scale")
    group.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="bf16: autocast the forward passes (weights, optimizer, losses and the quantizer stay "
                            "fp32)")
    group.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                       help="TF32 matmuls and convolutions on Ampere and later GPUs (default: on)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile the model; if compilation fails, one notice and the run goes on eager")
    group.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default: inductor)")
    group.add_argument("--workers", type=non_negative_int, default=None,
                       help="DataLoader worker processes per rank, decoding and cropping ahead of the step; 0 = in "
                            "the main process (default: 2 on the CPU, 8 per GPU)")
    group.add_argument("--grad-accum", type=positive_int, default=1,
                       help="micro-batches of --batch-size per optimizer step (global batch = batch x accum x world)")
    group.add_argument("--clip-grad", type=float, default=clip_grad,
                       help=f"clip the gradient norm to this before each optimizer step "
                            f"(default: {clip_grad if clip_grad is not None else 'off'}; 0 = off)")
    group.add_argument("--memory-budget", default=None, metavar="SIZE",
                       help="memory for the batched loops outside the training step (encoding crops, held-out "
                            "evaluation), e.g. 4G (default: $MOVQ_MEMORY_BUDGET, else a quarter of the memory "
                            "available, at most 4 GB)")
    group.add_argument("--tensorboard", default=None, metavar="DIR",
                       help="also log to TensorBoard event files in DIR (losses, held-out metrics, image grids)")
