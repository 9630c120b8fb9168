"""export_engine_dir on a tiny random-weight model: files, manifest, clean graphs, validation, atomicity."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from movq_deploy import manifest as mf
from movq_deploy.export import openvino_graphs, validation
from movq_deploy.export.pipeline import export_engine_dir
from movq_deploy.export.specs import ExportError

WITH_BF16 = openvino_graphs.bf16_unavailable() is None  # the export validates bf16 here
WITH_NNCF = openvino_graphs.int8_unavailable() is None  # ... and makes OpenVINO's int8 graphs


def _graph_files(manifest):
    return [(precision, name, entry) for precision, graphs in manifest["graphs"].items()
            for name, entry in graphs.items()]


def test_engine_dir_holds_every_graph_and_a_verifiable_manifest(exported, class_names):
    out, manifest, _ = exported
    assert json.loads((out / mf.MANIFEST_NAME).read_text()) == json.loads(json.dumps(manifest))
    assert manifest["format"] == mf.FORMAT and manifest["format_version"] == mf.FORMAT_VERSION == 2
    names = {entry["file"] for _, _, entry in _graph_files(manifest)}
    openvino_ir = {f"{graph}.int8-openvino.{ext}" for graph in openvino_graphs.INT8_GRAPHS for ext in ("xml", "bin")}
    onnx_files = {"encoder.onnx", "decoder.onnx", "prior.onnx", "encoder.fp16.onnx", "decoder.fp16.onnx",
                  "prior.fp16.onnx", "prior.int8.onnx", "encoder.int8.onnx", "decoder.int8.onnx",
                  "prior_guided.onnx", "prior_guided.fp16.onnx", "prior_guided.int8.onnx"}
    assert names == onnx_files | ({name for name in openvino_ir if name.endswith(".xml")} if WITH_NNCF else set())
    weights = {entry["weights"]["file"] for _, _, entry in _graph_files(manifest) if "weights" in entry}
    assert weights == ({name for name in openvino_ir if name.endswith(".bin")} if WITH_NNCF else set())
    assert sorted(p.name for p in out.iterdir()) == sorted(names | weights | {"manifest.json"})
    for _, _, entry in _graph_files(manifest):
        mf.verify_file(out, entry)
    assert mf.EngineDir.load(out).to_dict() == manifest
    assert manifest["grid"] == {"h": 8, "w": 8, "c": 2}
    assert manifest["codebook_size"] == manifest["mask_id"] == 16 and manifest["image_size"] == 16
    assert manifest["num_classes"] == 3 and manifest["class_names"] == class_names
    assert manifest["sampling"] == {"steps": 6, "temperature": 1.0, "choice_temperature": 4.5, "guidance_scale": 1.5}
    assert mf.EngineDir.load(out).graph_names == ("encoder", "decoder", "prior", "prior_guided")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_graphs_are_clean_with_a_dynamic_batch_and_typed_boundaries(exported):
    out, manifest, _ = exported
    expected = {
        "encoder": ({"image": ("uint8", ["batch", 16, 16, 3])}, {"indices": ("int32", ["batch", 8, 8, 2])}),
        "decoder": ({"indices": ("int32", ["batch", 8, 8, 2])}, {"image": ("uint8", ["batch", 16, 16, 3])}),
        "prior": ({"tokens": ("int32", ["batch", 128]), "class_labels": ("int32", ["batch"]),
                   "uniform": ("float32", ["batch", 128]), "gumbel": ("float32", ["batch", 128]),
                   "temperature": ("float32", ["batch"]), "choice_scale": ("float32", ["batch"])},
                  {"sampled": ("int32", ["batch", 128]), "confidence": ("float32", ["batch", 128])}),
    }
    prior_inputs, prior_outputs = expected["prior"]
    expected["prior_guided"] = ({**prior_inputs, "guidance_scale": ("float32", ["batch"])}, prior_outputs)
    for precision, name, entry in _graph_files(manifest):
        inputs, outputs = expected[name]
        assert {t["name"]: (t["dtype"], t["shape"]) for t in entry["inputs"]} == inputs
        assert {t["name"]: (t["dtype"], t["shape"]) for t in entry["outputs"]} == outputs
        if precision in ("int8", "int8-openvino"):
            continue  # com.microsoft quantized ops, OpenVINO IR: checked by their runtimes, not by the ONNX schemas
        model = onnx.load(str(out / entry["file"]))
        onnx.checker.check_model(model, full_check=True)
        assert entry["opset"] == 18 and {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 18
        assert len(model.graph.value_info) > 0  # shapes inferred and stored


def test_validation_figures_are_recorded_and_within_tolerance(exported):
    out, manifest, lines = exported
    fp32 = manifest["validation"]["fp32"]
    assert fp32["decoder"]["max_pixel_error"] <= 1 and fp32["decoder"]["fraction_off"] <= 0.01
    assert fp32["encoder"]["mismatches"] == 0 and fp32["prior"]["token_mismatches"] == 0
    assert fp32["prior"]["max_confidence_error"] < 1e-3
    # The guided graph (guidance scales 0.5..4 and 0 in its validation inputs) against PyTorch's GuidedPriorStepGraph.
    assert fp32["prior_guided"]["token_mismatches"] == 0 and fp32["prior_guided"]["max_confidence_error"] < 1e-3
    fp16, int8 = manifest["validation"]["fp16"], manifest["validation"]["int8"]
    assert fp16["decoder"]["max_pixel_error"] <= 8 and fp16["encoder"]["index_agreement"] > 0.9
    for prior in ("prior", "prior_guided"):
        assert fp16[prior]["top_token_agreement"] > 0.9 and 0.0 < int8[prior]["top_token_agreement"] <= 1.0
        fusions = int8[prior]["fusions"]  # the BERT fusions applied, but not the slower SkipLayerNormalization
        assert fusions.get("Attention", 0) > 0 and fusions.get("SkipLayerNormalization", 0) == 0
        # Activation scales fixed at export: none left to compute per call.
        assert int8[prior]["static_activation_scales"] > 0 and int8[prior]["calibration_states"] > 0
        assert 0.0 < int8[prior]["held_out_top_token_agreement"] <= 1.0  # real token grids, not random tokens
        graph = onnx.load(str(out / manifest["graphs"]["int8"][prior]["file"]))
        assert not [node for node in graph.graph.node if node.op_type == "DynamicQuantizeLinear"]
    assert manifest["validation"]["batch_sizes"] == [1, 3]
    table = "\n".join(lines)
    assert "| prior | fp32 | PyTorch |" in table and "| prior | int8 | fp32 ONNX |" in table
    assert "| prior_guided | fp32 | PyTorch |" in table
    graph_lines = 12 + 4 * WITH_BF16 + len(openvino_graphs.INT8_GRAPHS) * WITH_NNCF
    assert sum(line.startswith(("encoder ", "decoder ", "prior ", "prior_guided ")) for line in lines) == graph_lines
    assert all(entry["flops_per_image"] > 0 for entry in manifest["graphs"]["fp32"].values())
    assert manifest["graphs"]["fp32"]["prior_guided"]["flops_per_image"] > manifest["graphs"]["fp32"]["prior"][
        "flops_per_image"]  # two prior rows per image


@pytest.mark.skipif(not WITH_BF16, reason=f"bf16 is validated where it runs: {openvino_graphs.bf16_unavailable()}")
def test_bf16_is_validated_on_held_out_data(exported):
    _, manifest, lines = exported
    bf16 = manifest["validation"]["bf16"]
    assert set(bf16) == {"encoder", "decoder", "prior", "prior_guided"}
    assert 0.9 < bf16["encoder"]["index_agreement"] <= 1 and bf16["encoder"]["images"] > 0
    assert bf16["decoder"]["psnr_db"] > 30 and bf16["decoder"]["images"] > 0
    for prior in ("prior", "prior_guided"):
        assert 0.9 < bf16[prior]["held_out_top_token_agreement"] <= 1
        assert 0.9 < bf16[prior]["top_token_agreement"] <= 1  # the fixed validation inputs too
    assert "| prior | bf16 | fp32 ONNX |" in "\n".join(lines)


@pytest.mark.skipif(not WITH_NNCF, reason=f"no OpenVINO int8 graphs: {openvino_graphs.int8_unavailable()}")
def test_openvino_int8_graphs_are_fixed_scale_ir_with_their_figures(exported):
    out, manifest, _ = exported
    graphs, figures = manifest["graphs"]["int8-openvino"], manifest["validation"]["int8-openvino"]
    assert set(graphs) == set(figures) == set(openvino_graphs.INT8_GRAPHS)
    for name, entry in graphs.items():
        assert entry["format"] == "openvino-ir" and mf.verify_file(out, entry).suffix == ".xml"
        assert entry["inputs"] == manifest["graphs"]["fp32"][name]["inputs"]
        quantization = figures[name]["quantization"]
        assert quantization["fake_quantize_ops"] > 0 and quantization["fp32_ops"] > 0  # fixed scales; fp32 ends
    for prior in ("prior", "prior_guided"):
        assert 0.0 < figures[prior]["held_out_top_token_agreement"] <= 1.0
    assert 0.0 < figures["decoder"]["psnr_db"]


def test_exported_graphs_run_at_an_unseen_batch_size(exported):
    out, manifest, _ = exported
    session = {name: ort.InferenceSession(str(out / entry["file"]), providers=["CPUExecutionProvider"])
               for name, entry in manifest["graphs"]["fp32"].items()}
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    (indices,) = session["encoder"].run(None, {"image": images})
    assert indices.shape == (5, 8, 8, 2) and indices.dtype == np.int32 and indices.max() < 16
    (decoded,) = session["decoder"].run(None, {"indices": indices})
    assert decoded.shape == (5, 16, 16, 3) and decoded.dtype == np.uint8
    tokens = indices.reshape(5, -1).copy()
    tokens[:, ::2] = 16  # half the slots masked
    sampled, confidence = session["prior"].run(None, {
        "tokens": tokens, "class_labels": np.array([0, 1, 2, 3, 0], dtype=np.int32),
        "uniform": rng.random((5, 128), dtype=np.float32), "gumbel": rng.gumbel(size=(5, 128)).astype(np.float32),
        "temperature": np.full(5, 1.0, np.float32), "choice_scale": np.full(5, 2.0, np.float32)})
    assert (sampled[:, 1::2] == tokens[:, 1::2]).all() and np.isinf(confidence[:, 1::2]).all()
    assert (sampled[:, ::2] < 16).all() and np.isfinite(confidence[:, ::2]).all()


def _snapshot(directory):
    return {p.name: mf.sha256_file(p) for p in directory.iterdir()}


def test_a_failed_validation_leaves_the_previous_engine_dir_intact(ckpt, tmp_path, monkeypatch, make_engine_dir):
    out = tmp_path / "engines"
    out.mkdir()
    (out / "prior.onnx").write_bytes(b"the previous export")
    previous = make_engine_dir(out)
    previous.graphs = {"fp32": {"prior": previous.file_entry("prior.onnx")}}
    previous.write()
    before = _snapshot(out)
    monkeypatch.setitem(validation.TOLERANCE, "encoder_max_mismatches", -1)  # nothing can pass now
    with pytest.raises(ExportError, match=r"encoder\.onnx disagrees with PyTorch: mismatches = 0 > -1"):
        export_engine_dir(ckpt, out, log=lambda line: None)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["engines"]  # the temporary directory is gone


def test_an_export_removes_the_work_folder_a_killed_export_left(ckpt, tmp_path, monkeypatch):
    killed = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".engines.{int(killed.stdout)}-x1y2z3.tmp"
    stale.mkdir()
    (stale / "encoder.onnx").write_bytes(b"half written")
    monkeypatch.setitem(validation.TOLERANCE, "encoder_max_mismatches", -1)  # stop after the first graph
    with pytest.raises(ExportError):
        export_engine_dir(ckpt, tmp_path / "engines", log=lambda line: None)
    assert list(tmp_path.iterdir()) == []


def test_a_budget_below_one_image_is_refused_before_anything_is_written(ckpt, tmp_path):
    from movq_deploy.memory import MemoryBudgetError

    with pytest.raises(MemoryBudgetError, match=r"exporting \(encoder graph\) needs .* for one item, more than the "
                                                r"memory budget of 1 KB \(--memory-budget\)"):
        export_engine_dir(ckpt, tmp_path / "engines", log=lambda line: None, memory_budget="1K")
    assert list(tmp_path.iterdir()) == []
