"""One graph's export and its structural checks: forbidden ops, an unconditional prior."""
from __future__ import annotations

import onnx

from movq_deploy.export.onnx_graph import FORBIDDEN_OPS, export_graph, finalize_graph, forbidden_ops
from movq_deploy.export.specs import graph_specs, io_shapes
from movq_deploy.export.validation import validate_fp32


def test_prior_graphs_hold_no_random_multinomial_or_dynamic_topk(exported):
    out, manifest, _ = exported
    for precision in ("fp32", "fp16", "int8"):
        model = onnx.load(str(out / manifest["graphs"][precision]["prior"]["file"]))
        ops = {node.op_type for node in model.graph.node}
        assert not ops & FORBIDDEN_OPS, precision
        assert "CumSum" in ops  # the in-graph inverse-CDF draw
        assert forbidden_ops(model) == []


def test_forbidden_op_scan_catches_random_ops_and_a_computed_topk_k():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])
    k = onnx.helper.make_tensor_value_info("k", onnx.TensorProto.INT64, [1])
    nodes = [onnx.helper.make_node("RandomUniformLike", ["x"], ["noise"]),
             onnx.helper.make_node("TopK", ["noise", "k"], ["values", "indices"], name="topk")]
    outputs = [onnx.helper.make_tensor_value_info("values", onnx.TensorProto.FLOAT, None)]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x, k], outputs))
    assert forbidden_ops(model) == ["RandomUniformLike", "TopK(topk: K not constant)"]


def test_an_unconditional_prior_exports_without_a_class_input(tmp_path, tiny_models):
    movq, prior = tiny_models(num_classes=0)
    spec = graph_specs(movq, prior)["prior"]
    assert spec.input_names == ["tokens", "uniform", "gumbel", "temperature", "choice_scale"]
    path = tmp_path / "prior.onnx"
    export_graph(spec, path)
    model = finalize_graph(spec, path, io_shapes(spec))
    assert [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == ["batch", 128]
    errors = validate_fp32(spec, path)
    assert errors["token_mismatches"] == 0 and errors["max_confidence_error"] < 1e-3
