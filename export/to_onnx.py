"""Export ckpt.pt to an engine directory of ONNX graphs, validated against PyTorch.

    python export/to_onnx.py ckpt.pt [--out engines/] [--steps 8] [--fp16] [--int8] [--opset 17|18]

Writes encoder.onnx, decoder.onnx, prior.onnx (+ encoder.fp16.onnx, decoder.fp16.onnx, prior.fp16.onnx with
--fp16, prior.int8.onnx with --int8) and manifest.json (movq_deploy.manifest). The graphs are the torch modules of
movq_deploy.models.graphs: uint8 images and int32 indices at the boundaries, a dynamic batch axis named "batch".

Every graph is checked (onnx.checker, shape inference, no Random*/Multinomial ops, TopK only with a constant K) and
then run in ONNX Runtime (CPU) against PyTorch on fixed inputs at two batch sizes, as optimum validates its
exports; above tolerance the export fails and says which graph and by how much. The fp16 and int8 graphs are
compared with the fp32 graph and their agreement is stored in the manifest. Everything is written into a temporary
directory beside --out and renamed at the end, so a failed export leaves the previous engine directory intact.

Exporter (--exporter auto): torch.onnx's dynamo exporter (torch.export) at opset 18, which names the batch axis
on every input and output and leaves no TorchScript Shape/Gather/Concat scaffolding; the deprecated TorchScript
exporter at opset 17 (dynamo cannot down-convert) or when torch.export cannot trace a module.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn

from movq_deploy import manifest as mf
from movq_deploy.engine_cache import TIMING_CACHE_NAME
from movq_deploy.models.checkpoint import load_models
from movq_deploy.models.graphs import DecoderGraph, EncoderGraph, PriorStepGraph
from movq_deploy.sampling import remask_counts

OPSETS = (17, 18)
EXPORTERS = ("auto", "dynamo", "torchscript")
EXAMPLE_BATCH = 2  # torch.export specializes dimensions of size 0 and 1: trace with 2
VALIDATION_BATCHES = (1, 3)
# Ops TensorRT rejects or does not seed: randomness comes from the host (movq_deploy.sampling).
FORBIDDEN_OPS = {"Multinomial", "RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli"}

# fp32 ONNX Runtime vs PyTorch. A module-level dict so that a test can tighten it to make validation fail.
TOLERANCE = {
    "decoder_max_pixel_error": 1,  # uint8 levels: a rounding flip at .5, nothing more
    "decoder_max_fraction_off": 0.01,  # ... and on at most 1% of the pixels ("mostly 0")
    "encoder_max_mismatches": 0,  # index mismatches that are not ties (distances equal within fp32 rounding)
    "prior_max_token_mismatches": 0,  # same noise, same tokens
    "prior_max_confidence_error": 1e-3,  # on the masked slots (known slots must be +inf in both)
}
# Two codebook distances closer than this (relative to their size) are a tie: argmin may pick either.
TIE_RTOL = 1e-5

# Kept in fp32 in the fp16 graphs (besides the nodes after the last Conv / after "logits / temperature", below).
FP16_OP_BLOCK_LIST = [
    "GroupNormalization", "InstanceNormalization", "LayerNormalization", "Softmax", "LogSoftmax",
    "CumSum", "Log", "Exp", "ReduceSum", "ReduceMean", "ArgMin", "ArgMax", "TopK",
]


class ExportError(RuntimeError):
    """An exported graph is malformed or disagrees with PyTorch beyond tolerance."""


@dataclass
class GraphSpec:
    """One graph to export: a module whose positional arguments are exactly the ONNX inputs."""

    name: str
    module: nn.Module
    input_names: list[str]
    output_names: list[str]
    unbatched: tuple[str, ...]  # inputs without the batch axis (the step's scalars)
    make_inputs: Callable[[int, np.random.Generator], "dict[str, np.ndarray]"]  # (batch, rng) -> feeds
    count_ties: "Callable | None" = None  # (feeds, ref, cand, off) -> mismatches that are exact-tie flips


class _PriorStep(nn.Module):
    """PriorStepGraph of a conditional prior, arguments in ONNX input order. (The attribute is `step`, not
    `graph`: torch.fx's GraphModule owns that name.)"""

    def __init__(self, step: PriorStepGraph):
        super().__init__()
        self.step = step

    def forward(self, tokens, class_labels, uniform, gumbel, temperature, choice_scale):
        return self.step(tokens, class_labels, uniform, gumbel, temperature, choice_scale)


class _UnconditionalPriorStep(nn.Module):
    """PriorStepGraph of an unconditional prior: no class_labels input at all."""

    def __init__(self, step: PriorStepGraph):
        super().__init__()
        self.step = step

    def forward(self, tokens, uniform, gumbel, temperature, choice_scale):
        return self.step(tokens, None, uniform, gumbel, temperature, choice_scale)


def graph_specs(movq, prior) -> "dict[str, GraphSpec]":
    """The three graphs of an engine directory, with fixed-seed input makers for export and validation."""
    size, grid, num_codes = movq.config.image_size, movq.config.grid, movq.config.codebook_size
    step = PriorStepGraph(prior).eval()
    pconfig = prior.config

    def images(batch, rng):
        # Smooth colour ramps plus noise: closer to photographs than uniform noise, still every level used.
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        base = (ramp[None, :, None, None] + ramp[None, None, :, None]) / 2 * rng.random((batch, 1, 1, 3))
        noisy = base + rng.normal(0, 24, (batch, size, size, 3))
        return {"image": np.clip(noisy, 0, 255).astype(np.uint8)}

    def indices(batch, rng):
        return {"indices": rng.integers(0, num_codes, (batch, *grid), dtype=np.int32)}

    def prior_inputs(batch, rng):
        n = pconfig.num_slots
        tokens = rng.integers(0, num_codes, (batch, n), dtype=np.int32)
        tokens[rng.random((batch, n)) < 0.5] = pconfig.mask_id
        tokens[0] = pconfig.mask_id  # the first step of sampling: everything masked
        feeds = {"tokens": tokens}
        if pconfig.conditional:  # the null class (num_classes) included
            feeds["class_labels"] = rng.integers(0, pconfig.num_classes + 1, batch, dtype=np.int32)
        feeds["uniform"] = rng.random((batch, n), dtype=np.float32)
        feeds["gumbel"] = rng.gumbel(size=(batch, n)).astype(np.float32)
        feeds["temperature"] = np.array([1.0], dtype=np.float32)
        feeds["choice_scale"] = np.array([2.0], dtype=np.float32)
        return feeds

    prior_module = _PriorStep(step) if pconfig.conditional else _UnconditionalPriorStep(step)
    encoder, decoder = EncoderGraph(movq).eval(), DecoderGraph(movq).eval()
    return {
        "encoder": GraphSpec("encoder", encoder, list(encoder.input_names), list(encoder.output_names), (), images,
                             encoder_ties(movq)),
        "decoder": GraphSpec("decoder", decoder, list(decoder.input_names), list(decoder.output_names), (), indices),
        "prior": GraphSpec("prior", prior_module, step.input_names, list(step.output_names),
                           ("temperature", "choice_scale"), prior_inputs, prior_ties(step)),
    }


# ---- export and structural checks ------------------------------------------------------------------------------


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0][:300] if lines else type(error).__name__


