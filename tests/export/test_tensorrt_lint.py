"""movq_deploy.export.tensorrt_lint: every exported fp32/fp16 graph passes TensorRT's ONNX parser rules, and each
rule fails on a graph planted to break it (the uint8 Transpose that once blocked every engine build first)."""
from __future__ import annotations

import warnings

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from movq_deploy.export.pipeline import export_engine_dir
from movq_deploy.export.tensorrt_lint import check_file, lint_file, lint_model
from movq_deploy.models.checkpoint import save_checkpoint
from movq_deploy.models.movq import MoVQ, MoVQConfig
from movq_deploy.models.prior import MaskGITPrior, PriorConfig


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory):
    """A fresh fp32 + fp16 + int8 export of the "tiny" preset (the demo's model), conditional."""
    root = tmp_path_factory.mktemp("lint")
    torch.manual_seed(3)
    movq_config = MoVQConfig.preset("tiny")
    prior_config = PriorConfig.preset("tiny", movq_config, num_classes=2)
    ckpt = save_checkpoint(root / "ckpt.pt", tokenizer_config=movq_config.to_dict(),
                           tokenizer=MoVQ(movq_config).state_dict(), prior_config=prior_config.to_dict(),
                           prior=MaskGITPrior(prior_config).state_dict(), class_names=["a", "b"])
    engine_dir = export_engine_dir(ckpt, root / "engines", steps=4, fp16=True, int8=True, log=lambda line: None)
    return engine_dir.path, engine_dir.to_dict()


@pytest.fixture(params=["demo_export", "exported"])
def fresh_export(request):
    """(engine_dir, manifest) of the demo preset, and of the export tests' smaller model (tests/export/conftest.py)."""
    engine_dir, manifest, *_ = request.getfixturevalue(request.param)
    return engine_dir, manifest


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("graph", ["encoder", "decoder", "prior", "prior_guided"])
def test_every_exported_graph_passes_the_tensorrt_rules(fresh_export, precision, graph):
    engine_dir, manifest = fresh_export
    path = engine_dir / manifest["graphs"][precision][graph]["file"]
    assert lint_file(path) == []
    check_file(path)  # does not raise


def test_the_int8_prior_is_not_a_tensorrt_graph(fresh_export):
    """The ONNX Runtime-only int8 prior (MatMulInteger, com.microsoft fusions) fails the lint: that is why TensorRT
    builds from fp32/fp16 only."""
    engine_dir, manifest = fresh_export
    problems = lint_file(engine_dir / manifest["graphs"]["int8"]["prior"]["file"])
    assert any("MatMulInteger" in p or "com.microsoft" in p for p in problems)


def _model(nodes, inputs, outputs, initializers=(), opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "planted", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _uint8_image_model(transpose_first: bool) -> onnx.ModelProto:
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, ["batch", 8, 8, 3])
    out = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])
    if transpose_first:  # the old EncoderGraph: permute the uint8 image, then cast
        nodes = [helper.make_node("Transpose", ["image"], ["t"], perm=[0, 3, 1, 2], name="permute"),
                 helper.make_node("Cast", ["t"], ["x"], to=TensorProto.FLOAT, name="cast")]
    else:
        nodes = [helper.make_node("Cast", ["image"], ["f"], to=TensorProto.FLOAT, name="cast"),
                 helper.make_node("Transpose", ["f"], ["x"], perm=[0, 3, 1, 2], name="permute")]
    return _model(nodes, [image], [out])


def test_a_planted_uint8_transpose_fails(tmp_path):
    problems = lint_model(_uint8_image_model(transpose_first=True))
    assert any("uint8 input 'image' feeds Transpose" in p for p in problems)
    assert any("'t'" in p and "uint8 inside the network" in p for p in problems)
    assert lint_model(_uint8_image_model(transpose_first=False)) == []
    path = tmp_path / "planted.onnx"
    onnx.save(_uint8_image_model(transpose_first=True), str(path))
    with pytest.raises(ValueError, match="would not parse in TensorRT: uint8 input 'image' feeds Transpose"):
        check_file(path)


class _PermuteThenCast(torch.nn.Module):
    def forward(self, image):
        return image.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class _CastThenPermute(torch.nn.Module):
    def forward(self, image):
        return image.float().permute(0, 3, 1, 2) / 127.5 - 1.0


def test_the_exporter_writes_a_uint8_transpose_for_permute_before_cast(tmp_path):
    """Why EncoderGraph casts first: torch.onnx keeps a permute-then-cast order, which TensorRT rejects."""
    image = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    results = {}
    for module in (_PermuteThenCast(), _CastThenPermute()):
        path = tmp_path / f"{type(module).__name__}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (image,), dynamo=True, opset_version=18, input_names=["image"],
                              output_names=["x"], verbose=False).save(str(path))
        results[type(module).__name__] = lint_file(path)
    assert any("feeds Transpose" in p for p in results["_PermuteThenCast"])
    assert results["_CastThenPermute"] == []


