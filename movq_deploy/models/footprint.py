"""What one item (an image, a token grid) costs a PyTorch call in memory, measured rather than guessed.

`measure(call)` runs `call(batch)` once, then at two batch sizes under torch's profiler with memory tracking, and
reads, from its allocation events in time order, the peak of the memory torch held during the call and the bytes it
allocated in all; the difference between the two batches is one item's share. That covers whatever the call does (forward
only or a training step, any model and size), where a formula would have to know every layer. Measured on the CPU
at small batches (1 and 2), in a second or two at paper size; the budgets add `MARGIN` for what torch's allocator
does not see (oneDNN's scratch memory, the allocator's own slack).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Tuple

MARGIN = 1.25  # the measured peak's share of the real one is about 0.8-0.9 (BENCHMARKS.md, "Paper size end to end")


@dataclass(frozen=True)
class Footprint:
    """Bytes, per item and for the call as a whole, of one call (margin included)."""

    peak_per_item: int  # what one more item adds to the call's peak
    peak_fixed: int  # the peak with no item (extrapolated; what the call holds whatever the batch)
    allocated_per_item: int  # bytes allocated over the call per item: every intermediate tensor of one item

    def peak(self, batch: int) -> int:
        return self.peak_fixed + batch * self.peak_per_item


def _peak_and_total(call: Callable[[int], Any], batch: int, device: str) -> Tuple[int, int]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    # torch's profiler (kineto) writes two lines to stderr per use unless told otherwise before its first use
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")

    if torch.device(device).type == "cuda":  # the allocator's own statistics: exact, and no profiler needed
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call(batch)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        return peak, peak

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        call(batch)
    held = peak = total = 0
    for event in sorted(prof.events(), key=lambda event: event.time_range.start):
        change = event.self_cpu_memory_usage
        held += change
        peak = max(peak, held)
        total += max(change, 0)
    return peak, total


def measure(call: Callable[[int], Any], batches: Tuple[int, int] = (1, 2), device: str = "cpu") -> Footprint:
    """The footprint of `call(batch)` (which makes its own inputs: they count), from runs at the two `batches`, in
    the memory of `device` (on CUDA "allocated" is the peak: the allocator keeps no total)."""
    import torch

    small, large = batches
    # The calls draw from torch's random streams (dropout, say): measuring must leave them as they were
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        call(small)  # a first call allocates once what later calls reuse (oneDNN's reordered weights, caches)
        (peak_small, total_small), (peak_large, total_large) = (_peak_and_total(call, b, device) for b in batches)
    per_item = max(peak_large - peak_small, 1) / (large - small)  # a peak that does not grow: all of it fixed
    fixed = max(peak_small - small * per_item, 0)
    allocated = max(total_large - total_small, per_item * (large - small)) / (large - small)  # held => allocated
    return Footprint(int(per_item * MARGIN), int(fixed * MARGIN), int(allocated * MARGIN))


def batch_size(call: Callable[[int], Any], budget, what: str, most: "int | None" = None, device: str = "cpu") -> int:
    """How many items one `call` may take within `budget` (a movq_deploy.memory.MemoryBudget), measured; a one-line
    MemoryBudgetError naming `what` when not even one fits."""
    cost = measure(call, device=device)
    return budget.items(cost.peak_per_item, what, fixed=cost.peak_fixed, most=most)