def export_graph(spec: GraphSpec, path: Path, opset: int, exporter: str, log=print) -> str:
    """Exports spec.module to path; returns the exporter that was used ("dynamo" or "torchscript").

    "auto": dynamo at opset 18 (its own opset; its down-conversion to 17 fails: "No Adapter To Version 17 for
    Pad"), TorchScript at opset 17 and whenever torch.export cannot trace the module.
    """
    feeds = spec.make_inputs(EXAMPLE_BATCH, np.random.default_rng(0))
    args = tuple(torch.from_numpy(feeds[name]) for name in spec.input_names)
    if exporter == "dynamo" or (exporter == "auto" and opset == 18):
        try:
            _export_dynamo(spec, args, path, opset)
            return "dynamo"
        except Exception as error:  # torch.export raises many types; the message is what matters
            if exporter == "dynamo":
                raise ExportError(f"{spec.name}: the dynamo exporter failed: {_one_line(error)}") from error
            log(f"{spec.name}: the dynamo exporter failed ({_one_line(error)}); using the TorchScript exporter")
    dynamic_axes = {name: {0: "batch"} for name in spec.input_names + spec.output_names if name not in spec.unbatched}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        torch.onnx.export(
            spec.module, args, str(path), dynamo=False, opset_version=opset, input_names=spec.input_names,
            output_names=spec.output_names, dynamic_axes=dynamic_axes,
        )
    return "torchscript"


