"""torch.onnx export of one GraphSpec, the structural checks every exported graph passes (opset, forbidden ops,
I/O names and shapes, onnx.checker, shape inference), and the producer / consumer maps the graph rewrites walk."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from movq_deploy import contract
from movq_deploy.export.specs import EXAMPLE_BATCH, ExportError, GraphSpec, one_line

OPSET = 18  # the dynamo exporter's own opset; TensorRT 10 parses 18 and later
# Ops TensorRT rejects or does not seed: randomness comes from the host (movq_deploy.sampling).
FORBIDDEN_OPS = {"Multinomial", "RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli"}


def export_graph(spec: GraphSpec, path: Path) -> None:
    """Exports spec.module to path with torch.onnx's dynamo exporter (torch.export) at OPSET: every input and output
    has its batch axis named, and no TorchScript Shape/Gather/Concat scaffolding is left."""
    feeds = spec.make_inputs(EXAMPLE_BATCH, np.random.default_rng(0))
    args = tuple(torch.from_numpy(feeds[name]) for name in spec.input_names)
    batch = torch.export.Dim(contract.BATCH)
    dynamic_shapes = tuple({0: batch} for _ in spec.input_names)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" x4 per export
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                spec.module, args, dynamo=True, opset_version=OPSET, input_names=spec.input_names,
                output_names=spec.output_names, dynamic_shapes=dynamic_shapes, external_data=False, verbose=False,
            )
    except Exception as error:  # torch.export raises many types; the message is what matters
        raise ExportError(f"{spec.name}: the dynamo exporter failed: {one_line(error)}") from error
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


def finalize_graph(spec: GraphSpec, path: Path, shapes: "dict[str, tuple]") -> onnx.ModelProto:
    """Checks an exported graph, declares its I/O shapes (the batch axis named "batch", every other axis static,
    as `shapes` says), stores the inferred shapes of every tensor; returns the model."""
    model = onnx.load(str(path))
    default_opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if default_opset != OPSET:
        raise ExportError(f"{spec.name}: exported at opset {default_opset}, expected {OPSET}")
    bad = forbidden_ops(model)
    if bad:
        raise ExportError(f"{spec.name}: the graph holds ops TensorRT cannot run: {', '.join(bad)}")
    io = {v.name: v for v in list(model.graph.input) + list(model.graph.output)}
    if [v.name for v in model.graph.input] != spec.input_names or \
            [v.name for v in model.graph.output] != spec.output_names:
        raise ExportError(f"{spec.name}: graph I/O {list(io)} differs from {spec.input_names + spec.output_names}")
    for name, value in io.items():
        dims = value.type.tensor_type.shape.dim
        if dims[0].dim_value:  # a static batch: the export specialized it
            raise ExportError(f"{spec.name}: {name} has a static batch dimension {dims[0].dim_value}")
        if len(dims) != len(shapes[name]):
            raise ExportError(f"{spec.name}: {name} has rank {len(dims)}, PyTorch gives {len(shapes[name])}")
        for axis, (dim, size) in enumerate(zip(dims, shapes[name])):
            if axis == 0:
                dim.dim_param = contract.BATCH
            elif dim.dim_value not in (0, size):
                raise ExportError(f"{spec.name}: {name} axis {axis} is {dim.dim_value}, PyTorch gives {size}")
            else:  # an axis the exporter left symbolic although PyTorch gives it one size: it is static
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


def producers(model: onnx.ModelProto) -> "dict[str, onnx.NodeProto]":
    """{tensor name: the node that writes it} over the model's top-level graph."""
    return {out: node for node in model.graph.node for out in node.output}


def consumers(model: onnx.ModelProto) -> "dict[str, list[onnx.NodeProto]]":
    """{tensor name: the nodes that read it, in graph order} over the model's top-level graph."""
    readers: dict = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers
