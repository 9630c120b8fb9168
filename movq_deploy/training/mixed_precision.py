"""Mixed precision, TF32 and torch.compile for the training loops.

--precision bf16 runs the forward passes under `torch.autocast(dtype=torch.bfloat16)`: matmuls and convolutions in
bf16, everything autocast keeps in fp32 (norms, softmax, reductions) in fp32. The weights, their gradients and the
optimizer moments stay fp32, so there is no loss scaling (bf16 has fp32's exponent range). What must not be bf16:
- the quantizer: its distances and argmin run with autocast off, in fp32 (MultichannelQuantizer.forward); with
  8 mantissa bits, ||e||² - 2 z·e of neighbouring codes round to the same value and the argmin flips codes;
- the losses: the loops compute them on fp32 casts of the outputs (`fp32`);
- the codebook updates: the codebook is an fp32 parameter, updated by the fp32 optimizer, and dead-code restarts
  copy encoder outputs into it as fp32.
bf16 autocast also runs on the CPU, where it pays on CPUs with bf16 instructions (AVX512-BF16, AMX); elsewhere the
CPU emulates bf16 and it is slower than fp32.

TF32 (Ampere and later GPUs): fp32 matmuls and convolutions on tensor cores with a 10-bit mantissa; on by default,
`--no-tf32` turns it off. It also speeds up the parts that stay fp32 under bf16.

--compile wraps the model in `torch.compile`. Compilation happens at the first call; if it fails (no C++
compiler, an op the backend cannot lower) the run goes on eager after a one-line notice.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable

import torch

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast(precision: str, device: torch.device):
    """The forward-pass context: bf16 autocast on `device`, or nothing for fp32."""
    if check_precision(precision) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def fp32(*tensors: torch.Tensor):
    """fp32 views of autocast outputs, for the losses (a no-op on fp32 tensors)."""
    cast = tuple(t.float() for t in tensors)
    return cast[0] if len(cast) == 1 else cast


def configure_tf32(enabled: bool, device: torch.device) -> bool:
    """TF32 matmuls and cuDNN convolutions on CUDA devices of compute capability >= 8.0 (Ampere) when `enabled`.
    Returns whether TF32 is in use; on the CPU and older GPUs nothing changes."""
    if device.type != "cuda":
        return False
    use = enabled and torch.cuda.get_device_capability(device)[0] >= 8
    torch.set_float32_matmul_precision("high" if use else "highest")
    torch.backends.cudnn.conv.fp32_precision = "tf32" if use else "ieee"
    return use


class CompiledOrEager:
    """Calls `torch.compile(module)`; when its first call fails, says so in one line and calls `module` from then on.

    Keep the original module for state_dict / checkpoints: the compiled wrapper prefixes its keys.
    """

    def __init__(self, module: torch.nn.Module, notice: "Callable[[str], None] | None" = None, **compile_kwargs):
        self.module = module
        self.notice = notice or (lambda line: print(line, file=sys.stderr))
        self.call: "Callable | None" = None  # decided at the first call
        self.failure: "str | None" = None
        self.compiled: "Callable | None" = None
        try:
            self.compiled = torch.compile(module, **compile_kwargs)
        except Exception as e:  # e.g. an unknown backend name is refused here, before any call
            self.fall_back(e)

    def __call__(self, *args, **kwargs):
        if self.call is not None:
            return self.call(*args, **kwargs)
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as e:  # compilation errors come in many types (BackendCompilerFailed, InductorError, ...)
            self.fall_back(e)
            return self.module(*args, **kwargs)
        self.call = self.compiled
        return out

    def fall_back(self, error: Exception) -> None:
        cause = root_cause(error)
        first = (str(cause).strip().splitlines() or [""])[0][:160]
        self.failure = f"{type(cause).__name__}: {first}"
        self.notice(f"--compile: torch.compile failed ({self.failure}); continuing eager")
        self.call = self.module

    @property
    def compiled_ok(self) -> "bool | None":
        """True once a compiled call succeeded, False after a fallback, None before the first call."""
        return None if self.call is None else self.call is not self.module


def root_cause(error: BaseException) -> BaseException:
    """The innermost exception: dynamo wraps a backend's error (BackendCompilerFailed.inner_exception)."""
    seen = {id(error)}
    while True:
        inner = getattr(error, "inner_exception", None) or error.__cause__
        if inner is None or id(inner) in seen:
            return error
        seen.add(id(inner))
        error = inner


def maybe_compile(module: torch.nn.Module, enabled: bool, **compile_kwargs):
    """`module` itself, or a CompiledOrEager around it."""
    return CompiledOrEager(module, **compile_kwargs) if enabled else module