def _export_dynamo(spec: GraphSpec, args: tuple, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch")
    dynamic_shapes = tuple(None if name in spec.unbatched else {0: batch} for name in spec.input_names)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" x4 per export
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            spec.module, args, dynamo=True, opset_version=opset, input_names=spec.input_names,
            output_names=spec.output_names, dynamic_shapes=dynamic_shapes, external_data=False, verbose=False,
        )
    program.save(str(path))


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def tensor_specs(values) -> "list[dict]":
    """[{"name", "dtype" (numpy dtype name), "shape" (ints, "batch" for the dynamic axis)}] of graph inputs/outputs."""
    return [
        {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
         "shape": _dims(v)}
        for v in values
    ]


def forbidden_ops(model: onnx.ModelProto) -> "list[str]":
    """Ops TensorRT cannot run as we need: Random*/Multinomial, and TopK whose K is not a constant."""
    constants = {init.name for init in model.graph.initializer}
    constants |= {out for node in model.graph.node if node.op_type == "Constant" for out in node.output}
    found = sorted({node.op_type for node in model.graph.node if node.op_type in FORBIDDEN_OPS})
    found += [f"TopK({node.name or '?'}: K not constant)" for node in model.graph.node
              if node.op_type == "TopK" and node.input[1] not in constants]
    return found


def io_shapes(spec: GraphSpec) -> "dict[str, tuple]":
    """The shape of every graph input and output at batch EXAMPLE_BATCH, from the inputs and a PyTorch run."""
    feeds = spec.make_inputs(EXAMPLE_BATCH, np.random.default_rng(0))
    shapes = {name: feeds[name].shape for name in spec.input_names}
    return {**shapes, **{name: out.shape for name, out in zip(spec.output_names, run_torch(spec, feeds))}}


def finalize_graph(spec: GraphSpec, path: Path, opset: int, shapes: "dict[str, tuple]") -> onnx.ModelProto:
    """Checks an exported graph, declares its I/O shapes (the batch axis named "batch", every other axis static,
    as `shapes` says), stores the inferred shapes of every tensor; returns the model."""
    model = onnx.load(str(path))
    default_opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if default_opset != opset:
        raise ExportError(f"{spec.name}: exported at opset {default_opset}, asked for {opset} "
                          f"(the dynamo exporter writes opset 18: use --exporter torchscript for 17)")
    bad = forbidden_ops(model)
    if bad:
        raise ExportError(f"{spec.name}: the graph holds ops TensorRT cannot run: {', '.join(bad)}")
    io = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    if [v.name for v in model.graph.input] != spec.input_names or \
            [v.name for v in model.graph.output] != spec.output_names:
        raise ExportError(f"{spec.name}: graph I/O {list(io)} differs from {spec.input_names + spec.output_names}")
    for name, value in io.items():
        dims = value.type.tensor_type.shape.dim
        batched = name not in spec.unbatched
        if batched and dims[0].dim_value:  # a static batch: the export specialized it
            raise ExportError(f"{spec.name}: {name} has a static batch dimension {dims[0].dim_value}")
        if len(dims) != len(shapes[name]):
            raise ExportError(f"{spec.name}: {name} has rank {len(dims)}, PyTorch gives {len(shapes[name])}")
        for axis, (dim, size) in enumerate(zip(dims, shapes[name])):
            if batched and axis == 0:
                dim.dim_param = "batch"
            elif dim.dim_value not in (0, size):
                raise ExportError(f"{spec.name}: {name} axis {axis} is {dim.dim_value}, PyTorch gives {size}")
            else:  # TorchScript leaves derived output axes symbolic ("Castindices_dim_1"): they are static
                dim.dim_value = size
    # The dynamo exporter stamps every node with its Python stack trace (absolute paths, line numbers): drop it, so
    # that the same weights give the same bytes (engine caches key on the ONNX sha256) and no paths leak.
    for item in [*model.graph.node, *model.graph.input, *model.graph.output, *model.graph.initializer]:
        del item.metadata_props[:]
    del model.graph.value_info[:]  # inferred afresh: the fp16 converter leaves stale element types behind
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return model


# ---- validation ------------------------------------------------------------------------------------------------