def test_a_uint8_output_must_come_straight_out_of_a_cast():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    image = helper.make_tensor_value_info("image", TensorProto.UINT8, [3, 2])
    late_transpose = [helper.make_node("Cast", ["x"], ["u"], to=TensorProto.UINT8, name="cast"),
                      helper.make_node("Transpose", ["u"], ["image"], perm=[1, 0], name="permute")]
    problems = lint_model(_model(late_transpose, [x], [image]))
    assert any("uint8 output 'image' comes out of Transpose" in p for p in problems)
    cast_last = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0], name="permute"),
                 helper.make_node("Cast", ["t"], ["image"], to=TensorProto.UINT8, name="cast")]
    assert lint_model(_model(cast_last, [x], [image])) == []


def _float_model(node, extra_inputs=(), initializers=(), opset=18, out_shape=(2, 4)):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))
    return _model([node], [x, *extra_inputs], [y], initializers, opset)


def test_opset_random_ops_and_unsupported_ops_fail():
    relu = helper.make_node("Relu", ["x"], ["y"], name="relu")
    assert lint_model(_float_model(relu)) == []
    assert any("opset 21 > 20" in p for p in lint_model(_float_model(relu, opset=21)))
    random = helper.make_node("RandomUniformLike", ["x"], ["y"], name="noise")
    assert any("random ops are not allowed" in p for p in lint_model(_float_model(random)))
    det = helper.make_node("Det", ["x"], ["y"], name="det")
    assert any("Det is not in TensorRT 10.x's ONNX operator table" in p
               for p in lint_model(_model([det], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])))


def test_group_normalization_only_up_to_opset_18():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 2, 2])
    weights = [helper.make_tensor(name, TensorProto.FLOAT, [2], [1.0, 1.0]) for name in ("scale", "bias")]
    norm = helper.make_node("GroupNormalization", ["x", "scale", "bias"], ["y"], num_groups=2, name="norm")
    assert lint_model(_model([norm], [x], [y], weights, opset=18)) == []
    problems = lint_model(_model([norm], [x], [y], weights, opset=19))
    assert any("GroupNormalization at opset 19" in p for p in problems)


def test_topk_needs_a_constant_k_below_3840_and_sorted_output():
    def topk_model(k_value=None, sorted_flag=1):
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5000])
        values = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, None])
        inputs, initializers = [x], []
        if k_value is None:
            inputs.append(helper.make_tensor_value_info("k", TensorProto.INT64, [1]))
        else:
            initializers.append(helper.make_tensor("k", TensorProto.INT64, [1], [k_value]))
        node = helper.make_node("TopK", ["x", "k"], ["y", "i"], axis=-1, sorted=sorted_flag, name="topk")
        return _model([node], inputs, [values], initializers)

    assert lint_model(topk_model(16)) == []
    assert any("K = 4000 must be < 3840" in p for p in lint_model(topk_model(4000)))
    assert any("its K ('k') must be a constant" in p for p in lint_model(topk_model(None)))
    assert any("sorted must be 1" in p for p in lint_model(topk_model(16, sorted_flag=0)))


def test_an_op_on_a_type_the_table_excludes_fails():
    a = helper.make_tensor_value_info("a", TensorProto.INT32, [2, 2])
    y = helper.make_tensor_value_info("y", TensorProto.INT32, [2, 2])
    matmul = helper.make_node("MatMul", ["a", "a"], ["y"], name="int_matmul")  # MatMul: FP32, FP16, BF16 only
    problems = lint_model(_model([matmul], [a], [y]))
    assert problems == ["MatMul node int_matmul: 'a' is INT32; TensorRT's table allows BF16, FP16, FP32"]
    clip = helper.make_node("Clip", ["l"], ["z"], name="clip")  # Clip: float types only in the table
    longs = helper.make_tensor_value_info("l", TensorProto.INT64, [3])
    z = helper.make_tensor_value_info("z", TensorProto.INT64, [3])
    assert lint_model(_model([clip], [longs], [z])) == [
        "Clip node clip: 'l' is INT64; TensorRT's table allows BF16, FP16, FP32"]


def test_command_line_reports_each_graph(fresh_export, tmp_path, capsys):
    from movq_deploy.export.tensorrt_lint import main

    engine_dir, manifest = fresh_export
    planted = tmp_path / "planted.onnx"
    onnx.save(_uint8_image_model(transpose_first=True), str(planted))
    good = engine_dir / manifest["graphs"]["fp16"]["encoder"]["file"]
    assert main([str(good), str(planted)]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{good}: passes TensorRT 10.x parser rules"
    assert lines[1].startswith(f"{planted}: uint8 input 'image' feeds Transpose")
