"""TensorBoard, the optional second logger (--tensorboard DIR) beside metrics.jsonl.

Every number of a metrics record becomes a scalar under its stage ("tokenizer/loss", "prior/eval_masked_accuracy"),
at the record's step; image grids (uint8 [H, W, 3]) go in as images. Only rank 0 writes. The tensorboard package
is an extra (`pip install "movq-deploy[tensorboard]"`); asking for it without the package is a one-line error.
"""
from __future__ import annotations

import numbers
from pathlib import Path

import numpy as np


class TensorBoardLog:
    """A SummaryWriter, or nothing when `log_dir` is None or this is not rank 0."""

    def __init__(self, log_dir: "str | Path | None", stage: str, enabled: bool = True):
        self.stage = stage
        self.writer = None
        if log_dir is None or not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError('--tensorboard needs the tensorboard package: pip install "movq-deploy[tensorboard]"') \
                from None
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def record(self, record: dict) -> None:
        """Scalars of one metrics.jsonl record (its "step" is the x axis; non-numbers are left out)."""
        if self.writer is None:
            return
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(f"{self.stage}/{key}", float(value), step)

    def image(self, name: str, grid: np.ndarray, step: int) -> None:
        """A uint8 [H, W, 3] image grid."""
        if self.writer is not None:
            self.writer.add_image(f"{self.stage}/{name}", grid, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

