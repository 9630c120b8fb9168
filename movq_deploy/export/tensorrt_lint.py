"""Does an ONNX graph pass TensorRT's ONNX parser? The parser's rules, checked on the CPU with `onnx` alone.

    problems = lint_model(onnx.load(path))   # [] when the graph is fine; else one line per problem

The rules (onnx-tensorrt's docs/operators.md and ModelImporter.cpp, table in movq_deploy.export.tensorrt_ops):
- UINT8 only at the network's edges: a uint8 input feeds Casts only, a uint8 output comes straight out of a Cast,
  and no other tensor is uint8 (the importer's `legalUINT8` check);
- only operators of the support table, each on a data type the table lists for it;
- the default-domain opset at most 20, and GroupNormalization at opset 18 or less (opset 21's fails to parse);
- no Random* / Bernoulli / Multinomial (seeds are ignored or the op is missing: randomness comes from the host);
- TopK with sorted=1 and a constant K < 3840; CumSum's axis and the axes of Reduce*/Slice/(Un)Squeeze constant.

torch-free and numpy-light (onnx only), so export/build_trt.py runs it before handing a graph to TensorRT.
"""
from __future__ import annotations

import os
from typing import Dict, Iterator, List

import onnx
from onnx import TensorProto, numpy_helper

from movq_deploy.export.tensorrt_ops import MAX_OPSET, SUPPORTED_TYPES

MAX_GROUP_NORM_OPSET = 18
MAX_TOPK = 3840
RANDOM_OPS = {"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike", "Bernoulli", "Multinomial"}
# (op, input index) that the parser needs as a build-time constant.
CONSTANT_INPUTS = {
    ("TopK", 1): "K", ("CumSum", 1): "axis", ("Slice", 3): "axes", ("Squeeze", 1): "axes", ("Unsqueeze", 1): "axes",
    **{(f"Reduce{kind}", 1): "axes" for kind in
       ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum", "SumSquare")},
}
# Which tensor's type the support table speaks of: the first input, except where that is a condition or a shape.
_TYPED_INPUT = {"Where": 1}
_TYPED_BY_OUTPUT = {"Constant", "ConstantOfShape", "Cast", "CastLike", "EyeLike", "RandomUniform", "RandomNormal"}

_TYPE_NAMES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.BFLOAT16: "BF16",
    TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.INT8: "INT8", TensorProto.UINT8: "UINT8",
    TensorProto.BOOL: "BOOL", TensorProto.DOUBLE: "DOUBLE", TensorProto.INT4: "INT4",
    TensorProto.FLOAT8E4M3FN: "FP8",
}


def lint_file(path: "str | os.PathLike[str]") -> List[str]:
    return lint_model(onnx.load(str(path)))


def lint_model(model: onnx.ModelProto) -> List[str]:
    """Every reason TensorRT 10.x's ONNX parser would reject `model`, one line each ([] when it would parse)."""
    problems = _opset_problems(model)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    types = _tensor_types(model.graph)
    constants = _constant_names(model.graph)
    problems += _uint8_problems(model.graph, types)
    for node in _all_nodes(model.graph):
        where = f"{node.op_type} node {node.name or '?'}"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{where}: domain {node.domain!r} is not ONNX's (TensorRT parses no custom ops here)")
            continue
        if node.op_type in RANDOM_OPS:
            problems.append(f"{where}: random ops are not allowed (TensorRT ignores their seed or lacks them)")
            continue
        if node.op_type not in SUPPORTED_TYPES:
            problems.append(f"{where}: {node.op_type} is not in TensorRT 10.x's ONNX operator table")
            continue
        problems += [f"{where}: {p}" for p in _type_problems(node, types)]
        problems += [f"{where}: {p}" for p in _constant_problems(node, constants)]
    return problems


def check_file(path: "str | os.PathLike[str]") -> None:
    """Raises ValueError naming the graph and its first problems when TensorRT's parser would reject it."""
    problems = lint_file(path)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(f"{os.fspath(path)} would not parse in TensorRT: {'; '.join(problems[:3])}{more}")


# ---- the rules ---------------------------------------------------------------------------------------------------


def _opset_problems(model: onnx.ModelProto) -> List[str]:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        return ["the model imports no default-domain opset"]
    problems = []
    if opset > MAX_OPSET:
        problems.append(f"opset {opset} > {MAX_OPSET}, the newest TensorRT 10.x parses")
    if opset > MAX_GROUP_NORM_OPSET and any(n.op_type == "GroupNormalization" for n in _all_nodes(model.graph)):
        problems.append(f"GroupNormalization at opset {opset}: TensorRT parses it at opset {MAX_GROUP_NORM_OPSET} "
                        f"or less")
    return problems