def cpu_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the fp16 graphs on the CPU warn about every inserted Cast
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_torch(spec: GraphSpec, feeds: dict) -> "list[np.ndarray]":
    with torch.no_grad():
        outputs = spec.module(*(torch.from_numpy(feeds[name]) for name in spec.input_names))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [o.numpy() for o in outputs]


def compare(name: str, reference: list, candidate: list, feeds: dict, count_ties=None) -> dict:
    """Error figures of `candidate` outputs against `reference` outputs of graph `name` on `feeds`.

    With `count_ties` (validation against PyTorch), index/token mismatches that are ties are counted apart.
    """
    if name == "decoder":
        diff = np.abs(reference[0].astype(np.int16) - candidate[0].astype(np.int16))
        return {"max_pixel_error": int(diff.max()), "mean_pixel_error": float(diff.mean()),
                "fraction_off": float((diff > 0).mean())}
    off = reference[0] != candidate[0]
    ties = count_ties(feeds, reference[0], candidate[0], off) if count_ties is not None and off.any() else 0
    if name == "encoder":
        figures = {"index_agreement": float(1 - off.mean()), "mismatches": int(off.sum()) - ties}
        return {**figures, "tie_mismatches": ties} if count_ties is not None else figures
    (ref_tokens, ref_conf), (tokens, conf) = reference, candidate
    masked = np.isfinite(ref_conf)  # known slots have confidence +inf
    same = masked & ~off
    conf_error = float(np.abs(ref_conf[same] - conf[same]).max(initial=0.0))
    if not (np.isinf(ref_conf) == np.isinf(conf)).all():
        conf_error = float("nan")  # a known slot lost its +inf, or a masked one got it
    figures = {"token_agreement": float((ref_tokens[masked] == tokens[masked]).mean()) if masked.any() else 1.0,
               "token_mismatches": int(off.sum()) - ties, "max_confidence_error": conf_error}
    return {**figures, "tie_mismatches": ties} if count_ties is not None else figures


