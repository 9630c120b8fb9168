"""The F0 choices export like today's model: fp32 graphs validated against PyTorch by the exporter itself, and the
fp16 decoder keeps the Fourier features' phase (codebook lookup, 2piB.z_q, Sin, Cos) in fp32."""
from __future__ import annotations

import onnx
import pytest
import torch

from movq_deploy.export.pipeline import export_engine_dir
from movq_deploy.export.precision import fourier_phase
from movq_deploy.export.tensorrt_lint import lint_file
from movq_deploy.models.checkpoint import save_checkpoint
from movq_deploy.models.movq import MoVQ, MoVQConfig
from movq_deploy.models.prior import MaskGITPrior, PriorConfig


def _export(tmp_path, f0: str, fp16: bool, num_classes: int = 0):
    torch.manual_seed(0)
    movq_config = MoVQConfig(image_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_groups=4,
                             latent_channels=8, num_chunks=2, codebook_size=16, modulation="first",
                             modulated_levels=1, f0=f0)
    h, w, c = movq_config.grid
    prior_config = PriorConfig(h=h, w=w, c=c, codebook_size=16, num_classes=num_classes, width=32, depth=1, heads=2,
                               mlp_dim=64, dropout=0.0)
    movq, prior = MoVQ(movq_config), MaskGITPrior(prior_config)
    with torch.no_grad():  # unit-scale codes (trained ones are; the init is +-1/K): phases of several radians
        movq.quantizer.codebook.weight.normal_()
    ckpt = save_checkpoint(tmp_path / "ckpt.pt", tokenizer_config=movq_config.to_dict(), tokenizer=movq.state_dict(),
                           prior_config=prior_config.to_dict(), prior=prior.state_dict())
    engine = export_engine_dir(ckpt, tmp_path / "engines", fp16=fp16, log=lambda line: None)
    return tmp_path / "engines", engine  # the EngineDir: its manifest, read back


def _dtypes(model: onnx.ModelProto) -> dict:
    model = onnx.shape_inference.infer_shapes(model)
    values = list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)
    return {v.name: v.type.tensor_type.elem_type for v in values} | {t.name: t.data_type for t in model.graph.initializer}


@pytest.mark.parametrize("f0,num_classes", [("sinusoid", 0), ("learned", 3)])
def test_positional_and_learned_f0_export_and_match_pytorch(tmp_path, f0, num_classes):
    engine_dir, manifest = _export(tmp_path, f0, fp16=False, num_classes=num_classes)
    # No --steps: the paper's T, 8 for an unconditional prior (FFHQ), 12 for a class-conditional one (ImageNet).
    assert manifest.sampling.steps == (12 if num_classes else 8)
    decoder = manifest.validation["fp32"]["decoder"]
    assert decoder["max_pixel_error"] <= 1 and decoder["fraction_off"] <= 0.01
    assert manifest.model["tokenizer"]["f0"] == f0
    ops = {node.op_type for node in onnx.load(str(engine_dir / "decoder.onnx")).graph.node}
    assert not {"Sin", "Cos"} & ops  # the table is a constant of the graph, not computed per call
    assert lint_file(engine_dir / "decoder.onnx") == []  # TensorRT's parser rules and operator table


def test_fourier_f0_exports_with_its_phase_in_fp32_in_the_fp16_decoder(tmp_path):
    engine_dir, manifest = _export(tmp_path, "fourier", fp16=True)
    assert manifest.validation["fp32"]["decoder"]["max_pixel_error"] <= 1  # vs PyTorch (the exporter checks)
    for file in ("decoder.onnx", "decoder.fp16.onnx"):  # Sin and Cos are in TensorRT's ONNX operator table
        assert lint_file(engine_dir / file) == [], file
    fp16 = onnx.load(str(engine_dir / "decoder.fp16.onnx"))
    dtypes = _dtypes(fp16)
    producer = {out: node for node in fp16.graph.node for out in node.output}
    trig = [node for node in fp16.graph.node if node.op_type in ("Sin", "Cos")]
    assert sorted(node.op_type for node in trig) == ["Cos", "Sin"]
    for node in trig:
        phase = producer[node.input[0]]
        assert phase.op_type == "Conv"
        assert {dtypes[name] for name in [*node.input, *node.output, *phase.input]} == {onnx.TensorProto.FLOAT}
    gather = [node for node in fp16.graph.node if node.op_type == "Gather" and node.input[0] in dtypes
              and dtypes[node.input[0]] in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)]
    assert gather and all(dtypes[node.output[0]] == onnx.TensorProto.FLOAT for node in gather)  # the codebook
    # ... while the decoder body does run in fp16.
    convs = [node for node in fp16.graph.node if node.op_type == "Conv"]
    assert sum(dtypes[node.input[1]] == onnx.TensorProto.FLOAT16 for node in convs) >= len(convs) - 3
    agreement = manifest.validation["fp16"]["decoder"]
    assert agreement["max_pixel_error"] <= 8 and agreement["mean_pixel_error"] < 1.0


def test_fourier_phase_selects_the_trig_nodes_and_their_inputs_only():
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Mul", ["x", "x"], ["a"], name="square"),
         onnx.helper.make_node("Sin", ["a"], ["s"], name="sin"),
         onnx.helper.make_node("Relu", ["x"], ["r"], name="unrelated"),
         onnx.helper.make_node("Add", ["s", "r"], ["y"], name="after")],
        "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    assert fourier_phase(onnx.helper.make_model(graph)) == ["square", "sin"]
