"""The fp16 graphs keep their sampling tail in fp32."""
from __future__ import annotations

import onnx

from movq_deploy.export.precision import _downstream_nodes


def test_fp16_prior_keeps_the_sampling_head_in_fp32(exported):
    out, manifest, _ = exported
    model = onnx.load(str(out / manifest["graphs"]["fp16"]["prior"]["file"]))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    head = _downstream_nodes(model, {"temperature"})
    assert {n.op_type for n in model.graph.node if n.name in head} >= {"CumSum", "LogSoftmax"}
    head_tensors = [out for n in model.graph.node if n.name in head for out in n.output]
    assert not [t for t in head_tensors if types.get(t) == onnx.TensorProto.FLOAT16]
    # ... while the transformer body does run in fp16
    assert sum(t == onnx.TensorProto.FLOAT16 for t in types.values()) > 20
