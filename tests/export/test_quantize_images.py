"""The static int8 encoder and decoder: calibration inputs, the nodes kept fp32, the recorded agreement, and the
Generator's use of them."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from movq_deploy import Generator
from movq_deploy.manifest import EngineDir
from movq_deploy.export.quantize_images import (
    ArrayReader, ImageQuantConfig, decoder_agreement, fp32_nodes, load_image_sets,
)


def _producers(model):
    return {out: node for node in model.graph.node for out in node.output}


def _quantized(model, node) -> bool:
    """Whether `node`'s weight (input 1) comes out of a DequantizeLinear (an int8 weight)."""
    producer = _producers(model).get(node.input[1])
    return producer is not None and producer.op_type == "DequantizeLinear"


def test_int8_image_graphs_keep_the_fragile_nodes_fp32(exported):
    out, manifest, _ = exported
    encoder = onnx.load(str(out / manifest["graphs"]["int8"]["encoder"]["file"]))
    decoder = onnx.load(str(out / manifest["graphs"]["int8"]["decoder"]["file"]))
    for model in (encoder, decoder):
        convs = [node for node in model.graph.node if node.op_type == "Conv"]
        assert sum(_quantized(model, conv) for conv in convs) >= len(convs) - 2  # the rest int8
    decoder_convs = [node for node in decoder.graph.node if node.op_type == "Conv"]
    assert not _quantized(decoder, decoder_convs[-1])  # the final conv, to the colour channels
    encoder_convs = [node for node in encoder.graph.node if node.op_type == "Conv"]
    assert not any(_quantized(encoder, conv) for conv in encoder_convs[-2:])  # conv_out and quant_conv
    distance = [node for node in encoder.graph.node if node.op_type == "MatMul"][-1]  # z @ codebook^T
    assert not any(_producers(encoder).get(name, distance).op_type == "DequantizeLinear" for name in distance.input)
    assert not [node for node in decoder.graph.node if node.op_type.startswith("QLinear")]  # QDQ, fused at load


def test_int8_weights_are_per_channel(exported):
    out, manifest, _ = exported
    decoder = onnx.load(str(out / manifest["graphs"]["int8"]["decoder"]["file"]))
    initializers = {init.name: init for init in decoder.graph.initializer}
    producers = _producers(decoder)
    conv = next(node for node in decoder.graph.node if node.op_type == "Conv" and _quantized(decoder, node))
    dequantize = producers[conv.input[1]]
    weight, scale = initializers[dequantize.input[0]], initializers[dequantize.input[1]]
    assert weight.data_type == onnx.TensorProto.INT8
    assert list(scale.dims) == [weight.dims[0]]  # one scale per output channel


def test_manifest_records_the_measured_agreement(exported):
    _, manifest, lines = exported
    int8 = manifest["validation"]["int8"]
    encoder, decoder = int8["encoder"], int8["decoder"]
    assert 0.5 < encoder["index_agreement"] <= 1.0 and encoder["images"] > 0
    assert 20.0 < decoder["psnr_db"] <= 100.0 and decoder["worst_image_psnr_db"] <= decoder["psnr_db"]
    for figures in (encoder, decoder):
        quantization = figures["quantization"]
        assert quantization["method"] == "minmax" and quantization["calibration_images"] > 0
        assert quantization["source"] == "skimage.data"  # the fixture's checkpoint records no training data
        assert quantization["fp32_nodes"]
    assert any(line.startswith("decoder  int8") and "psnr_db" in line for line in lines)


def test_generator_int8_uses_every_int8_graph(exported):
    out, manifest, _ = exported
    generator = Generator(out, backend="onnxruntime-cpu", precision="int8")
    files = {name: runner.path.name for name, runner in generator.backend.runners.items()}
    assert files == {"encoder": "encoder.int8.onnx", "decoder": "decoder.int8.onnx", "prior": "prior.int8.onnx",
                     "prior_guided": "prior_guided.int8.onnx"}
    images = generator.sample(n=3, seed=0, output_type="np")
    assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8
    reference = Generator(out, backend="onnxruntime-cpu", precision="fp32")
    indices = reference.encode(images)
    assert (generator.encode(images) == indices).mean() > 0.5
    assert np.abs(generator.decode(indices, "np").astype(int) - reference.decode(indices, "np").astype(int)).mean() < 8


