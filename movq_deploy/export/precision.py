"""Reduced-precision graphs: fp16 (norms, softmax and the sampling tail kept in fp32) and the int8 prior (ONNX
Runtime's int8 kernels with activation scales fixed at export)."""
from __future__ import annotations

import warnings
from pathlib import Path

import onnx

from movq_deploy.contract import PRIOR_GRAPHS
from movq_deploy.export.onnx_graph import finalize_graph, forbidden_ops, producers
from movq_deploy.export.quantize_prior import activation_ranges, freeze_activation_scales
from movq_deploy.export.specs import ExportError, GraphSpec, io_shapes

# Kept in fp32 in the fp16 graphs (besides the nodes after the last Conv / after "logits / temperature" and the
# Fourier features' phase, below).
FP16_OP_BLOCK_LIST = [
    "GroupNormalization", "InstanceNormalization", "LayerNormalization", "Softmax", "LogSoftmax",
    "CumSum", "Log", "Exp", "ReduceSum", "ReduceMean", "ArgMin", "ArgMax", "TopK", "Sin", "Cos",
]


def _downstream_nodes(model: onnx.ModelProto, tensors: "set[str]") -> "list[str]":
    """Names of the nodes that depend on any of `tensors` (nodes are stored in topological order)."""
    reached, names = set(tensors), []
    for node in model.graph.node:
        if reached.intersection(node.input):
            names.append(node.name)
            reached.update(node.output)
    return names


def _upstream_nodes(model: onnx.ModelProto, op_types: "set[str]") -> "list[str]":
    """Names of the nodes of `op_types` and of every node they depend on."""
    producer = producers(model)
    pending = [node for node in model.graph.node if node.op_type in op_types]
    names: "set[str]" = set()
    while pending:
        node = pending.pop()
        if node.name not in names:
            names.add(node.name)
            pending.extend(producer[name] for name in node.input if name in producer)
    return [node.name for node in model.graph.node if node.name in names]


def fourier_phase(model: onnx.ModelProto) -> "list[str]":
    """The decoder's Fourier features (f0 = "fourier"), whole: Sin, Cos and everything their phase 2piB.z_q is
    computed from (index Cast, codebook Gather, the 1x1 Conv with 2piB). A phase of tens of radians keeps only
    ~0.03 rad of precision in fp16, so these few small nodes stay fp32."""
    return _upstream_nodes(model, {"Sin", "Cos"})


def fp16_tail(name: str, model: onnx.ModelProto) -> "list[str]":
    """The nodes an fp16 graph keeps in fp32 by name: the prior's sampling head (everything from logits /
    temperature on: softmax, CumSum, the counts, log-probabilities, confidence; in the guided prior also the guidance
    mix, from guidance_scale on), the encoder's nearest-code search and the decoder's clamp/scale/round (both:
    everything after the last Conv)."""
    if name in PRIOR_GRAPHS:
        return _downstream_nodes(model, {"temperature", "guidance_scale"})
    last_conv = [node for node in model.graph.node if node.op_type == "Conv"][-1]
    return _downstream_nodes(model, set(last_conv.output))


def convert_fp16(spec: GraphSpec, fp32_path: Path, path: Path) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(fp32_path))
    for index, node in enumerate(model.graph.node):  # node_block_list selects by name
        node.name = node.name or f"{node.op_type}_{index}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = convert_float_to_float16(
            model, keep_io_types=True, op_block_list=sorted(set(DEFAULT_OP_BLOCK_LIST) | set(FP16_OP_BLOCK_LIST)),
            node_block_list=fp16_tail(spec.name, model) + fourier_phase(model),
        )
    _sort_topologically(model)  # the converter appends its Casts at the end of the node list
    _remove_cast_round_trips(model)
    onnx.save(model, str(path))
    return finalize_graph(spec, path, io_shapes(spec))


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
    producer = producers(model)
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


def prepare_int8_prior(spec: GraphSpec, fp32_path: Path, scratch: Path) -> "tuple[Path, dict]":
    """ONNX Runtime's BERT fusions and quant_pre_process of the fp32 prior-step graph: (the prepared fp32 graph,
    the fused-operator counts)."""
    from onnxruntime.quantization import quant_pre_process
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    config = spec.module.step.prior.config
    # Attention (-> QAttention) and BiasGelu, but not SkipLayerNormalization: its CPU kernel took ~10 ms where
    # LayerNormalization + Add take ~2 (paper prior, batch 16), and left out the int8 step is 1.2x faster at both
    # sizes with the same tokens (BENCHMARKS.md, "The int8 limit").
    fusions_wanted = FusionOptions("bert")
    fusions_wanted.enable_skip_layer_norm = fusions_wanted.enable_bias_skip_layer_norm = False
    fused_path, prepared_path = scratch / f"{spec.name}.fused.onnx", scratch / f"{spec.name}.prepared.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = optimize_model(str(fp32_path), model_type="bert", num_heads=config.heads, hidden_size=config.width,
                               opt_level=0, optimization_options=fusions_wanted)
        fusions = {op: count for op, count in fused.get_fused_operator_statistics().items() if count}
        fused.save_model_to_file(str(fused_path))
        quant_pre_process(str(fused_path), str(prepared_path))
    return prepared_path, fusions


def quantize_int8(spec: GraphSpec, fp32_path: Path, path: Path, scratch: Path, calibration: dict,
                  batch: int) -> dict:
    """prior.int8.onnx (or prior_guided.int8.onnx): ONNX Runtime's BERT fusions, quant_pre_process, int8 weights
    (per channel) and QAttention / u8s8 GEMMs from quantize_dynamic, then activation scales fixed from the
    prior-step states `calibration` (movq_deploy.export.quantize_prior), so each image's outputs are independent of
    its batchmates (calibrated `batch` states per call). The result holds com.microsoft ops: it is an ONNX Runtime
    (CPU) graph, not a TensorRT one.
    Returns the fused-operator counts and the calibration's size."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    prepared_path, fusions = prepare_int8_prior(spec, fp32_path, scratch)
    dynamic_path = scratch / f"{spec.name}.dynamic.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(prepared_path), str(dynamic_path), weight_type=QuantType.QInt8, per_channel=True)
    model = onnx.load(str(dynamic_path))
    activations = {node.input[0] for node in model.graph.node if node.op_type == "DynamicQuantizeLinear"}
    frozen = freeze_activation_scales(model, activation_ranges(prepared_path, calibration, activations, scratch,
                                                               batch))
    onnx.save(model, str(path))
    bad = forbidden_ops(model)
    if bad:
        raise ExportError(f"{path.name} holds ops TensorRT cannot run: {', '.join(bad)}")
    onnx.checker.check_model(model)
    return {"fusions": fusions, "static_activation_scales": frozen, "calibration_states": len(calibration["tokens"])}
