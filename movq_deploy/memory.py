"""Batches sized from a memory budget: how many items (images, token grids) of a loop fit, or why not even one does.

Every loop over images or token grids (training's token cache and evaluation, the export's calibration and
validation, the Generator's engine calls, recon metrics, bulk generation) asks `MemoryBudget.items` how many items
one call may take, from what one item costs it (measured: movq_deploy.models.footprint, or recorded in the engine
directory's manifest). The budget is for the loop's working set, on top of the model already loaded:

- `--memory-budget` / `memory_budget=` where a command or class offers it, else
- $MOVQ_MEMORY_BUDGET ("6G", "512M", "1.5GB" or bytes), else
- a quarter of the memory available when the budget is resolved, at most 4 GiB: beyond a few images per call a
  batch runs no faster per image on a CPU (BENCHMARKS.md), and the rest stays for the model and other processes.

torch-free: the runtime uses it too.
"""
from __future__ import annotations

import ctypes
import gc
import os
import re
from dataclasses import dataclass
from typing import Optional, Union

ENV = "MOVQ_MEMORY_BUDGET"
DEFAULT_SHARE = 0.25  # of the memory available
DEFAULT_CAP = 4 << 30
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class MemoryBudgetError(MemoryError):
    """Not even one item fits: raised before the loop starts, in one line naming what it needs."""


def parse_bytes(value: Union[str, int, float]) -> int:
    """"6G", "512M", "1.5GB", "2GiB" or a number of bytes -> bytes; ValueError in one line otherwise."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(value))
        if match is None:
            raise ValueError(f"a memory size is a number of bytes or one like 6G, 512M or 1.5GB, not {value!r}")
        number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"a memory size must be positive, got {value!r}")
    return size


def format_bytes(size: float) -> str:
    """Bytes for people: "3.2 GB", "850 MB" (powers of 1024, as the budgets are given)."""
    for unit, scale in (("TB", 1 << 40), ("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{int(size)} B"


def available_bytes() -> int:
    """Memory the system could give this process now without swapping (MemAvailable), else its physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class MemoryBudget:
    """`size` bytes for a loop's working set; `source` says where the number came from (for its messages)."""

    size: int
    source: str

    @classmethod
    def resolve(cls, value: "MemoryBudget | str | int | None" = None, option: str = "memory_budget",
                available: Optional[int] = None) -> "MemoryBudget":
        """The budget asked for (`value`, named `option` in messages), else $MOVQ_MEMORY_BUDGET, else the default
        (a share of `available`: by default the system's available memory; a GPU's free memory for GPU loops)."""
        if isinstance(value, MemoryBudget):
            return value
        if value is not None:
            return cls(parse_bytes(value), option)
        if os.environ.get(ENV):
            try:
                return cls(parse_bytes(os.environ[ENV]), f"${ENV}")
            except ValueError as error:
                raise ValueError(f"${ENV}: {error}") from None
        available = available_bytes() if available is None else available
        return cls(min(DEFAULT_CAP, int(available * DEFAULT_SHARE)),
                   f"the default, a quarter of the {format_bytes(available)} available, at most "
                   f"{format_bytes(DEFAULT_CAP)}; set ${ENV} to change it")

    def items(self, per_item: float, what: str, fixed: float = 0, most: Optional[int] = None) -> int:
        """How many items fit: the largest n with fixed + n * per_item <= size (at most `most`, the most that still
        speeds a call up). MemoryBudgetError, in one line naming `what`, when not even one does."""
        if per_item <= 0:
            raise ValueError(f"the memory of one item must be positive, got {per_item}")
        fits = int((self.size - fixed) // per_item)
        if fits < 1:
            needs = format_bytes(fixed + per_item)
            raise MemoryBudgetError(f"{what} needs {needs} for one item, more than the memory budget of "
                                    f"{format_bytes(self.size)} ({self.source})")
        return fits if most is None else max(1, min(fits, most))

    def __str__(self) -> str:
        return f"{format_bytes(self.size)} ({self.source})"


def release_freed() -> None:
    """Collects garbage and asks the C allocator (glibc's malloc_trim) to hand back to the system the pages it keeps
    after big temporaries are freed (an ONNX Runtime session's weights, a calibration's outputs), so that the next
    stage of a long job starts from what is really held. A no-op where there is no glibc."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def check_fits(needed: float, what: str, hint: str = "", available: Optional[int] = None) -> None:
    """MemoryBudgetError in one line, before a stage starts, when it needs more memory than is available now
    (`available`: by default the system's available memory; a GPU's free memory for a stage on a GPU)."""
    available = available_bytes() if available is None else available
    if needed > available:
        raise MemoryBudgetError(f"{what} needs about {format_bytes(needed)}, but only {format_bytes(available)} "
                                f"is available{'; ' + hint if hint else ''}")
