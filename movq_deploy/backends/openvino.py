"""OpenVINO runners: the engine directory's ONNX graphs compiled by OpenVINO's CPU plugin, in fp32, bf16 or int8.

ONNX Runtime's CPU provider has no bf16 arithmetic on x86 (onnxruntime#20630, #28768), and OpenVINO's CPU plugin
has it (AVX-512 BF16, AMX), so this backend is how the package reaches a CPU's bf16 units. It reads the same ONNX
graphs as ONNX Runtime (no other file is exported for it), except int8, which has graphs of its own.

bf16 keeps the precision-sensitive ends of each graph in fp32 (`fp32_ends`; docs/DESIGN.md, "The CPU choice"):
- the prior's logits projection (its last MatMul) and the sampling head after it (softmax, CumSum, the
  log-probability, the confidence; with guidance also the cond/uncond mix);
- the encoder's last two convolutions and the nearest-code search after them;
- the decoder's Fourier phase (the codebook lookup, 2piB.z_q, Sin, Cos), its last convolution and clamp/scale/round.
OpenVINO's CPU plugin takes one inference precision per compiled model (per-node runtime attributes such as
`disable_fp16_compression` did not change its bf16 result), so the graph is cut into up to three consecutive
parts, [fp32 prefix] [bf16 body] [fp32 suffix], each compiled on its own; the tensors that cross a cut (the prior's
logits, for one) pass from one part to the next in host memory.

Compiled models are cached in OpenVINO's own model cache (the CACHE_DIR property, keyed by OpenVINO's version, the
device and the model), by default in `<engine dir>.openvino-cache/` beside the engine directory.

A compiled model may run several infer requests at once; each request is used by one thread at a time, so the
runner keeps a pool of idle requests. numpy + openvino only (no torch).
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Set

import numpy as np
import openvino as ov
from openvino import opset13 as ops
from openvino.passes import ConstantFolding, Manager

from movq_deploy.backends import cpu_features
from movq_deploy.backends.base import BaseRunner, TensorSpec
from movq_deploy.backends.cpu_choice import OPENVINO_INT8
from movq_deploy.contract import PRIOR_GRAPHS

logger = logging.getLogger("movq_deploy")

PRECISIONS = ("fp32", "bf16", "int8")
CACHE_SUFFIX = ".openvino-cache"
_SKIPPED = ("Parameter", "Constant", "Result")  # not parts of a stage: parameters and constants go where used
_OV_DTYPES = {"f32": "float32", "f16": "float16", "u8": "uint8", "i8": "int8", "i32": "int32", "i64": "int64",
              "boolean": "bool"}


def shared_core() -> ov.Core:
    """The process's one OpenVINO Core, made on first use and kept until the process ends.

    One Core, not one per runner: each Core loads its own CPU plugin, and the plugin installs an alternate signal
    stack for the thread that creates it and puts the previous one back when it is destroyed. Cores destroyed in
    another order than they were made leave the thread's alternate stack pointing at unmapped memory, and the next
    signal handled on it (Python's SIGCHLD handler, when a DataLoader worker or any child process exits) crashes
    the process with SIGSEGV (tests/backends/test_openvino.py). The model cache is a property of each compile,
    not of the Core.
    """
    global _CORE
    with _CORE_LOCK:
        if _CORE is None:
            _CORE = ov.Core()
        return _CORE


_CORE: Optional[ov.Core] = None
_CORE_LOCK = threading.Lock()


def default_cache_dir(engine_dir: Path) -> Path:
    """Where compiled models are cached when the caller names no folder: beside the engine directory."""
    engine_dir = Path(engine_dir).resolve()
    return engine_dir.with_name(engine_dir.name + CACHE_SUFFIX)


# ---- where a graph keeps fp32 --------------------------------------------------------------------------------


def downstream(model: ov.Model, seeds: Set[str]) -> Set[str]:
    """Friendly names of the ops that depend on any op named in `seeds` (the seeds excluded)."""
    reached, found = set(seeds), set()
    for op in model.get_ordered_ops():
        if any(i.get_source_output().get_node().get_friendly_name() in reached for i in op.inputs()):
            reached.add(op.get_friendly_name())
            found.add(op.get_friendly_name())
    return found


def upstream(model: ov.Model, types: Set[str]) -> Set[str]:
    """Friendly names of the ops of `types` and of every op they depend on."""
    found: Set[str] = set()
    pending = [op for op in model.get_ordered_ops() if op.get_type_name() in types]
    while pending:
        op = pending.pop()
        if op.get_friendly_name() not in found:
            found.add(op.get_friendly_name())
            pending.extend(i.get_source_output().get_node() for i in op.inputs())
    return found


def fp32_ends(model: ov.Model, graph: str) -> "tuple[Set[str], Set[str]]":
    """(prefix, suffix): the ops graph `graph` keeps in fp32 at its start and at its end (see the module doc).

    Measured on the trained digits model (BENCHMARKS.md, "bf16 on OpenVINO"): with the whole prior in bf16 its most
    likely token agrees with fp32 on 98.2% of held-out masked slots, and the sampling head alone in fp32 changes
    nothing: the loss is in the bf16 logits. Their projection (the last MatMul) in fp32 gives 99.5%, for ~3% of the
    step's FLOPs; more MatMuls in fp32 add nothing. The encoder's index agreement is 94.4% all bf16, 98.7% with the
    search in fp32 and 99.2% with its last two convolutions too (latent resolution, cheap: the int8 encoder keeps
    the same ones).
    """
    if graph in PRIOR_GRAPHS:  # the logits projection, then the sampling head (and the guidance mix)
        return set(), from_last(model, "MatMul")
    if graph == "encoder":  # conv_out and quant_conv, then the nearest-code search
        return set(), from_last(model, "Convolution", 2)
    suffix = from_last(model, "Convolution")  # the decoder's conv_out, then clamp, scale, round
    return upstream(model, {"Sin", "Cos"}) - suffix, suffix


def from_last(model: ov.Model, op_type: str, count: int = 1) -> Set[str]:
    """Friendly names of the `count`-th last op of `op_type` and of everything after it (empty: no such op)."""
    found = [op for op in model.get_ordered_ops() if op.get_type_name() == op_type]
    if not found:
        return set()
    first = found[-min(count, len(found))].get_friendly_name()
    return {first} | downstream(model, {first})


# ---- a graph in consecutive parts -----------------------------------------------------------------------------


class _Part:
    """One compiled part of a graph: which tensors it reads (graph inputs or an earlier part's outputs) and writes."""

    def __init__(self, compiled: ov.CompiledModel, known: Set[str]):
        self.compiled = compiled
        # A port's tensor may carry several names (the exporter's and the graph's): the one the runner knows
        self.inputs = [_known_name(port, known) for port in compiled.inputs]
        self.outputs = [_known_name(port, known) for port in compiled.outputs]
        self._idle: "queue.SimpleQueue[ov.InferRequest]" = queue.SimpleQueue()

    def run(self, tensors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        try:
            request = self._idle.get_nowait()
        except queue.Empty:
            request = self.compiled.create_infer_request()
        try:
            # share_outputs=False: the results are copies, so the request may be reused at once
            results = request.infer({name: tensors[name] for name in self.inputs}, share_inputs=True)
            return {name: results[port] for name, port in zip(self.outputs, self.compiled.outputs)}
        finally:
            self._idle.put(request)


def _stage_models(model: ov.Model, stage_of: Dict[str, int]) -> "tuple[List[int], List[ov.Model], Set[str]]":
    """The graph cut into consecutive sub-models, one per stage present in `stage_of` ({op name: stage}, ops not
    named there in stage 1, every op's stage >= its inputs' stages). A sub-model's inputs are the graph inputs it
    uses and the tensors earlier stages computed; its outputs are the graph outputs it computes and the tensors
    later stages use. Each sub-model is cut from its own clone of `model` (fold its constants first, so that what
    only reshapes a weight is part of the weight). Returns the stages present, their sub-models and the names of
    the tensors that cross from one to the next."""
    def stage(node) -> int:
        return stage_of.get(node.get_friendly_name(), 1)

    ordered = [op for op in model.get_ordered_ops() if op.get_type_name() not in _SKIPPED]
    stages = sorted({stage(op) for op in ordered})
    crossing: Dict[tuple, tuple] = {}  # (op name, output index) -> (tensor name, stage that computes it)
    for op in ordered:
        for port in op.inputs():
            source = port.get_source_output()
            node = source.get_node()
            if node.get_type_name() not in _SKIPPED and stage(node) < stage(op):
                key = (node.get_friendly_name(), source.get_index())
                crossing.setdefault(key, (f"{key[0]}:{key[1]}", stage(node)))
    parts = []
    for current in stages:
        clone = model.clone()
        nodes = {op.get_friendly_name(): op for op in clone.get_ordered_ops()}
        parameters, results = [], []
        for (node_name, index), (name, made_in) in crossing.items():
            source = nodes[node_name].output(index)
            if made_in == current:
                results.append(_result(source, name))
            elif made_in < current:
                readers = [port for port in source.get_target_inputs() if stage(port.get_node()) == current]
                if readers:
                    parameter = ops.parameter(source.get_partial_shape(), source.get_element_type(), name=name)
                    parameter.output(0).get_tensor().set_names({name})
                    for port in readers:
                        port.replace_source_output(parameter.output(0))
                    parameters.append(parameter)
        results += [result for result in clone.get_results()
                    if stage(result.input(0).get_source_output().get_node()) == current]
        parameters += [parameter for parameter in clone.get_parameters()
                       if any(stage(port.get_node()) == current and port.get_node().get_type_name() != "Result"
                              for port in parameter.output(0).get_target_inputs())]
        parts.append(ov.Model(results, parameters, f"{model.get_friendly_name()}.part{current}"))
    return stages, parts, {name for name, _ in crossing.values()}


def fold_constants(model: ov.Model) -> ov.Model:
    """`model` with every subgraph of constants computed (in place; returned for chaining)."""
    manager = Manager()
    manager.register_pass(ConstantFolding())
    manager.run_passes(model)
    return model


def _known_name(port, known: Set[str]) -> str:
    names = port.get_names() & known
    if len(names) != 1:
        raise RuntimeError(f"OpenVINO part port {port.get_any_name()!r} has names {sorted(port.get_names())}, "
                           f"expected exactly one of the graph's tensors")
    return names.pop()


def _result(source, name: str):
    result = ops.result(source)
    result.output(0).get_tensor().set_names({name})
    return result


# ---- the runner ---------------------------------------------------------------------------------------------


class OpenVinoRunner(BaseRunner):
    """One graph on OpenVINO's CPU plugin; `run(feeds) -> {output name: array}` (thread-safe).

    precision "fp32" compiles the whole graph in f32 (on bf16 hardware OpenVINO's own default would be bf16).
    "bf16" keeps the graph's fp32 ends (`fp32_ends`, or `ends`: the study of other cuts,
    benchmarks/studies/bf16_ends.py) in f32 and runs the rest in bf16. "int8" takes an int8 graph
    (NNCF's FakeQuantize ops) whose int8 GEMMs and convolutions run on the CPU's int8 units; its fp32 ends stay f32
    and its other unquantized ops run in bf16 where the CPU has it natively.
    """

    def __init__(self, path: "str | os.PathLike[str]", graph: str, precision: str = "fp32",
                 threads: Optional[int] = None, cache_dir: "str | os.PathLike[str] | None" = None,
                 ends: Callable[[ov.Model, str], "tuple[Set[str], Set[str]]"] = None):
        if precision not in PRECISIONS:
            raise ValueError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.path, self.name, self.precision = Path(path), Path(path).name, precision
        core = shared_core()
        if cache_dir is not None:
            try:
                Path(cache_dir).mkdir(parents=True, exist_ok=True)
            except OSError as error:  # a read-only place: compile every time rather than fail
                logger.warning("movq-deploy: OpenVINO's model cache %s is not writable (%s); compiling without it",
                               cache_dir, error)
                cache_dir = None
        model = core.read_model(str(path))
        self.inputs = [_spec(port) for port in model.inputs]
        self.outputs = [_spec(port) for port in model.outputs]
        self._output_names = [spec.name for spec in self.outputs]
        if precision == "fp32":
            hints, models, crossing = ["f32"], [model], set()
        else:
            body = "bf16" if precision == "bf16" or cpu_features.native_bf16() else "f32"
            prefix, suffix = (ends or fp32_ends)(fold_constants(model), graph)
            stage_of = {**{name: 0 for name in prefix}, **{name: 2 for name in suffix}}
            stages, models, crossing = _stage_models(model, stage_of)
            hints = [{0: "f32", 1: body, 2: "f32"}[stage] for stage in stages]
        known = crossing | {spec.name for spec in self.inputs + self.outputs}
        self._parts = [_Part(core.compile_model(part, "CPU", _config(hint, threads, cache_dir)), known)
                       for hint, part in zip(hints, models)]
        self.part_precisions = hints  # what each compiled part runs in, in order (for people and tests)

    def run_impl(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        parts = self._parts
        if parts is None:
            raise RuntimeError(f"{self.name}: the runner is closed")
        tensors = dict(feeds)
        for part in parts:
            tensors.update(part.run(tensors))
        return {name: tensors[name] for name in self._output_names}

    def close(self) -> None:
        """Drops the compiled models (their memory goes with them); the runner is unusable afterwards."""
        self._parts = None


def _config(hint: str, threads: Optional[int], cache_dir: "str | os.PathLike[str] | None" = None) -> dict:
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1,
              # Threads not pinned to cores: on a machine shared with other processes (the proxy, the request
              # handling, other jobs) pinned workers wait for their own core (BENCHMARKS.md, "bf16 on OpenVINO")
              "ENABLE_CPU_PINNING": False,
              # no activations quantized per call: a row's result must not depend on its batchmates
              "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    return config


def _spec(port) -> TensorSpec:
    shape = tuple(dim.get_length() if dim.is_static else "batch" for dim in port.get_partial_shape())
    dtype = port.get_element_type().get_type_name()
    return TensorSpec(port.get_any_name(), _OV_DTYPES.get(dtype, dtype), shape)


def openvino_entries(engine_dir, graphs: Iterable[str], precision: str) -> Dict[str, dict]:
    """{graph name: manifest entry} of the files OpenVINO compiles for `graphs` at `precision`: the fp32 ONNX graphs
    for fp32 and bf16, the directory's OpenVINO int8 graphs (OpenVINO IR written by the export with NNCF) for int8."""
    files = OPENVINO_INT8 if precision == "int8" else "fp32"
    entries = {}
    for name in graphs:
        entries[name] = engine_dir.graph(files, name)
        if entries[name] is None:
            raise FileNotFoundError(f"{engine_dir.manifest_path} lists no {files} {name} graph")
    return entries


def open_openvino_runners(engine_dir, entries: Dict[str, dict], precision: str, threads: Optional[int] = None,
                          cache_dir: "str | os.PathLike[str] | None" = None) -> Dict[str, OpenVinoRunner]:
    """{graph name: runner} of the manifest entries {graph name: entry} (`openvino_entries`) at `precision`, each
    file verified first."""
    cache_dir = default_cache_dir(engine_dir.path) if cache_dir is None else cache_dir
    return {name: OpenVinoRunner(engine_dir.verify(entry), name, precision, threads, cache_dir)
            for name, entry in entries.items()}
