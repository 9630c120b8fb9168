"""export/to_onnx.py on a tiny random-weight model: files, manifest, clean graphs, validation, atomicity, errors."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from export import to_onnx
from movq_deploy import manifest as mf
from movq_deploy.models.checkpoint import save_checkpoint
from movq_deploy.models.movq import MoVQ, MoVQConfig
from movq_deploy.models.prior import MaskGITPrior, PriorConfig

CLASS_NAMES = ["cat", "dog", "fox"]


def _models(num_classes: int):
    torch.manual_seed(0)
    movq_config = MoVQConfig(image_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_groups=4,
                             latent_channels=8, num_chunks=2, codebook_size=16, modulation="first",
                             modulated_levels=1)
    h, w, c = movq_config.grid
    prior_config = PriorConfig(h=h, w=w, c=c, codebook_size=16, num_classes=num_classes, width=32, depth=1, heads=2,
                               mlp_dim=64, dropout=0.0, class_dropout=0.0)
    return MoVQ(movq_config).eval(), MaskGITPrior(prior_config).eval()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    movq, prior = _models(num_classes=len(CLASS_NAMES))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pt", tokenizer_config=movq.config.to_dict(),
                           tokenizer=movq.state_dict(), prior_config=prior.config.to_dict(), prior=prior.state_dict(),
                           class_names=CLASS_NAMES)


@pytest.fixture(scope="module")
def exported(ckpt):
    """One full export (fp32 + fp16 + int8) of the conditional tiny model; (engine_dir, manifest, log lines)."""
    lines = []
    out = ckpt.parent / "engines"
    manifest = to_onnx.export_engine_dir(ckpt, out, steps=6, fp16=True, int8=True, log=lines.append)
    return out, manifest, lines


def _graph_files(manifest):
    return [(precision, name, entry) for precision, graphs in manifest["graphs"].items()
            for name, entry in graphs.items()]


def test_engine_dir_holds_every_graph_and_a_verifiable_manifest(exported):
    out, manifest, _ = exported
    assert mf.load_manifest(out) == json.loads(json.dumps(manifest | {"format": mf.FORMAT,
                                                                       "format_version": mf.FORMAT_VERSION}))
    names = {entry["file"] for _, _, entry in _graph_files(manifest)}
    assert names == {"encoder.onnx", "decoder.onnx", "prior.onnx", "encoder.fp16.onnx", "decoder.fp16.onnx",
                     "prior.fp16.onnx", "prior.int8.onnx"}
    assert sorted(p.name for p in out.iterdir()) == sorted(names | {"manifest.json"})
    for _, _, entry in _graph_files(manifest):
        mf.verify_file(out, entry)
    assert manifest["grid"] == {"h": 8, "w": 8, "c": 2}
    assert manifest["codebook_size"] == manifest["mask_id"] == 16 and manifest["image_size"] == 16
    assert manifest["num_classes"] == 3 and manifest["class_names"] == CLASS_NAMES
    assert manifest["sampling"]["steps"] == 6 and len(manifest["sampling"]["remask_counts"]) == 6
    assert manifest["sampling"]["remask_counts"][-1] == 0
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_graphs_are_clean_with_a_dynamic_batch_and_typed_boundaries(exported):
    out, manifest, _ = exported
    expected = {
        "encoder": ({"image": ("uint8", ["batch", 16, 16, 3])}, {"indices": ("int32", ["batch", 8, 8, 2])}),
        "decoder": ({"indices": ("int32", ["batch", 8, 8, 2])}, {"image": ("uint8", ["batch", 16, 16, 3])}),
        "prior": ({"tokens": ("int32", ["batch", 128]), "class_labels": ("int32", ["batch"]),
                   "uniform": ("float32", ["batch", 128]), "gumbel": ("float32", ["batch", 128]),
                   "temperature": ("float32", [1]), "choice_scale": ("float32", [1])},
                  {"sampled": ("int32", ["batch", 128]), "confidence": ("float32", ["batch", 128])}),
    }
    for precision, name, entry in _graph_files(manifest):
        inputs, outputs = expected[name]
        assert {t["name"]: (t["dtype"], t["shape"]) for t in entry["inputs"]} == inputs
        assert {t["name"]: (t["dtype"], t["shape"]) for t in entry["outputs"]} == outputs
        if precision == "int8":
            continue  # com.microsoft quantized ops: checked by ONNX Runtime below, not by the ONNX schemas
        model = onnx.load(str(out / entry["file"]))
        onnx.checker.check_model(model, full_check=True)
        assert entry["opset"] == 18 and {o.domain or "ai.onnx": o.version for o in model.opset_import}["ai.onnx"] == 18
        assert len(model.graph.value_info) > 0  # shapes inferred and stored


def test_prior_graphs_hold_no_random_multinomial_or_dynamic_topk(exported):
    out, manifest, _ = exported
    for precision in ("fp32", "fp16", "int8"):
        model = onnx.load(str(out / manifest["graphs"][precision]["prior"]["file"]))
        ops = {node.op_type for node in model.graph.node}
        assert not ops & to_onnx.FORBIDDEN_OPS, precision
        assert "CumSum" in ops  # the in-graph inverse-CDF draw
        assert to_onnx.forbidden_ops(model) == []


def test_forbidden_op_scan_catches_random_ops_and_a_computed_topk_k():
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])
    k = onnx.helper.make_tensor_value_info("k", onnx.TensorProto.INT64, [1])
    nodes = [onnx.helper.make_node("RandomUniformLike", ["x"], ["noise"]),
             onnx.helper.make_node("TopK", ["noise", "k"], ["values", "indices"], name="topk")]
    outputs = [onnx.helper.make_tensor_value_info("values", onnx.TensorProto.FLOAT, None)]
    model = onnx.helper.make_model(onnx.helper.make_graph(nodes, "g", [x, k], outputs))
    assert to_onnx.forbidden_ops(model) == ["RandomUniformLike", "TopK(topk: K not constant)"]


def test_fp16_prior_keeps_the_sampling_head_in_fp32(exported):
    out, manifest, _ = exported
    model = onnx.load(str(out / manifest["graphs"]["fp16"]["prior"]["file"]))
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    head = to_onnx._downstream_nodes(model, {"temperature"})
    assert {n.op_type for n in model.graph.node if n.name in head} >= {"CumSum", "LogSoftmax"}
    head_tensors = [out for n in model.graph.node if n.name in head for out in n.output]
    assert not [t for t in head_tensors if types.get(t) == onnx.TensorProto.FLOAT16]
    # ... while the transformer body does run in fp16
    assert sum(t == onnx.TensorProto.FLOAT16 for t in types.values()) > 20


def test_validation_figures_are_recorded_and_within_tolerance(exported):
    _, manifest, lines = exported
    fp32 = manifest["validation"]["fp32"]
    assert fp32["decoder"]["max_pixel_error"] <= 1 and fp32["decoder"]["fraction_off"] <= 0.01
    assert fp32["encoder"]["mismatches"] == 0 and fp32["prior"]["token_mismatches"] == 0
    assert fp32["prior"]["max_confidence_error"] < 1e-3
    fp16, int8 = manifest["validation"]["fp16"], manifest["validation"]["int8"]
    assert fp16["decoder"]["max_pixel_error"] <= 8 and fp16["encoder"]["index_agreement"] > 0.9
    assert fp16["prior"]["top_token_agreement"] > 0.9 and 0.0 < int8["prior"]["top_token_agreement"] <= 1.0
    assert int8["prior"]["fusions"].get("SkipLayerNormalization", 0) > 0  # the BERT fusions applied
    assert manifest["validation"]["batch_sizes"] == [1, 3]
    table = "\n".join(lines)
    assert "| prior | fp32 | PyTorch |" in table and "| prior | int8 | fp32 ONNX |" in table
    assert sum(line.startswith(("encoder ", "decoder ", "prior ")) for line in lines) == 7  # progress per graph


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
        "temperature": np.array([1.0], np.float32), "choice_scale": np.array([2.0], np.float32)})
    assert (sampled[:, 1::2] == tokens[:, 1::2]).all() and np.isinf(confidence[:, 1::2]).all()
    assert (sampled[:, ::2] < 16).all() and np.isfinite(confidence[:, ::2]).all()


def _snapshot(directory):
    return {p.name: mf.sha256_file(p) for p in directory.iterdir()}


def test_a_failed_validation_leaves_the_previous_engine_dir_intact(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "engines"
    out.mkdir()
    (out / "prior.onnx").write_bytes(b"the previous export")
    mf.write_manifest(out, {"graphs": {"fp32": {"prior": mf.file_entry(out, "prior.onnx")}}})
    before = _snapshot(out)
    monkeypatch.setitem(to_onnx.TOLERANCE, "encoder_max_mismatches", -1)  # nothing can pass now
    with pytest.raises(to_onnx.ExportError, match=r"encoder\.onnx disagrees with PyTorch: mismatches = 0 > -1"):
        to_onnx.export_engine_dir(ckpt, out, log=lambda line: None)
    assert _snapshot(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["engines"]  # the temporary directory is gone


def test_replacing_an_engine_dir_swaps_it_whole(tmp_path):
    out, new = tmp_path / "engines", tmp_path / "new"
    out.mkdir()
    (out / "prior.fp16.plan").write_bytes(b"stale")
    new.mkdir()
    (new / "manifest.json").write_text("{}")
    to_onnx._replace_dir(new, out)
    assert [p.name for p in out.iterdir()] == ["manifest.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["engines"]


def test_torchscript_exporter_at_opset_17_for_an_unconditional_prior(tmp_path):
    movq, prior = _models(num_classes=0)
    spec = to_onnx.graph_specs(movq, prior)["prior"]
    assert spec.input_names == ["tokens", "uniform", "gumbel", "temperature", "choice_scale"]
    path = tmp_path / "prior.onnx"
    assert to_onnx.export_graph(spec, path, opset=17, exporter="auto") == "torchscript"
    model = to_onnx.finalize_graph(spec, path, 17, to_onnx.io_shapes(spec))
    assert [d.dim_param or d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == ["batch", 128]
    errors = to_onnx.validate_fp32(spec, path)
    assert errors["token_mismatches"] == 0 and errors["max_confidence_error"] < 1e-3


def _cli(capsys, *argv):
    code = to_onnx.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_bad_inputs_give_one_line_and_a_nonzero_exit(ckpt, tmp_path, capsys):
    code, err = _cli(capsys, tmp_path / "missing.pt", "--out", tmp_path / "e")
    assert code == 1 and "missing.pt does not exist" in err and "\n" not in err

    foreign = tmp_path / "notes.pt"
    foreign.write_text("hello")
    code, err = _cli(capsys, foreign, "--out", tmp_path / "e")
    assert code == 1 and "notes.pt" in err and "\n" not in err

    movq, _ = _models(num_classes=0)
    stage1 = save_checkpoint(tmp_path / "stage1.pt", tokenizer_config=movq.config.to_dict(),
                             tokenizer=movq.state_dict())
    code, err = _cli(capsys, stage1, "--out", tmp_path / "e")
    assert code == 1 and "holds no prior" in err and "\n" not in err

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    code, err = _cli(capsys, ckpt, "--out", precious)
    assert code == 1 and "refusing to replace" in err and (precious / "thesis.tex").exists()
    assert not (tmp_path / "e").exists()


def test_reexport_keeps_only_tensorrt_engines_of_unchanged_graphs(tmp_path):
    old, work = tmp_path / "engines", tmp_path / "work"
    old.mkdir()
    work.mkdir()
    for name in ("prior.fp16.plan", "decoder.fp16.plan", to_onnx.TIMING_CACHE_NAME):
        (old / name).write_bytes(name.encode())
    engines = {"fp16": {"prior": {"file": "prior.fp16.plan", "onnx_sha256": "same"},
                        "decoder": {"file": "decoder.fp16.plan", "onnx_sha256": "old"}}}
    mf.write_manifest(old, {"engines": engines})
    graphs = {"fp16": {"prior": {"sha256": "same"}, "decoder": {"sha256": "new"}}}
    kept = to_onnx.carry_over_engines(old, work, graphs)
    assert kept == {"fp16": {"prior": engines["fp16"]["prior"]}}
    assert sorted(p.name for p in work.iterdir()) == ["prior.fp16.plan", to_onnx.TIMING_CACHE_NAME]
    assert to_onnx.carry_over_engines(tmp_path / "nothing", work, graphs) == {}


def test_a_known_slot_losing_its_infinite_confidence_fails_validation():
    feeds = {"tokens": np.array([[16, 3]], dtype=np.int32)}
    reference = [np.array([[5, 3]], np.int32), np.array([[-1.0, np.inf]], np.float32)]
    sabotaged = [np.array([[5, 3]], np.int32), np.array([[-1.0, 0.0]], np.float32)]
    errors = to_onnx._worst([to_onnx.compare("prior", reference, reference, feeds),
                             to_onnx.compare("prior", reference, sabotaged, feeds)])
    assert errors["token_mismatches"] == 0 and errors["max_confidence_error"] != errors["max_confidence_error"]
    assert to_onnx._tolerance_failures("prior", errors) == ["max_confidence_error = nan > 0.001"]
