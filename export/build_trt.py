"""Build TensorRT engines from an engine directory's ONNX graphs, and record them in its manifest.

    python export/build_trt.py [--engine-dir engines/] --fp16 [--min-batch 1 --opt-batch 16 --max-batch 64]
                               [--workspace-gb 4] [--opt-level 3] [--timing-cache PATH] [--no-tf32] [--force]

Each graph (encoder, decoder, prior) of the chosen precision (the fp16 ONNX graphs with --fp16, fp32 otherwise) is
parsed into a strongly typed network: precision comes from the ONNX graph itself, which is the only mode TensorRT
11 has (no FP16/INT8 builder flags). One optimization profile spans the batch range; fp32 math may use TF32 (not
with --no-tf32). A timing cache persists between builds. An engine is rebuilt only when it is stale (ONNX hash,
TensorRT version, GPU, precision, profile or TF32 changed, or its plan is missing or altered; see
movq_deploy/engine_cache.py). Without TensorRT or without a GPU it exits non-zero with one line saying which,
having written nothing.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from movq_deploy import engine_cache
from movq_deploy.engine_cache import TIMING_CACHE_NAME
from movq_deploy.export import tensorrt_lint
from movq_deploy.backends.tensorrt import current_platform, trt_logger
from movq_deploy.files import atomic_path, atomic_write_bytes
from movq_deploy.manifest import EngineDir


@dataclass
class BuildOptions:
    precision: str = "fp16"
    profile: engine_cache.BatchProfile = engine_cache.BatchProfile()
    workspace_gb: float = 4.0
    opt_level: Optional[int] = None  # TensorRT's default (3) when None
    timing_cache: Optional[Path] = None  # engine_dir / TIMING_CACHE_NAME when None
    tf32: bool = True  # fp32 tensors may use TF32 math (TensorRT's default); off for exact-parity checks
    force: bool = False


def build_engines(engine_dir: "str | Path", options: BuildOptions, log: Callable[[str], None] = print) -> dict:
    """Builds the stale engines of `engine_dir` for `options.precision`; returns {graph: "built" | "up to date"}.

    Checks TensorRT and the GPU before touching anything (ImportError / RuntimeError otherwise). The manifest is
    rewritten after each engine, so an interrupted run keeps the engines it finished.
    """
    platform = current_platform()  # first: a one-line ImportError / RuntimeError when TensorRT or the GPU is missing
    import tensorrt as trt

    engine_dir = EngineDir.load(engine_dir)
    graphs = engine_dir.graphs.get(options.precision)
    if not graphs:
        raise ValueError(f"{engine_dir.manifest_path} has no {options.precision} ONNX graphs (export them with export/to_onnx.py)")
    missing = [graph for graph in engine_cache.ENGINE_GRAPHS if graph not in graphs]
    if missing:
        raise ValueError(f"{engine_dir.manifest_path} has no {options.precision} {'/'.join(missing)} graph")

    cache_path = options.timing_cache or engine_dir.path / TIMING_CACHE_NAME
    log(f"{platform.describe()}; {options.precision}, batch {options.profile.to_dict()}")
    results = {}
    for graph in engine_cache.ENGINE_GRAPHS:
        onnx_path = engine_dir.verify(graphs[graph])  # the ONNX on disk is the one the manifest describes
        key = engine_cache.engine_key(graphs[graph]["sha256"], platform, options.precision, options.profile, options.tf32)
        reason = "--force" if options.force else engine_cache.stale_reason(engine_dir, options.precision, graph, key)
        if reason is None:
            log(f"{graph}: up to date")
            results[graph] = "up to date"
            continue
        log(f"{graph}: building from {onnx_path.name} ({reason})")
        tensorrt_lint.check_file(onnx_path)  # TensorRT's parser rules, in one line, before its longer log
        timing_cache = cache_path.read_bytes() if cache_path.is_file() else b""
        plan, timing_cache = build_serialized_engine(trt, onnx_path, options, timing_cache, log)
        plan_name = engine_cache.plan_file_name(graph, options.precision)
        with atomic_path(engine_dir.path / plan_name) as tmp:
            tmp.write_bytes(plan)
        atomic_write_bytes(cache_path, timing_cache)
        entry = engine_cache.engine_entry(plan_name, hashlib.sha256(plan).hexdigest(), key)
        engine_dir.set_engine(options.precision, graph, entry)
        engine_dir.write()
        log(f"{graph}: wrote {plan_name} ({len(plan) / 2**20:.1f} MiB)")
        results[graph] = "built"
    return results


def build_serialized_engine(trt, onnx_path: Path, options: BuildOptions, timing_cache: bytes, log=print) -> "tuple[bytes, bytes]":
    """(serialized engine, updated timing cache) for the ONNX graph at `onnx_path`."""
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # 10.x: opt in; 11.x: always on (flag ignored)
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise ValueError(parser_error_message(parser, onnx_path))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * 2**30))
    if options.opt_level is not None:
        config.builder_optimization_level = options.opt_level
    if hasattr(trt.BuilderFlag, "TF32"):  # a math mode for fp32 tensors (not a type): allowed when strongly typed
        if options.tf32:
            config.set_flag(trt.BuilderFlag.TF32)
        else:
            config.clear_flag(trt.BuilderFlag.TF32)

    profile = builder.create_optimization_profile()
    dynamic = 0
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = tuple(tensor.shape)
        if -1 not in shape:
            continue
        if shape[0] != -1 or -1 in shape[1:]:
            raise ValueError(f"{onnx_path.name}: input {tensor.name!r} has shape {shape}; only the batch axis may be dynamic")
        rest = shape[1:]
        p = options.profile
        profile.set_shape(tensor.name, (p.min, *rest), (p.opt, *rest), (p.max, *rest))
        dynamic += 1
    if dynamic:
        config.add_optimization_profile(profile)

    cache = config.create_timing_cache(timing_cache)
    if cache is None or not config.set_timing_cache(cache, False):
        log("  the timing cache was made by another TensorRT or GPU: starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def parser_error_message(parser, onnx_path: Path) -> str:
    """One line naming each failing ONNX node (index, name, op type) and TensorRT's description."""
    errors = []
    for index in range(parser.num_errors):
        error = parser.get_error(index)
        node = f"node {error.node()}"
        if hasattr(error, "node_name"):  # TensorRT >= 10 reports the node's name and op type
            node += f" {error.node_name()!r} ({error.node_operator()})"
        errors.append(f"{node}: {error.desc()}")
    return f"TensorRT could not parse {onnx_path.name}: " + ("; ".join(errors) or "no error reported")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir", type=Path, default=Path("engines"), help="engine directory written by export/to_onnx.py")
    parser.add_argument("--fp16", action="store_true", help="build from the fp16 ONNX graphs (default: fp32, TF32 allowed)")
    parser.add_argument("--min-batch", type=int, default=1)
    parser.add_argument("--opt-batch", type=int, default=16, help="the batch TensorRT tunes its kernels for")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--workspace-gb", type=float, default=4.0, help="builder workspace memory pool limit (GiB)")
    parser.add_argument("--opt-level", type=int, default=None, choices=range(6), help="builder optimization level 0-5 (TensorRT default 3)")
    parser.add_argument("--timing-cache", type=Path, default=None, help=f"timing cache file (default: ENGINE_DIR/{TIMING_CACHE_NAME})")
    parser.add_argument("--no-tf32", action="store_true", help="keep fp32 math in full fp32 (TF32 is on by default)")
    parser.add_argument("--force", action="store_true", help="rebuild even the engines that are up to date")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        options = BuildOptions(
            precision="fp16" if args.fp16 else "fp32",
            profile=engine_cache.BatchProfile(args.min_batch, args.opt_batch, args.max_batch),
            workspace_gb=args.workspace_gb,
            opt_level=args.opt_level,
            timing_cache=args.timing_cache,
            tf32=not args.no_tf32,
            force=args.force,
        )
        build_engines(args.engine_dir, options)
    except (ImportError, RuntimeError, ValueError, OSError) as error:
        print(f"build_trt.py: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
