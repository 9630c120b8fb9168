"""What every runner is: the Runner protocol, the tensor specs it declares, and the checks every `run` makes first.

    runner.inputs / runner.outputs: list[TensorSpec]     (names, numpy dtypes, shapes with "batch")
    runner.min_batch / runner.max_batch: int / int|None  (an engine profile's range; ONNX Runtime: 1 / None)
    runner.run({name: np.ndarray}) -> {name: np.ndarray} (thread-safe)
    runner.close(); with runner: ...                     (frees device memory now, not at garbage collection)

As Polygraphy's BaseRunner.infer does, `BaseRunner.run` checks the feeds once (names, dtypes, shapes, one batch
size within the profile) and then calls the backend's `run_impl`. A batch below the profile's minimum is padded
with copies of its last row and the padded rows are dropped from the outputs: rows never interact in these graphs,
so an image's result does not depend on the padding. numpy only.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict, List, Optional, Protocol

import numpy as np

from movq_deploy.contract import TensorSpec

__all__ = ["BaseRunner", "Runner", "TensorSpec", "optional_import"]


class Runner(Protocol):
    inputs: List[TensorSpec]
    outputs: List[TensorSpec]
    min_batch: int
    max_batch: Optional[int]

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]: ...

    def close(self) -> None: ...


# How a user who installed the wheel gets the GPU runtime (a checkout's `pip install -e .[gpu]` does the same)
GPU_INSTALL = "pip install 'movq-deploy[gpu]'"


def optional_import(module: str, what: str, install: str) -> ModuleType:
    """Imports an optional dependency when it is first needed; ImportError in one line saying what to install.

    The one lazy-import idiom of the backends: tensorrt, cuda-python and onnxruntime are each imported only by
    the backend that runs on them, so a machine without them still imports movq_deploy.
    """
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(f"{what} is not installed ({error}); install it with `{install}`") from None


class BaseRunner:
    """The checks and padding every runner shares; a backend sets the specs and implements `run_impl`."""

    name: str = "runner"
    inputs: List[TensorSpec] = []
    outputs: List[TensorSpec] = []
    min_batch: int = 1
    max_batch: Optional[int] = None

    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        batch = self.check_feeds(feeds)
        if batch is None or batch >= self.min_batch:
            return self.run_impl(feeds)
        padded = {spec.name: _pad_rows(feeds[spec.name], self.min_batch) if _batched(spec) else feeds[spec.name]
                  for spec in self.inputs}
        outputs = self.run_impl(padded)
        return {spec.name: outputs[spec.name][:batch] if _batched(spec) else outputs[spec.name]
                for spec in self.outputs}

    def run_impl(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Frees what the runner holds (sessions, device memory); the runner is unusable afterwards."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_feeds(self, feeds: Dict[str, np.ndarray]) -> Optional[int]:
        """The feeds' batch size (None when no input has one); ValueError naming the first problem."""
        expected = [spec.name for spec in self.inputs]
        if sorted(feeds) != sorted(expected):
            raise ValueError(f"{self.name}: expected inputs {sorted(expected)}, got {sorted(feeds)}")
        batch = None
        for spec in self.inputs:
            array = feeds[spec.name]
            if not isinstance(array, np.ndarray) or array.dtype != np.dtype(spec.dtype):
                got = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
                raise ValueError(f"{self.name}: input {spec.name!r} must be {spec.dtype}, got {got}")
            if array.ndim != len(spec.shape) or any(
                    want != "batch" and want != got for want, got in zip(spec.shape, array.shape)):
                raise ValueError(f"{self.name}: input {spec.name!r} must have shape {spec.shape}, got {array.shape}")
            if _batched(spec):
                if batch is not None and array.shape[0] != batch:
                    raise ValueError(f"{self.name}: inputs disagree on the batch size ({batch} vs {array.shape[0]})")
                batch = array.shape[0]
        if batch == 0:
            raise ValueError(f"{self.name}: the inputs hold no rows (batch 0)")
        if batch is not None and self.max_batch is not None and batch > self.max_batch:
            raise ValueError(f"{self.name}: batch {batch} is outside the engine's profile [{self.min_batch}, "
                             f"{self.max_batch}] (larger batches: rebuild with export/build_trt.py --max-batch)")
        return batch


def _batched(spec: TensorSpec) -> bool:
    return bool(spec.shape) and spec.shape[0] == "batch"


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` with its last row repeated up to `rows` rows."""
    return np.concatenate([array, np.repeat(array[-1:], rows - len(array), axis=0)])
