"""The TensorRT engine cache: when a .plan may be reused, when it must be rebuilt, and what the manifest records.

A serialized TensorRT engine is valid only for the TensorRT version and the GPU model that built it, and it encodes
the precision and the batch range (optimization profile) it was built for, and the builder settings that choose its
kernels (TF32, optimization level, workspace). So every engine entry in manifest.json carries exactly that, plus the
sha256 of the ONNX graph it came from and of the plan itself:

    "engines": {precision: {graph: {"file": "prior.fp16.plan", "sha256", "onnx_sha256", "tensorrt_version",
                                    "gpu_name", "compute_capability", "profile": {"min", "opt", "max"},
                                    "precision", "tf32", "opt_level", "workspace_bytes",
                                    "validation": {figure: value}}}}

export/build_trt.py rebuilds an engine unless all of (ONNX hash, TensorRT version, GPU, precision, profile, TF32,
builder optimization level, workspace) match and the plan on disk is intact; "validation" holds the engine's
errors against ONNX Runtime measured when it was built (movq_deploy.export.engine_check). The runtime refuses an
engine whose TensorRT version or GPU differ from this machine's, whose plan was altered, or that was built from
another ONNX graph than the one the manifest lists now. Pure Python (no TensorRT, no CUDA, no numpy), so all of it
is tested on machines without a GPU.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from movq_deploy.files import sha256_file
from movq_deploy.manifest import EngineDir

# An engine directory turns every graph it has (EngineDir.graph_names: prior_guided too, when present) into an
# engine, from its fp32 or fp16 ONNX graphs. The "int8" prior-step graphs hold ONNX Runtime's own int8
# ops (QAttention, MatMulIntegerToFloat), which TensorRT does not parse.
ENGINE_PRECISIONS = ("fp32", "fp16")
# The builder's timing cache, kept in the engine directory so that rebuilds and re-exports reuse it.
TIMING_CACHE_NAME = "tensorrt.timing-cache"
DEFAULT_OPT_LEVEL = 3  # TensorRT's own default builder optimization level
DEFAULT_WORKSPACE_BYTES = 4 << 30
REBUILD = "rebuild it with `python export/build_trt.py`"


@dataclass(frozen=True)
class BatchProfile:
    """The batch range of an engine's optimization profile: TensorRT tunes kernels for `opt`, accepts [min, max]."""

    min: int = 1
    opt: int = 16
    max: int = 64

    def __post_init__(self):
        if not (1 <= self.min <= self.opt <= self.max):
            raise ValueError(f"batch profile needs 1 <= min <= opt <= max, got min={self.min} opt={self.opt} max={self.max}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BatchProfile":
        return cls(min=int(d["min"]), opt=int(d["opt"]), max=int(d["max"]))


@dataclass(frozen=True)
class Platform:
    """What a serialized engine is bound to: the TensorRT version and the GPU model (name and compute capability)."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"

    def describe(self) -> str:
        return f"TensorRT {self.tensorrt_version} on {self.gpu_name} (sm {self.compute_capability})"


def plan_file_name(graph: str, precision: str) -> str:
    return f"{graph}.{precision}.plan"


def engine_key(onnx_sha256: str, platform: Platform, precision: str, profile: BatchProfile, tf32: bool = True,
               opt_level: int = DEFAULT_OPT_LEVEL, workspace_bytes: int = DEFAULT_WORKSPACE_BYTES) -> dict:
    """Everything an engine depends on; two builds with equal keys give interchangeable engines.

    `tf32`: whether fp32 tensors may use TF32 math (TensorRT's default); off only for exact-parity checks.
    `opt_level` (builder optimization level 0-5) and `workspace_bytes` (the workspace memory pool limit) decide
    which kernels the builder may pick, so they are part of the key too.
    """
    return {
        "onnx_sha256": onnx_sha256,
        "tensorrt_version": platform.tensorrt_version,
        "gpu_name": platform.gpu_name,
        "compute_capability": platform.compute_capability,
        "precision": precision,
        "profile": profile.to_dict(),
        "tf32": bool(tf32),
        "opt_level": int(opt_level),
        "workspace_bytes": int(workspace_bytes),
    }


def engine_entry(file: str, plan_sha256: str, key: dict) -> dict:
    """The manifest entry of a freshly built engine: its file and hash, and the key it was built under."""
    return {"file": file, "sha256": plan_sha256, **key}


def stale_reason(engine_dir: EngineDir, precision: str, graph: str, key: dict) -> Optional[str]:
    """Why the engine for (precision, graph) must be (re)built under `key`, or None when the cached plan is good.

    The reasons are checked in the order a user would look for them: no engine yet, a different source graph,
    TensorRT version, GPU, precision, batch profile, then the plan file itself (missing or altered).
    """
    entry = engine_dir.engine(precision, graph)
    if entry is None:
        return "no engine built yet"
    if entry.get("onnx_sha256") != key["onnx_sha256"]:
        return "its ONNX graph changed"
    if entry.get("tensorrt_version") != key["tensorrt_version"]:
        return f"built with TensorRT {entry.get('tensorrt_version')}, this is {key['tensorrt_version']}"
    if (entry.get("gpu_name"), entry.get("compute_capability")) != (key["gpu_name"], key["compute_capability"]):
        return f"built on {entry.get('gpu_name')} (sm {entry.get('compute_capability')}), this is {key['gpu_name']} (sm {key['compute_capability']})"
    if entry.get("precision") != key["precision"]:
        return f"built as {entry.get('precision')}, asked for {key['precision']}"
    if entry.get("profile") != key["profile"]:
        return f"built for batch profile {entry.get('profile')}, asked for {key['profile']}"
    if entry.get("tf32", True) != key["tf32"]:
        return f"built with TF32 {'on' if entry.get('tf32', True) else 'off'}, asked for {'on' if key['tf32'] else 'off'}"
    for setting, what in (("opt_level", "builder optimization level"), ("workspace_bytes", "workspace of")):
        if entry.get(setting) != key[setting]:
            return f"built with {what} {entry.get(setting)}, asked for {key[setting]}"
    plan = engine_dir.path / entry["file"]
    if not plan.is_file():
        return f"{entry['file']} is missing"
    if sha256_file(plan) != entry.get("sha256"):
        return f"{entry['file']} does not match its sha256 in the manifest"
    return None


def verify_plan(directory: "str | os.PathLike[str]", entry: dict) -> Path:
    """The plan an engine entry names, checked to exist and to match its sha256; else one line saying to rebuild."""
    path = Path(directory) / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} listed in manifest.json is missing: {REBUILD}")
    if sha256_file(path) != entry.get("sha256"):
        raise ValueError(f"{path} does not match its sha256 in manifest.json (the plan was altered or replaced): "
                         f"{REBUILD}")
    return path


def check_engine_source(entry: dict, graph_entry: Optional[dict]) -> None:
    """Raises ValueError when the engine was built from another ONNX graph than the one the manifest lists now
    (e.g. an engine directory whose graphs were swapped by hand after the build)."""
    if graph_entry is None or entry.get("onnx_sha256") != graph_entry.get("sha256"):
        listed = graph_entry.get("file") if graph_entry else "no graph"
        raise ValueError(f"{entry.get('file')} was built from another ONNX graph than {listed} (sha256 differs): "
                         f"{REBUILD}")


def platform_mismatch(entry: dict, platform: Platform) -> Optional[str]:
    """Why an engine cannot be deserialized on `platform` (TensorRT version or GPU differ), or None."""
    built = Platform(str(entry.get("tensorrt_version")), str(entry.get("gpu_name")), str(entry.get("compute_capability")))
    if built.tensorrt_version != platform.tensorrt_version:
        return (
            f"{entry.get('file')} was built with TensorRT {built.tensorrt_version} but this is TensorRT "
            f"{platform.tensorrt_version}: rebuild with `python export/build_trt.py`"
        )
    if (built.gpu_name, built.compute_capability) != (platform.gpu_name, platform.compute_capability):
        return (
            f"{entry.get('file')} was built on {built.gpu_name} (sm {built.compute_capability}) but this GPU is "
            f"{platform.gpu_name} (sm {platform.compute_capability}): rebuild with `python export/build_trt.py`"
        )
    return None


def check_engine_platform(entry: dict, platform: Platform) -> None:
    """Raises ValueError (one line) when the engine of `entry` was built for another TensorRT version or GPU."""
    reason = platform_mismatch(entry, platform)
    if reason is not None:
        raise ValueError(reason)


def usable_precisions(engine_dir: EngineDir, platform: Platform) -> list:
    """The precisions with an engine for every graph of the directory that matches `platform`, preferred (fastest)
    first."""
    usable = []
    for precision in ("fp16", "fp32"):
        entries = [engine_dir.engine(precision, graph) for graph in engine_dir.graph_names]
        if all(entry is not None and platform_mismatch(entry, platform) is None for entry in entries):
            usable.append(precision)
    return usable


def engines_status(engine_dir: EngineDir, platform: Platform) -> "tuple[bool, str]":
    """(True, which engines) when some precision has matching engines for all graphs, else (False, why not)."""
    usable = usable_precisions(engine_dir, platform)
    if usable:
        return True, f"{'/'.join(usable)} engines match {platform.describe()}"
    engines = engine_dir.engines
    if not engines:
        return False, "the engine directory has no TensorRT engines (run `python export/build_trt.py --fp16`)"
    reasons = []
    for precision, graphs in sorted(engines.items()):
        missing = [graph for graph in engine_dir.graph_names if graph not in graphs]
        if missing:
            reasons.append(f"{precision}: no {'/'.join(missing)} engine")
            continue
        mismatch = next(filter(None, (platform_mismatch(graphs[g], platform) for g in engine_dir.graph_names)), None)
        reasons.append(f"{precision}: {mismatch}")
    return False, "; ".join(reasons)