def test_a_directory_without_int8_image_graphs_uses_the_fp32_ones(exported):
    out, manifest, _ = exported
    before_guidance = {name: entry for name, entry in manifest["graphs"]["fp32"].items() if name != "prior_guided"}
    older = {**manifest, "graphs": {"fp32": before_guidance, "int8": {"prior": manifest["graphs"]["int8"]["prior"]}}}
    entries = EngineDir.from_dict(out, older).graph_entries("int8")
    assert [entries[name]["file"] for name in ("encoder", "decoder", "prior")] == \
        ["encoder.onnx", "decoder.onnx", "prior.int8.onnx"]
    fp32_only = {**manifest, "graphs": {"fp32": manifest["graphs"]["fp32"]}}
    with pytest.raises(FileNotFoundError, match="no int8 prior graph"):
        EngineDir.from_dict(out, fp32_only).graph_entries("int8")


def test_fp32_nodes_follow_the_config(exported, tiny_models):
    out, manifest, _ = exported
    model = onnx.load(str(out / manifest["graphs"]["fp32"]["decoder"]["file"]))
    convs = [node.name for node in model.graph.node if node.op_type == "Conv"]
    assert fp32_nodes("decoder", model, ImageQuantConfig()) == [convs[-1]]
    assert fp32_nodes("decoder", model, ImageQuantConfig(decoder_fp32_final_convs=0)) == []
    zq = fp32_nodes("decoder", model, ImageQuantConfig(decoder_fp32_final_convs=0, fp32_zq_convs=True))
    encoder = onnx.load(str(out / manifest["graphs"]["fp32"]["encoder"]["file"]))
    distance = [node.name for node in encoder.graph.node if node.op_type == "MatMul"][-1]
    assert fp32_nodes("encoder", encoder, ImageQuantConfig(encoder_fp32_final_convs=0)) == [distance]
    movq, _ = tiny_models(3)
    modulated_norms = sum(1 for m in movq.decoder.modules() if type(m).__name__ == "SpatialNorm")
    assert modulated_norms > 0 and len(zq) == 1 + 2 * modulated_norms  # post_quant_conv; gamma, beta of each norm


def test_calibration_reader_batches_and_rewinds():
    array = np.arange(10)[:, None]
    reader = ArrayReader("x", array, batch=4)
    chunks = []
    while (feed := reader.get_next()) is not None:
        chunks.append(feed["x"])
    assert [len(c) for c in chunks] == [4, 4, 2] and np.array_equal(np.concatenate(chunks), array)
    reader.rewind()
    assert np.array_equal(reader.get_next()["x"], array[:4])


def test_image_sets_come_from_the_recorded_training_folder(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            colour = (200, 10 * i, 0) if cls == "a" else (0, 10 * i, 200)
            Image.new("RGB", (20, 20), colour).save(tmp_path / cls / f"{i}.png")
    record = {"tokenizer": {"data": {"source": str(tmp_path)}}}
    sets = load_image_sets(16, 5, record=record)
    assert sets.source == str(tmp_path) and sets.calibration.shape == (5, 16, 16, 3)
    assert len(sets.held_out) == 2  # one held-out image per class
    assert load_image_sets(16, 3, record={"tokenizer": {"data": {"source": str(tmp_path / "gone")}}}).source \
        == "skimage.data"
    digits = load_image_sets(16, 3, record={"tokenizer": {"data": {"source": "sklearn:digits"}}})
    assert digits.source == "sklearn:digits" and digits.calibration.shape == (3, 16, 16, 3)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="method must be one of"):
        ImageQuantConfig(method="kl")
    with pytest.raises(ValueError, match="positive"):
        ImageQuantConfig(calibration_images=0)


def test_decoder_agreement_of_a_graph_with_itself_is_exact(exported):
    out, manifest, _ = exported
    path = out / manifest["graphs"]["fp32"]["decoder"]["file"]
    tokens = np.random.default_rng(0).integers(0, 16, (4, 8, 8, 2), dtype=np.int32)
    figures = decoder_agreement(path, path, tokens, batch=3)
    assert figures["psnr_db"] == 100.0 and figures["max_pixel_error"] == 0 and figures["images"] == 4
