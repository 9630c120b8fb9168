"""A runner opened by its first call, for the graphs only some calls use.

The encoder runs only for edit, encode and reconstruct, and the guided prior only for rows with guidance_scale > 0;
a plain `sample` uses neither. At paper size the guided prior holds as much as the prior (ONNX Runtime fp32 1.2 GB;
OpenVINO bf16 2.6 GB once it has run: the cached blob's fp32 weights, mapped, and its repacked bf16 copy), so a
process that never guides should not hold it. The CPU backends open these graphs on first use (their file is
verified when the Generator opens, so a missing or altered file is still refused at once); `Generator.warm_up()`
opens them ahead, as a serving replica does so that no request waits for a compilation. numpy only.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, List, Optional

import numpy as np

from movq_deploy.backends.base import Runner
from movq_deploy.contract import GUIDED_PRIOR

ON_FIRST_USE = ("encoder", GUIDED_PRIOR)


class DeferredRunner:
    """Stands for the runner `open_runner()` returns, and opens it on the first call that needs it (thread-safe:
    once), as it does for anything else asked of it but its batch range, which is the CPU runners' (1, unbounded)
    so that batch limits can be set before it opens. Checks given to `when_opened` run on the opened runner before
    anything else uses it."""

    min_batch: int = 1
    max_batch: Optional[int] = None

    def __init__(self, name: str, open_runner: Callable[[], Runner]):
        self.name = name
        self._open_runner = open_runner
        self._runner: Optional[Runner] = None
        self._checks: List[Callable[[Runner], None]] = []
        self._closed = False
        self._lock = threading.Lock()

    @property
    def opened(self) -> bool:
        return self._runner is not None

    def when_opened(self, check: Callable[[Runner], None]) -> None:
        """Runs `check(runner)` once the runner is open: now if it is, else when it opens (a failing check leaves it
        unopened, and raises to the call that opened it)."""
        with self._lock:
            if self._runner is None:
                self._checks.append(check)
                return
        check(self._runner)

    def open(self) -> Runner:
        """The runner, opened (and checked) now if it was not."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: the runner is closed")
            if self._runner is None:
                runner = self._open_runner()
                try:
                    for check in self._checks:
                        check(runner)
                except Exception:
                    runner.close()
                    raise
                self._runner = runner
            return self._runner

    def __getattr__(self, name: str):
        """What else a runner has (inputs, outputs, an ONNX Runtime session, a path): the opened runner's."""
        if name.startswith("_"):  # not set yet (unpickling, __init__): never open for those
            raise AttributeError(name)
        return getattr(self.open(), name)

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return self.open().run(feeds)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            runner, self._runner = self._runner, None
        if runner is not None:
            runner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