def _uint8_problems(graph: onnx.GraphProto, types: Dict[str, int]) -> List[str]:
    inputs = {v.name for v in graph.input}
    outputs = {v.name for v in graph.output}
    producers = {out: node for node in _all_nodes(graph) for out in node.output}
    consumers: Dict[str, list] = {}
    for node in _all_nodes(graph):
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    problems = []
    for name, dtype in types.items():
        if dtype != TensorProto.UINT8:
            continue
        if name in inputs:
            bad = sorted({n.op_type for n in consumers.get(name, []) if n.op_type != "Cast"})
            if bad:
                problems.append(f"uint8 input {name!r} feeds {', '.join(bad)}: it must go straight into a Cast")
        elif name in outputs:
            producer = producers.get(name)
            if producer is None or producer.op_type != "Cast":
                made_by = producer.op_type if producer is not None else "no node"
                problems.append(f"uint8 output {name!r} comes out of {made_by}: it must come straight out of a Cast")
        else:
            made_by = producers[name].op_type if name in producers else "an initializer"
            problems.append(f"tensor {name!r} (made by {made_by}) is uint8 inside the network: TensorRT allows "
                            f"UINT8 only as a network input or output")
    return problems


def _type_problems(node: onnx.NodeProto, types: Dict[str, int]) -> List[str]:
    allowed = set(SUPPORTED_TYPES[node.op_type].split())
    if node.op_type in _TYPED_BY_OUTPUT:
        tensors = list(node.output[:1]) + (list(node.input[:1]) if node.op_type in ("Cast", "CastLike") else [])
    else:
        index = _TYPED_INPUT.get(node.op_type, 0)
        tensors = list(node.input[index:index + 1])
    problems = []
    for name in tensors:
        if name not in types:
            continue  # not inferred (rare): the parser decides
        type_name = _TYPE_NAMES.get(types[name], TensorProto.DataType.Name(types[name]))
        if type_name not in allowed:
            problems.append(f"{name!r} is {type_name}; TensorRT's table allows {', '.join(sorted(allowed))}")
    return problems


def _constant_problems(node: onnx.NodeProto, constants: Dict[str, onnx.TensorProto]) -> List[str]:
    problems = []
    for index, name in enumerate(node.input):
        what = CONSTANT_INPUTS.get((node.op_type, index))
        if what is None or not name:
            continue
        if name not in constants:
            problems.append(f"its {what} ({name!r}) must be a constant")
    if node.op_type == "TopK":
        if any(a.name == "sorted" and a.i != 1 for a in node.attribute):
            problems.append("sorted must be 1")
        k = constants.get(node.input[1])
        if k is not None and int(numpy_helper.to_array(k).reshape(-1)[0]) >= MAX_TOPK:
            problems.append(f"K = {int(numpy_helper.to_array(k).reshape(-1)[0])} must be < {MAX_TOPK}")
    return problems


# ---- graph helpers -----------------------------------------------------------------------------------------------


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The nodes of `graph` and of its subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in ([attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs)):
                yield from _all_nodes(sub)


def _tensor_types(graph: onnx.GraphProto) -> Dict[str, int]:
    """Element type of every named tensor the (shape-inferred) graph declares."""
    types = {init.name: init.data_type for init in graph.initializer}
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for node in _all_nodes(graph):
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    types[node.output[0]] = attribute.t.data_type
    return types


def _constant_names(graph: onnx.GraphProto) -> Dict[str, onnx.TensorProto]:
    """Initializers and Constant-node outputs (TensorRT treats both as weights), by tensor name."""
    constants = {init.name: init for init in graph.initializer}
    for node in _all_nodes(graph):
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value
    return constants


def main(argv: "List[str] | None" = None) -> int:
    """python -m movq_deploy.export.tensorrt_lint GRAPH.onnx ...: one line per graph; exit status = graphs failing."""
    import sys

    paths = sys.argv[1:] if argv is None else argv
    failing = 0
    for path in paths:
        problems = lint_file(path)
        failing += bool(problems)
        print(f"{path}: {'passes TensorRT 10.x parser rules' if not problems else '; '.join(problems)}")
    return failing


if __name__ == "__main__":
    raise SystemExit(main())
