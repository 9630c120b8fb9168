"""movq_deploy.export.engine_check: the build-time comparison through Polygraphy's comparator.

Here the candidate is another ONNX Runtime runner (the fp16 graph, or a planted wrong graph): the ONNX side, the
Comparator plumbing, the figures and the tolerance failures all run on the CPU. The TensorRT side (a TrtRunner on a
built plan) runs in tests/backends/test_tensorrt.py where TensorRT and a GPU exist.
"""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from movq_deploy.export import engine_check

GRAPHS = ("encoder", "decoder", "prior", "prior_guided")


def _check(exported, candidate_path, precision, graph):
    engine_dir, manifest, _ = exported
    fp32 = manifest["graphs"]["fp32"][graph]
    candidate = engine_check.onnxruntime_runner(candidate_path, name="candidate")
    return engine_check.check_engine(candidate, engine_dir / fp32["file"], fp32["inputs"], precision=precision,
                                     graph=graph, codebook_size=manifest["codebook_size"],
                                     num_classes=manifest["num_classes"], batches=(1, 4))


def test_feeds_follow_the_graph_io(exported):
    _, manifest, _ = exported
    prior_io = manifest["graphs"]["fp32"]["prior"]["inputs"]
    feeds = engine_check.comparison_feeds(prior_io, manifest["codebook_size"], manifest["num_classes"], (1, 3))
    assert len(feeds) == 4  # two batch sizes, then the same at a cold temperature
    for feed, batch in zip(feeds, (1, 3, 1, 3)):
        for spec in prior_io:
            assert feed[spec["name"]].dtype == np.dtype(spec["dtype"])
            assert feed[spec["name"]].shape[0] == (batch if spec["shape"][0] == "batch" else spec["shape"][0])
    assert (feeds[0]["tokens"] == manifest["mask_id"]).all()  # the first sampling step: everything masked
    np.testing.assert_array_equal(feeds[3]["tokens"], feeds[1]["tokens"])
    assert (feeds[3]["temperature"] == engine_check.COLD_TEMPERATURE).all()
    again = engine_check.comparison_feeds(prior_io, manifest["codebook_size"], manifest["num_classes"], (1, 3))
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(feeds, again) for k in a)  # fixed inputs


@pytest.mark.parametrize("graph", GRAPHS)
def test_a_graph_against_itself_is_exact(exported, graph):
    engine_dir, manifest, _ = exported
    errors = _check(exported, engine_dir / manifest["graphs"]["fp32"][graph]["file"], "fp32", graph)
    if graph == "decoder":
        assert errors == {"max_pixel_error": 0, "psnr_db": engine_check.IDENTICAL_PSNR_DB}
    else:
        assert errors["grid_agreement"] == errors["token_agreement"] == errors["top_token_agreement"] == 1.0


@pytest.mark.parametrize("graph", GRAPHS)
def test_the_fp16_graph_passes_the_fp16_tolerance(exported, graph):
    engine_dir, manifest, _ = exported
    errors = _check(exported, engine_dir / manifest["graphs"]["fp16"][graph]["file"], "fp16", graph)
    if graph == "decoder":
        assert engine_check.TOLERANCE["fp16"]["decoder_min_psnr_db"] <= errors["psnr_db"]
    else:
        assert errors["top_token_agreement"] >= 0.99


def _planted_decoder(exported, tmp_path):
    """The decoder with 0.1 added to its last convolution's bias (about 13 levels of brightness): a wrong engine,
    as a mis-built one would be."""
    engine_dir, manifest, _ = exported
    model = onnx.load(str(engine_dir / manifest["graphs"]["fp32"]["decoder"]["file"]))
    last_conv = [node for node in model.graph.node if node.op_type == "Conv"][-1]
    bias = next(t for t in model.graph.initializer if t.name == last_conv.input[2])
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(0.1), bias.name))
    path = tmp_path / "wrong-decoder.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("precision, figure", [("fp32", "max_pixel_error"), ("fp16", "psnr_db")])
def test_a_planted_mismatch_fails_with_its_figure(exported, tmp_path, precision, figure):
    with pytest.raises(engine_check.EngineMismatch,
                       match=rf"the {precision} decoder engine disagrees with ONNX Runtime: decoder {figure} "):
        _check(exported, _planted_decoder(exported, tmp_path), precision, "decoder")


def test_a_planted_token_mismatch_fails_on_grid_agreement(exported, tmp_path):
    """The prior with every weight perturbed by 50% noise draws other tokens: its grids fail the fp32 check."""
    engine_dir, manifest, _ = exported
    model = onnx.load(str(engine_dir / manifest["graphs"]["fp32"]["prior"]["file"]))
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        weights = numpy_helper.to_array(tensor)
        if weights.dtype == np.float32 and weights.size > 1:
            noise = 1 + 0.5 * rng.standard_normal(weights.shape).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(weights * noise, tensor.name))
    path = tmp_path / "wrong-prior.onnx"
    onnx.save(model, str(path))
    with pytest.raises(engine_check.EngineMismatch, match="prior grid_agreement"):
        _check(exported, path, "fp32", "prior")


def test_failures_name_each_figure_outside_tolerance():
    assert engine_check.failures("fp32", "decoder", {"max_pixel_error": 2, "psnr_db": 50.0}) == []
    assert engine_check.failures("fp32", "decoder", {"max_pixel_error": 3, "psnr_db": 50.0}) == [
        "decoder max_pixel_error 3 (limit 2)"]
    assert engine_check.failures("fp16", "decoder", {"max_pixel_error": 9, "psnr_db": 39.5}) == [
        "decoder psnr_db 39.5 (limit 40)"]
    assert engine_check.failures("fp16", "encoder", {"grid_agreement": 0.5, "top_token_agreement": 0.985}) == [
        "encoder top_token_agreement 0.985 (limit 0.99)"]
    assert engine_check.failures("fp32", "prior", {"grid_agreement": 0.99, "top_token_agreement": 0.5}) == []
