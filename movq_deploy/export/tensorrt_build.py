"""TensorRT engines from an engine directory's ONNX graphs: built, checked against ONNX Runtime, recorded.

Each graph (encoder, decoder, prior, and prior_guided when the directory has it) of the chosen precision (the
fp16 ONNX graphs for fp16, fp32 otherwise) is linted against TensorRT's ONNX parser rules, then parsed into a
strongly typed network: precision comes from the ONNX graph itself, which is the only mode TensorRT 11 has (no
FP16/INT8 builder flags). One optimization profile per engine, tuned for that graph's own opt batch (how the
Generator calls it); fp32 math may use TF32. A timing cache persists between builds. Each new engine is run
against the fp32 graph on ONNX Runtime through Polygraphy's comparator (movq_deploy.export.engine_check) and
refused outside tolerance; its figures go into the manifest. An engine is rebuilt only when it is stale
(movq_deploy/engine_cache.py).

Why our own builder and not Polygraphy's loaders (NetworkFromOnnxPath / CreateConfig / EngineBytesFromNetwork):
polygraphy 0.53.6 would do for TensorRT 10.x and 11.x when strongly typed, but these ~60 lines are all the build
is, they set exactly the 10.x/11.x calls we checked (strong typing, TF32 as a math mode, the timing cache), and a
loader chain would add a layer to debug on a first GPU run without removing any check. Polygraphy is used where it
adds one: the comparison.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

from movq_deploy import engine_cache
from movq_deploy.backends.tensorrt import current_platform, import_tensorrt, trt_logger
from movq_deploy.contract import GUIDED_PRIOR
from movq_deploy.export import engine_check, tensorrt_lint
from movq_deploy.files import atomic_path, atomic_write_bytes
from movq_deploy.generator import DEFAULT_IMAGE_BATCH, DEFAULT_PRIOR_BATCH
from movq_deploy.manifest import EngineDir

# The batch each graph's kernels are tuned for unless --opt-batch says otherwise: the Generator's own call sizes.
DEFAULT_OPT_BATCH = {"encoder": DEFAULT_IMAGE_BATCH, "decoder": DEFAULT_IMAGE_BATCH, "prior": DEFAULT_PRIOR_BATCH,
                     GUIDED_PRIOR: DEFAULT_PRIOR_BATCH}
CHECK_BATCH = 8  # the comparison runs at the profile's min batch and at min(max, CHECK_BATCH)


@dataclass
class BuildOptions:
    precision: str = "fp16"
    min_batch: int = 1
    max_batch: int = 64
    opt_batch: Optional[int] = None  # None: DEFAULT_OPT_BATCH per graph, clamped into [min_batch, max_batch]
    workspace_gb: float = 4.0
    opt_level: int = engine_cache.DEFAULT_OPT_LEVEL
    timing_cache: Optional[Path] = None  # engine_dir / TIMING_CACHE_NAME when None
    tf32: bool = True  # fp32 tensors may use TF32 math (TensorRT's default); off for exact-parity checks
    force: bool = False

    def profile(self, graph: str) -> engine_cache.BatchProfile:
        opt = self.opt_batch if self.opt_batch is not None else DEFAULT_OPT_BATCH[graph]
        return engine_cache.BatchProfile(self.min_batch, min(max(opt, self.min_batch), self.max_batch), self.max_batch)

    @property
    def workspace_bytes(self) -> int:
        return int(self.workspace_gb * 2**30)


def build_engines(engine_dir: "str | Path", options: BuildOptions, log: Callable[[str], None] = print) -> dict:
    """Builds the stale engines of `engine_dir` for `options.precision`; returns {graph: "built" | "up to date"}.

    Checks TensorRT and the GPU before touching anything (ImportError / RuntimeError otherwise). The manifest is
    rewritten after each engine, so an interrupted run keeps the engines it finished; an engine that fails its
    comparison is not written (EngineMismatch).
    """
    for graph in DEFAULT_OPT_BATCH:
        options.profile(graph)  # a bad batch range fails here, before TensorRT or the GPU are looked for
    platform = current_platform()  # a one-line ImportError / RuntimeError when TensorRT or the GPU is missing
    trt = import_tensorrt()
    engine_dir = EngineDir.load(engine_dir)
    graphs = engine_dir.graphs.get(options.precision) or {}
    missing = [graph for graph in engine_dir.graph_names if graph not in graphs]
    if missing:
        raise ValueError(f"{engine_dir.manifest_path} has no {options.precision} {'/'.join(missing)} graph "
                         f"(export it with export/to_onnx.py{' --fp16' if options.precision == 'fp16' else ''})")
    cache_path = options.timing_cache or engine_dir.path / engine_cache.TIMING_CACHE_NAME
    log(f"{platform.describe()}; {options.precision}, batch {options.min_batch}..{options.max_batch}")
    results = {}
    for graph in engine_dir.graph_names:
        onnx_path = engine_dir.verify(graphs[graph])  # the ONNX on disk is the one the manifest describes
        profile = options.profile(graph)
        key = engine_cache.engine_key(graphs[graph]["sha256"], platform, options.precision, profile, options.tf32,
                                      options.opt_level, options.workspace_bytes)
        reason = "--force" if options.force else engine_cache.stale_reason(engine_dir, options.precision, graph, key)
        if reason is None:
            log(f"{graph}: up to date")
            results[graph] = "up to date"
            continue
        log(f"{graph}: building from {onnx_path.name}, opt batch {profile.opt} ({reason})")
        tensorrt_lint.check_file(onnx_path)  # TensorRT's parser rules, in one line, before its longer log
        timing_cache = cache_path.read_bytes() if cache_path.is_file() else b""
        plan, timing_cache = build_serialized_engine(trt, onnx_path, options, profile, timing_cache, log)
        errors = check_against_onnxruntime(plan, engine_dir, options.precision, graph, profile)
        log(f"{graph}: vs ONNX Runtime fp32: {', '.join(f'{k} {v:.4g}' for k, v in errors.items())}")
        plan_name = engine_cache.plan_file_name(graph, options.precision)
        with atomic_path(engine_dir.path / plan_name) as tmp:
            tmp.write_bytes(plan)
        atomic_write_bytes(cache_path, timing_cache)
        entry = engine_cache.engine_entry(plan_name, hashlib.sha256(plan).hexdigest(), key)
        engine_dir.set_engine(options.precision, graph, {**entry, "validation": errors})
        engine_dir.write()
        log(f"{graph}: wrote {plan_name} ({len(plan) / 2**20:.1f} MiB)")
        results[graph] = "built"
    return results


def check_against_onnxruntime(plan: bytes, engine_dir: EngineDir, precision: str, graph: str,
                              profile: engine_cache.BatchProfile) -> Dict[str, float]:
    """The new engine (Polygraphy's TrtRunner) against the fp32 graph on ONNX Runtime: figures, or EngineMismatch."""
    reference = engine_dir.graph("fp32", graph)
    if reference is None:
        raise ValueError(f"{engine_dir.manifest_path} has no fp32 {graph} graph to check the engine against")
    batches = sorted({profile.min, min(profile.max, CHECK_BATCH)})
    return engine_check.check_engine(
        engine_check.tensorrt_runner(plan), engine_dir.verify(reference), reference["inputs"], precision=precision,
        graph=graph, codebook_size=engine_dir.codebook_size, num_classes=engine_dir.num_classes, batches=batches)


def build_serialized_engine(trt, onnx_path: Path, options: BuildOptions, profile: engine_cache.BatchProfile,
                            timing_cache: bytes, log=print) -> "tuple[bytes, bytes]":
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
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    config.builder_optimization_level = options.opt_level
    if hasattr(trt.BuilderFlag, "TF32"):  # a math mode for fp32 tensors (not a type): allowed when strongly typed
        if options.tf32:
            config.set_flag(trt.BuilderFlag.TF32)
        else:
            config.clear_flag(trt.BuilderFlag.TF32)
    add_batch_profile(builder, network, config, profile, onnx_path.name)

    cache = config.create_timing_cache(timing_cache)
    if cache is None or not config.set_timing_cache(cache, False):
        log("  the timing cache was made by another TensorRT or GPU: starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see its log above)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def add_batch_profile(builder, network, config, profile: engine_cache.BatchProfile, name: str) -> None:
    """One optimization profile over the batch axis of every dynamic input (the only axis that may be dynamic)."""
    trt_profile = builder.create_optimization_profile()
    dynamic = 0
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        shape = tuple(tensor.shape)
        if -1 not in shape:
            continue
        if shape[0] != -1 or -1 in shape[1:]:
            raise ValueError(f"{name}: input {tensor.name!r} has shape {shape}; only the batch axis may be dynamic")
        rest = shape[1:]
        trt_profile.set_shape(tensor.name, (profile.min, *rest), (profile.opt, *rest), (profile.max, *rest))
        dynamic += 1
    if dynamic and config.add_optimization_profile(trt_profile) < 0:  # -1: TensorRT found the profile invalid
        raise ValueError(f"{name}: TensorRT rejected the batch profile {profile.to_dict()} (see its log above)")


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