def encoder_ties(movq):
    """Counts mismatched indices whose two codes are equally near z (within fp32 rounding): argmin may pick either."""

    def count(feeds, ref, cand, off) -> int:
        with torch.no_grad():
            x = torch.from_numpy(feeds["image"]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
            z = movq.encode_z(x).double()  # (B, n_z, h, w)
        chunks = z.permute(0, 2, 3, 1).reshape(*ref.shape, movq.config.code_dim)  # (B, h, w, c, d)
        codebook = movq.quantizer.codebook.weight.double()  # (K, d)
        vectors = chunks[tuple(torch.from_numpy(np.argwhere(off)).T)]  # (M, d)
        ref_codes = codebook[torch.from_numpy(ref[off]).long()]
        cand_codes = codebook[torch.from_numpy(cand[off]).long()]
        gap = ((vectors - ref_codes).pow(2).sum(1) - (vectors - cand_codes).pow(2).sum(1)).abs()
        scale = vectors.pow(2).sum(1) + ref_codes.pow(2).sum(1) + cand_codes.pow(2).sum(1)
        return int((gap <= TIE_RTOL * scale).sum())

    return count


def prior_ties(step: PriorStepGraph):
    """Counts mismatched tokens drawn at a CDF boundary: token = #{k : cdf[k] < u * total}, so when u * total lies
    within fp32 rounding of cdf[k] for every k between the two tokens, either token is the same draw."""

    def count(feeds, ref, cand, off) -> int:
        labels = torch.from_numpy(feeds["class_labels"]) if "class_labels" in feeds else None
        with torch.no_grad():
            logits = step.prior(torch.from_numpy(feeds["tokens"]), labels).double() / float(feeds["temperature"][0])
        cdf = logits.softmax(-1).cumsum(-1).numpy()  # (B, N, K)
        threshold = feeds["uniform"].astype(np.float64) * cdf[..., -1]  # (B, N)
        ties = 0
        for b, n in np.argwhere(off):
            low, high = sorted((int(ref[b, n]), int(cand[b, n])))
            ties += bool(np.all(np.abs(cdf[b, n, low:high] - threshold[b, n]) <= TIE_RTOL))
        return ties

    return count


def _worst(rows: "list[dict]") -> dict:
    """Per figure, the worst value over the validation batches (min for agreements, max for errors)."""
    worst = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if any(value != value for value in values):  # NaN (e.g. +inf where a confidence should be finite)
            worst[key] = float("nan")
        else:
            worst[key] = min(values) if "agreement" in key else max(values)
    return worst


def validate_fp32(spec: GraphSpec, path: Path) -> dict:
    """Runs the graph in ONNX Runtime (CPU) and PyTorch at VALIDATION_BATCHES; raises ExportError above TOLERANCE."""
    session = cpu_session(path)
    rows = []
    for batch in VALIDATION_BATCHES:
        feeds = spec.make_inputs(batch, np.random.default_rng(1000 + batch))
        outputs = session.run(spec.output_names, feeds)
        for name, value in zip(spec.output_names, outputs):
            if value.shape[0] != batch:
                raise ExportError(f"{path.name}: output {name} has batch {value.shape[0]} for an input batch {batch}")
        rows.append(compare(spec.name, run_torch(spec, feeds), outputs, feeds, spec.count_ties))
    errors = _worst(rows)
    failures = _tolerance_failures(spec.name, errors)
    if failures:
        raise ExportError(f"{path.name} disagrees with PyTorch: {'; '.join(failures)}")
    return errors


def _tolerance_failures(name: str, errors: dict) -> "list[str]":
    checks = {
        "decoder": [("max_pixel_error", "decoder_max_pixel_error"), ("fraction_off", "decoder_max_fraction_off")],
        "encoder": [("mismatches", "encoder_max_mismatches")],
        "prior": [("token_mismatches", "prior_max_token_mismatches"),
                  ("max_confidence_error", "prior_max_confidence_error")],
    }[name]
    failures = []
    for figure, limit in checks:
        value = errors[figure]
        if not value <= TOLERANCE[limit]:  # NaN fails too
            failures.append(f"{figure} = {value:g} > {TOLERANCE[limit]:g}")
    return failures


def compare_graphs(spec: GraphSpec, reference_path: Path, path: Path) -> dict:
    """Agreement of a reduced-precision graph with the fp32 graph (both ONNX Runtime CPU) on the fixed inputs."""
    reference, candidate = cpu_session(reference_path), cpu_session(path)
    rows = []
    for batch in VALIDATION_BATCHES:
        feeds = spec.make_inputs(batch, np.random.default_rng(1000 + batch))
        ref_out = reference.run(spec.output_names, feeds)
        rows.append(compare(spec.name, ref_out, candidate.run(spec.output_names, feeds), feeds))
        if spec.name == "prior":  # the most likely token: a temperature this low makes the draw an argmax
            cold = {**feeds, "temperature": np.array([1e-4], dtype=np.float32)}
            ref_top, top = reference.run(["sampled"], cold)[0], candidate.run(["sampled"], cold)[0]
            masked = feeds["tokens"] == spec.module.step.prior.config.mask_id
            rows[-1]["top_token_agreement"] = float((ref_top[masked] == top[masked]).mean())
    return _worst(rows)


# ---- fp16 and int8 graphs --------------------------------------------------------------------------------------


def _downstream_nodes(model: onnx.ModelProto, tensors: "set[str]") -> "list[str]":
    """Names of the nodes that depend on any of `tensors` (nodes are stored in topological order)."""
    reached, names = set(tensors), []
    for node in model.graph.node:
        if reached.intersection(node.input):
            names.append(node.name)
            reached.update(node.output)
    return names


def fp16_tail(name: str, model: onnx.ModelProto) -> "list[str]":
    """The nodes an fp16 graph keeps in fp32 by name: the prior's sampling head (everything from logits /
    temperature on: softmax, CumSum, the counts, log-probabilities, confidence), the encoder's nearest-code search
    and the decoder's clamp/scale/round (both: everything after the last Conv)."""
    if name == "prior":
        return _downstream_nodes(model, {"temperature"})
    last_conv = [node for node in model.graph.node if node.op_type == "Conv"][-1]
    return _downstream_nodes(model, set(last_conv.output))


def convert_fp16(spec: GraphSpec, fp32_path: Path, path: Path, opset: int) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(fp32_path))
    for index, node in enumerate(model.graph.node):  # node_block_list selects by name
        node.name = node.name or f"{node.op_type}_{index}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_OP_BLOCK_LIST)),
            node_block_list=fp16_tail(spec.name, model),
        )
    _sort_topologically(model)  # the converter appends its Casts at the end of the node list
    _remove_cast_round_trips(model)
    onnx.save(model, str(path))
    return finalize_graph(spec, path, opset, io_shapes(spec))


