"""What this CPU computes natively: the instruction-set extensions that decide which CPU path is fast.

    bf16: AVX-512 BF16 or AMX-BF16 (without them OpenVINO would emulate bf16, slower than fp32)
    int8: AVX-512 VNNI, AVX-VNNI or AMX-INT8 (the u8s8 dot products int8 GEMMs are built on)

Read from /proc/cpuinfo (Linux); elsewhere nothing is assumed native. numpy-free, torch-free.
"""
from __future__ import annotations

import functools
from typing import FrozenSet

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
REPORTED_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
                  "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> FrozenSet[str]:
    """The flags of the first processor in /proc/cpuinfo (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16() -> bool:
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


def native_int8() -> bool:
    return any(flag in cpu_flags() for flag in INT8_FLAGS)


def describe() -> str:
    """The extensions that matter here, for a reason line: "avx512_bf16, amx_bf16, ..." or "none of ..."."""
    present = [flag for flag in REPORTED_FLAGS if flag in cpu_flags()]
    return ", ".join(present) if present else f"none of {', '.join(REPORTED_FLAGS)}"
