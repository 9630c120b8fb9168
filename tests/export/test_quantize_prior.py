"""The int8 prior's calibration states and fixed activation scales."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from movq_deploy.export.quantize_prior import CALIBRATION_STEPS, freeze_activation_scales, masked_counts, prior_states
from movq_deploy.models.movq import MoVQConfig
from movq_deploy.models.prior import PriorConfig


def test_states_follow_the_cosine_schedule_with_labels_and_the_null_class():
    config = PriorConfig.preset("tiny", MoVQConfig.preset("tiny"), num_classes=3)
    grids = np.random.default_rng(0).integers(0, config.codebook_size, (20, config.num_slots))
    labels = np.array([0, 1, 2, 7] * 5)  # 7: a class this prior lacks -> the null class
    feeds = prior_states(grids, labels, config, guided=True, rng=np.random.default_rng(1))
    counts = masked_counts(config.num_slots, CALIBRATION_STEPS)
    assert counts[0] == config.num_slots and counts == sorted(counts, reverse=True) and counts[-1] >= 1
    masked = (feeds["tokens"] == config.mask_id).sum(axis=1)
    assert masked.tolist() == counts * 20
    known = feeds["tokens"] != config.mask_id
    assert np.array_equal(feeds["tokens"][known], np.repeat(grids, CALIBRATION_STEPS, axis=0)[known])
    null = feeds["class_labels"] == config.num_classes
    assert null[np.repeat(labels, CALIBRATION_STEPS) == 7].all() and 0 < null.mean() < 0.6
    assert set(np.unique(feeds["guidance_scale"])) <= {0.0, 1.0, 3.0}


def _dynamic_matmul_model() -> onnx.ModelProto:
    """x -> DynamicQuantizeLinear -> MatMulInteger(w int8) -> Cast -> Mul(x_scale * w_scale): what quantize_dynamic
    writes for one MatMul."""
    weight = np.random.default_rng(0).integers(-127, 128, (4, 3)).astype(np.int8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dq"),
             helper.make_node("MatMulInteger", ["xq", "w", "xz", "wz"], ["yi"], name="mm"),
             helper.make_node("Cast", ["yi"], ["yf"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Mul", ["xs", "ws"], ["s"], name="scales"),
             helper.make_node("Mul", ["yf", "s"], ["y"], name="out")]
    graph = helper.make_graph(
        nodes, "dynamic", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.array(0, np.int8), "wz"),
         numpy_helper.from_array(np.array(0.01, np.float32), "ws")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_frozen_scales_make_rows_independent_of_their_batchmates():
    x = np.random.default_rng(1).uniform(-1, 1, (4, 4)).astype(np.float32)
    batch = np.concatenate([x[:1], 50 * x[1:]])  # batchmates with a much wider range

    def run(model, feeds):
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {"x": feeds})[0]

    dynamic = _dynamic_matmul_model()
    assert not np.array_equal(run(dynamic, batch)[0], run(dynamic, batch[:1])[0])  # the scale follows the batch
    frozen = _dynamic_matmul_model()
    assert freeze_activation_scales(frozen, {"x": (-1.0, 1.0)}) == 1
    onnx.checker.check_model(frozen)
    assert [node.op_type for node in frozen.graph.node] == ["QuantizeLinear", "MatMulIntegerToFloat"]
    assert np.array_equal(run(frozen, batch)[0], run(frozen, batch[:1])[0])
    reference = x[:1] @ (numpy_helper.to_array(frozen.graph.initializer[0]).astype(np.float32) * 0.01)
    assert np.abs(run(frozen, x[:1]) - reference).max() < 0.02  # 1/127.5 steps of x, weights exact