def _sort_topologically(model: onnx.ModelProto) -> None:
    """Reorders the nodes so that each comes after the producers of its inputs (stable otherwise)."""
    nodes = list(model.graph.node)
    available = {v.name for v in model.graph.input} | {t.name for t in model.graph.initializer} | {""}
    ordered, pending = [], nodes
    while pending:
        waiting = []
        for node in pending:
            if available.issuperset(node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ExportError(f"the fp16 graph has a cycle or a dangling input at node {waiting[0].name}")
        pending = waiting
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def _remove_cast_round_trips(model: onnx.ModelProto) -> None:
    """Drops fp32 -> Cast(fp16) -> Cast(fp32) pairs.

    The converter wraps each blocked node in Casts, so two blocked nodes in a row would pass their fp32 values
    through fp16; without the pair the blocked tail (sampling head, nearest-code search) really stays fp32.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    dtypes = {v.name: v.type.tensor_type.elem_type
              for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
    producer = {out: node for node in model.graph.node for out in node.output}
    outputs = {v.name for v in model.graph.output}

    def cast_to(node, dtype) -> bool:
        return node.op_type == "Cast" and node.attribute[0].i == dtype

    renamed = {}
    for node in model.graph.node:
        if not cast_to(node, onnx.TensorProto.FLOAT):
            continue
        down = producer.get(node.input[0])
        if down is None or not cast_to(down, onnx.TensorProto.FLOAT16):
            continue
        if dtypes.get(down.input[0]) != onnx.TensorProto.FLOAT:
            continue
        if node.output[0] in outputs:  # keep the output's name: the pair becomes an Identity of the fp32 value
            node.op_type, node.input[0] = "Identity", down.input[0]
            del node.attribute[:]
        else:
            renamed[node.output[0]] = down.input[0]
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    # Casts left without consumers (the round trips just bypassed) go.
    while True:
        used = {name for node in model.graph.node for name in node.input} | outputs
        dead = [node for node in model.graph.node if node.op_type == "Cast" and node.output[0] not in used]
        if not dead:
            break
        for node in dead:
            model.graph.node.remove(node)


def quantize_int8(spec: GraphSpec, fp32_path: Path, path: Path, scratch: Path) -> dict:
    """prior.int8.onnx: ONNX Runtime's BERT fusions, quant_pre_process, then dynamic int8 quantization of the
    weights (per channel). The result holds com.microsoft ops: it is an ONNX Runtime (CPU) graph, not a TensorRT
    one. Returns the fused-operator counts."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    config = spec.module.step.prior.config
    fused_path, prepared_path = scratch / "prior.fused.onnx", scratch / "prior.prepared.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = optimize_model(str(fp32_path), model_type="bert", num_heads=config.heads, hidden_size=config.width,
                               opt_level=0)
        fusions = {op: count for op, count in fused.get_fused_operator_statistics().items() if count}
        fused.save_model_to_file(str(fused_path))
        quant_pre_process(str(fused_path), str(prepared_path))
        quantize_dynamic(str(prepared_path), str(path), weight_type=QuantType.QInt8, per_channel=True)
    model = onnx.load(str(path))
    bad = forbidden_ops(model)
    if bad:
        raise ExportError(f"prior.int8.onnx holds ops TensorRT cannot run: {', '.join(bad)}")
    onnx.checker.check_model(model)
    return fusions


# ---- the engine directory --------------------------------------------------------------------------------------


def _graph_entry(engine_dir: Path, file: str, model: onnx.ModelProto, precision: str, opset: int, **extra) -> dict:
    return mf.file_entry(engine_dir, file, opset=opset, precision=precision, inputs=tensor_specs(model.graph.input),
                         outputs=tensor_specs(model.graph.output), **extra)


def _replace_dir(new: Path, out: Path) -> None:
    """Puts the finished directory `new` at `out`; an existing `out` is swapped out and removed only afterwards."""
    if not out.exists():
        os.replace(new, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / out.name)
    try:
        os.replace(new, out)
    except OSError:
        os.replace(old / out.name, out)
        raise
    shutil.rmtree(old)


