"""What one image costs each graph in memory, measured once on its PyTorch module at export, and the rows per call
that every later loop over a graph takes within the memory budget.

Two figures per graph and image (movq_deploy.models.footprint, margin included):
- "peak": what one more image adds to the peak while the graph runs (ONNX Runtime, OpenVINO or PyTorch): the
  budget of the export's comparisons and of the Generator's engine calls;
- "allocated": every tensor the graph computes for one image, held or not: what a calibrator that records every
  intermediate tensor holds per image (ONNX Runtime's quantize_static, NNCF's statistics).
The manifest keeps them (`memory_per_image` beside `flops_per_image`), so that the runtime sizes its calls from
the same figures without torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import numpy as np

from movq_deploy.memory import MemoryBudget
from movq_deploy.models import footprint


def graph_footprint(spec) -> Dict[str, int]:
    """{"peak", "allocated"}: bytes per image of the graph of `spec` (a GraphSpec), measured on its module."""
    import torch

    from movq_deploy.export.specs import run_torch

    rng = np.random.default_rng(0)

    @torch.no_grad()
    def call(batch: int):
        run_torch(spec, spec.make_inputs(batch, rng))

    cost = footprint.measure(call)
    return {"peak": cost.peak_per_item, "allocated": cost.allocated_per_item}


@dataclass(frozen=True)
class GraphMemory:
    """The export's budget and each graph's bytes per image: rows per call of every loop over a graph."""

    budget: MemoryBudget
    per_image: Dict[str, Dict[str, int]]  # graph -> graph_footprint

    def rows(self, graph: str, what: str, every_tensor: bool = False, most: "int | None" = None) -> int:
        """Images per call of graph `graph` within the budget: by its peak, or (`every_tensor`) by everything it
        allocates, for a calibrator that records every intermediate tensor. MemoryBudgetError in one line naming
        `what` when not even one fits."""
        figure = self.per_image[graph]["allocated" if every_tensor else "peak"]
        return self.budget.items(figure, f"{what} ({graph} graph)", most=most)

    @classmethod
    def measure(cls, specs: dict, budget: "MemoryBudget | str | int | None" = None) -> "GraphMemory":
        return cls(MemoryBudget.resolve(budget, "--memory-budget"),
                   {name: graph_footprint(spec) for name, spec in specs.items()})