def carry_over_engines(out: Path, work: Path, graphs: dict) -> dict:
    """The previous export's TensorRT engines whose ONNX graph is byte-identical to the new one (same sha256): their
    plans (and the timing cache) are copied into `work`, so build_trt.py need not rebuild them. Returns their
    manifest "engines" entries."""
    try:
        previous = mf.load_manifest(out)
    except (FileNotFoundError, ValueError):
        return {}
    kept: dict = {}
    for precision, engines in previous.get("engines", {}).items():
        for graph, entry in engines.items():
            onnx_entry = graphs.get(precision, {}).get(graph)
            if onnx_entry and entry.get("onnx_sha256") == onnx_entry["sha256"] and (out / entry["file"]).is_file():
                shutil.copy2(out / entry["file"], work / entry["file"])
                kept.setdefault(precision, {})[graph] = entry
    timing_cache = out / TIMING_CACHE_NAME
    if timing_cache.is_file():
        shutil.copy2(timing_cache, work / TIMING_CACHE_NAME)
    return kept


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / mf.MANIFEST_NAME).is_file():
        raise ValueError(f"refusing to replace {out}: it is not empty and not an engine directory (no manifest.json)")


def export_engine_dir(
    ckpt_path: "str | os.PathLike[str]",
    out: "str | os.PathLike[str]" = "engines",
    steps: int = 8,
    fp16: bool = False,
    int8: bool = False,
    opset: int = 18,
    exporter: str = "auto",
    log: Callable[[str], None] = print,
) -> dict:
    """Exports, checks and validates every graph of ckpt_path into `out`; returns the manifest written there."""
    if opset not in OPSETS:
        raise ValueError(f"opset must be one of {OPSETS} (TensorRT parses 17-18), got {opset}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    out = Path(out)
    _check_out(out)
    ckpt_path = Path(ckpt_path)
    try:
        movq, prior, ckpt = load_models(ckpt_path)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as error:  # torch.load's legacy unpickler raises KeyError & co. on some foreign files
        raise ValueError(f"{ckpt_path} cannot be loaded: not a torch checkpoint ({_one_line(error)})") from None
    if prior is None:
        raise ValueError(f"{ckpt_path} holds no prior (a stage-1 checkpoint): train the prior (train/prior.py) first")
    if prior.config.grid != movq.config.grid or prior.config.codebook_size != movq.config.codebook_size:
        raise ValueError(f"{ckpt_path}: the prior's grid/codebook {prior.config.grid}/{prior.config.codebook_size} "
                         f"do not match the tokenizer's {movq.config.grid}/{movq.config.codebook_size}")
    started = time.perf_counter()
    specs = graph_specs(movq, prior)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp makes it private; the engine directory is an ordinary one
    try:
        graphs, validation, exporters = {"fp32": {}}, {"fp32": {}}, {}
        for name, spec in specs.items():
            tick = time.perf_counter()
            exporters[name] = export_graph(spec, work / f"{name}.onnx", opset, exporter, log)
            model = finalize_graph(spec, work / f"{name}.onnx", opset, io_shapes(spec))
            validation["fp32"][name] = validate_fp32(spec, work / f"{name}.onnx")
            graphs["fp32"][name] = _graph_entry(work, f"{name}.onnx", model, "fp32", opset, exporter=exporters[name])
            log(f"{name:8s} fp32  {len(model.graph.node):5d} nodes  {time.perf_counter() - tick:6.1f} s  "
                f"({exporters[name]}, opset {opset}) validated: {_summary(validation['fp32'][name])}")
        if fp16:
            graphs["fp16"], validation["fp16"] = {}, {}
            for name, spec in specs.items():
                tick = time.perf_counter()
                model = convert_fp16(spec, work / f"{name}.onnx", work / f"{name}.fp16.onnx", opset)
                validation["fp16"][name] = compare_graphs(spec, work / f"{name}.onnx", work / f"{name}.fp16.onnx")
                graphs["fp16"][name] = _graph_entry(work, f"{name}.fp16.onnx", model, "fp16", opset,
                                                    exporter=exporters[name])
                log(f"{name:8s} fp16  {len(model.graph.node):5d} nodes  {time.perf_counter() - tick:6.1f} s  "
                    f"vs fp32: {_summary(validation['fp16'][name])}")
        if int8:
            tick = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.int8-") as scratch:
                fusions = quantize_int8(specs["prior"], work / "prior.onnx", work / "prior.int8.onnx", Path(scratch))
            agreement = compare_graphs(specs["prior"], work / "prior.onnx", work / "prior.int8.onnx")
            validation["int8"] = {"prior": {**agreement, "fusions": fusions}}
            model = onnx.load(str(work / "prior.int8.onnx"))
            graphs["int8"] = {"prior": _graph_entry(work, "prior.int8.onnx", model, "int8", opset,
                                                    exporter=exporters["prior"], fusions=fusions)}
            log(f"{'prior':8s} int8  {len(model.graph.node):5d} nodes  {time.perf_counter() - tick:6.1f} s  "
                f"vs fp32: {_summary(agreement)}")
            if agreement["top_token_agreement"] < 0.95:
                log(f"warning: the int8 prior's most likely token agrees with fp32 on only "
                    f"{agreement['top_token_agreement']:.1%} of slots (target 95%)")
        manifest = build_manifest(movq, prior, ckpt, ckpt_path, steps, graphs, validation,
                                  seconds=time.perf_counter() - started)
        engines = carry_over_engines(out, work, graphs)
        if engines:
            manifest["engines"] = engines
            log(f"kept {sum(map(len, engines.values()))} TensorRT engine(s) whose ONNX graph did not change")
        mf.write_manifest(work, manifest)
        _replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(format_table(validation))
    log(f"wrote {out}/ in {time.perf_counter() - started:.1f} s")
    return manifest


def build_manifest(movq, prior, ckpt: dict, ckpt_path: Path, steps: int, graphs: dict, validation: dict,
                   seconds: float) -> dict:
    h, w, c = movq.config.grid
    return {
        "model": {"tokenizer": movq.config.to_dict(), "prior": prior.config.to_dict()},
        "grid": {"h": h, "w": w, "c": c},
        "codebook_size": movq.config.codebook_size,
        "mask_id": prior.config.mask_id,
        "image_size": movq.config.image_size,
        "num_classes": prior.config.num_classes,
        "class_names": list(ckpt.get("class_names", [])),
        "sampling": {"steps": steps, "remask_counts": remask_counts(prior.config.num_slots, steps).tolist(),
                     "temperature": 1.0, "choice_temperature": 4.5},
        "graphs": graphs,
        "validation": {"batch_sizes": list(VALIDATION_BATCHES), "tolerance": dict(TOLERANCE), **validation},
        "export": {"checkpoint": ckpt_path.name, "checkpoint_sha256": mf.sha256_file(ckpt_path),
                   "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                   "seconds": round(seconds, 2)},
    }


def _summary(errors: dict) -> str:
    return ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in errors.items() if not isinstance(value, dict))


def format_table(validation: dict) -> str:
    """A Markdown table of the validation figures: fp32 vs PyTorch, fp16/int8 vs the fp32 graph."""
    lines = ["| graph | precision | compared with | figures (worst over batch sizes 1 and 3) |",
             "|---|---|---|---|"]
    for precision, graphs in validation.items():
        for name, errors in graphs.items():
            against = "PyTorch" if precision == "fp32" else "fp32 ONNX"
            lines.append(f"| {name} | {precision} | {against} | {_summary(errors)} |")
    return "\n".join(lines)


def main(argv: "list[str] | None" = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="ckpt.pt with a tokenizer and a prior")
    parser.add_argument("--out", default="engines", help="engine directory to write (replaced atomically)")
    parser.add_argument("--steps", type=int, default=8, help="sampling steps recorded as the default (8)")
    parser.add_argument("--fp16", action="store_true", help="also write fp16 graphs (norms/softmax/sampling in fp32)")
    parser.add_argument("--int8", action="store_true", help="also write prior.int8.onnx (dynamic int8, ONNX Runtime CPU)")
    parser.add_argument("--opset", type=int, default=18, choices=OPSETS)
    parser.add_argument("--exporter", default="auto", choices=EXPORTERS)
    args = parser.parse_args(argv)
    try:
        export_engine_dir(args.checkpoint, args.out, steps=args.steps, fp16=args.fp16, int8=args.int8,
                          opset=args.opset, exporter=args.exporter)
    except (FileNotFoundError, ValueError, ExportError) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
