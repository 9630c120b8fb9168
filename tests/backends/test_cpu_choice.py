"""The CPU choice: which path each graph takes under backend="auto" and why, and the one-line refusals.

The rule's inputs are the manifest (validation figures, FLOPs per image) and two facts about the machine (openvino
installed, native bf16 / int8). Tests of the rule alone set those facts; every test that opens runners runs them
on this machine as they are.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from movq_deploy.backends import cpu_choice, cpu_features, open_runners
from movq_deploy.backends.cpu_choice import Placement
from movq_deploy.generator import Generator
from movq_deploy.manifest import EngineDir

GRAPHS = ("encoder", "decoder", "prior")
PASSING = {"encoder": {"index_agreement": 0.995}, "decoder": {"psnr_db": 45.0},
           "prior": {"held_out_top_token_agreement": 0.996}}


@pytest.fixture
def machine(monkeypatch):
    """Sets what the rule is told about the machine: machine(openvino=..., bf16=..., int8=...)."""
    def set_facts(openvino=True, bf16=True, int8=True):
        monkeypatch.setattr(cpu_choice, "openvino_installed", lambda: openvino)
        monkeypatch.setattr(cpu_features, "native_bf16", lambda: bf16)
        monkeypatch.setattr(cpu_features, "native_int8", lambda: int8)
    return set_facts


def _manifest(make_engine_dir, tmp_path, gflop=50.0, bf16=PASSING, int8_openvino=()):
    graphs = {"fp32": {name: {"file": f"{name}.onnx", "sha256": "0", "flops_per_image": gflop * 1e9}
                       for name in GRAPHS},
              "int8": {name: {"file": f"{name}.int8.onnx", "sha256": "0"} for name in GRAPHS}}
    if int8_openvino:
        graphs["int8-openvino"] = {name: {"file": f"{name}.xml", "sha256": "0"} for name in int8_openvino}
    return make_engine_dir(tmp_path / "engines", graphs=graphs, validation={"bf16": bf16} if bf16 else {})


def test_large_validated_graphs_go_to_openvino_bf16(make_engine_dir, tmp_path, machine):
    machine()
    placement, why = cpu_choice.auto_placement(_manifest(make_engine_dir, tmp_path), "auto")
    assert placement == {name: Placement("openvino", "bf16") for name in GRAPHS}
    assert why == "openvino bf16: encoder, decoder, prior"


def test_small_graphs_stay_on_onnxruntime_with_their_size_in_the_reason(make_engine_dir, tmp_path, machine):
    machine()
    placement, why = cpu_choice.auto_placement(_manifest(make_engine_dir, tmp_path, gflop=0.05), "auto")
    assert set(placement.values()) == {Placement("onnxruntime-cpu", "fp32")}
    assert "prior (0.05 GFLOP per image, below 1)" in why


def test_a_graph_below_its_bf16_figure_alone_stays_fp32(make_engine_dir, tmp_path, machine):
    machine()
    figures = {**PASSING, "encoder": {"index_agreement": 0.98}}
    placement, why = cpu_choice.auto_placement(_manifest(make_engine_dir, tmp_path, bf16=figures), "auto")
    assert placement["encoder"] == Placement("onnxruntime-cpu", "fp32")
    assert placement["prior"] == placement["decoder"] == Placement("openvino", "bf16")
    assert "bf16 index_agreement 0.98 is below 0.99" in why
    assert cpu_choice.describe(placement) == ("onnxruntime-cpu+openvino", "fp32+bf16")


@pytest.mark.parametrize("facts, bf16, words", [
    ({"openvino": False}, PASSING, "openvino is not installed (pip install 'movq-deploy[openvino]')"),
    ({"bf16": False}, PASSING, "this CPU has no native bf16"),
    ({}, None, "holds no bf16 validation of the prior graph"),
])
def test_auto_falls_back_to_onnxruntime_fp32_and_says_why(make_engine_dir, tmp_path, machine, facts, bf16, words):
    machine(**facts)
    placement, why = cpu_choice.auto_placement(_manifest(make_engine_dir, tmp_path, bf16=bf16), "auto")
    assert set(placement.values()) == {Placement("onnxruntime-cpu", "fp32")}
    assert words in why


def test_int8_takes_openvino_where_quantized_and_bf16_where_int8_did_not_pay(make_engine_dir, tmp_path, machine):
    machine()
    engine_dir = _manifest(make_engine_dir, tmp_path, int8_openvino=("prior", "decoder"))
    placement, why = cpu_choice.auto_placement(engine_dir, "int8")
    assert placement == {"encoder": Placement("openvino", "bf16"), "decoder": Placement("openvino", "int8"),
                         "prior": Placement("openvino", "int8")}
    assert "int8 did not pay over bf16" in why
    machine(int8=False)
    placement, why = cpu_choice.auto_placement(engine_dir, "int8")
    assert placement["prior"] == placement["decoder"] == Placement("onnxruntime-cpu", "int8")
    assert "this CPU has no int8 dot products" in why
    machine(openvino=False)
    placement, why = cpu_choice.auto_placement(engine_dir, "int8")
    assert set(placement.values()) == {Placement("onnxruntime-cpu", "int8")}


def test_fp32_asked_for_is_onnxruntime(make_engine_dir, tmp_path, machine):
    machine()
    placement, _ = cpu_choice.auto_placement(_manifest(make_engine_dir, tmp_path), "fp32")
    assert set(placement.values()) == {Placement("onnxruntime-cpu", "fp32")}


def test_openvino_by_name_refuses_in_one_line(make_engine_dir, tmp_path, machine):
    engine_dir = _manifest(make_engine_dir, tmp_path, bf16=None)
    machine()
    with pytest.raises(RuntimeError, match="bf16 is not usable for the encoder graph here: .* holds no bf16 valid"):
        cpu_choice.openvino_placement(engine_dir, "bf16")
    assert set(cpu_choice.openvino_placement(engine_dir, "auto").values()) == {Placement("openvino", "fp32")}
    with pytest.raises(RuntimeError, match="OpenVINO int8 is not usable here: .* has no OpenVINO int8 graphs"):
        cpu_choice.openvino_placement(engine_dir, "int8")
    with pytest.raises(ValueError, match="OpenVINO runs precision fp32, bf16 or int8 on the CPU, not 'fp16'"):
        cpu_choice.openvino_placement(engine_dir, "fp16")
    machine(bf16=False)
    with pytest.raises(RuntimeError, match="this CPU has no native bf16"):
        cpu_choice.openvino_placement(_manifest(make_engine_dir, tmp_path), "bf16")
    machine(openvino=False)
    with pytest.raises(ImportError, match=r"openvino is not installed; install it with `pip install 'movq-deploy"):
        cpu_choice.openvino_placement(engine_dir, "fp32")


def test_onnxruntime_has_no_bf16(tiny_engines):
    with pytest.raises(ValueError, match="backend 'onnxruntime-cpu' has no bf16"):
        open_runners(EngineDir.load(tiny_engines.engine_dir), backend="onnxruntime-cpu", precision="bf16")


# ---- on this machine, with real runners --------------------------------------------------------------------

needs_openvino_bf16 = pytest.mark.skipif(
    not (cpu_choice.openvino_installed() and cpu_features.native_bf16()),
    reason="needs openvino and a CPU with native bf16 (AVX-512 BF16 or AMX)")


@needs_openvino_bf16
def test_auto_opens_openvino_bf16_for_graphs_the_manifest_calls_large(tiny_engines, tmp_path):
    """The tiny graphs are below the size rule; the same directory with its decoder's FLOPs said to be large puts
    the decoder (alone: its bf16 PSNR passes, 47 dB) on OpenVINO bf16, and images follow the per-graph placement
    whatever the batch and the chunking."""
    engine_dir = tmp_path / "engines"
    shutil.copytree(tiny_engines.engine_dir, engine_dir)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    manifest["graphs"]["fp32"]["decoder"]["flops_per_image"] = 5e9
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    generator = Generator(engine_dir)
    assert generator.placement["decoder"] == Placement("openvino", "bf16")
    assert generator.placement["prior"] == Placement("onnxruntime-cpu", "fp32")
    assert generator.backend_name == "onnxruntime-cpu+openvino" and "decoder" in generator.backend_reason
    together = generator.sample(n=6, seed=4, output_type="np")
    chunked = Generator(engine_dir, batch_size=2).sample(n=6, seed=4, output_type="np")
    np.testing.assert_array_equal(together, chunked)


def test_bf16_asked_for_runs_a_graph_below_its_figure_and_warns(make_engine_dir, tmp_path, machine, caplog):
    machine()
    figures = {**PASSING, "encoder": {"index_agreement": 0.97}}
    with caplog.at_level("WARNING", logger="movq_deploy"):
        placement = cpu_choice.openvino_placement(_manifest(make_engine_dir, tmp_path, bf16=figures), "bf16")
    assert set(placement.values()) == {Placement("openvino", "bf16")}
    assert "the encoder graph runs in bf16 as asked, but its bf16 index_agreement 0.97 is below 0.99" in caplog.text
    auto = cpu_choice.openvino_placement(_manifest(make_engine_dir, tmp_path, bf16=figures), "auto")
    assert auto["encoder"] == Placement("openvino", "fp32") and auto["prior"] == Placement("openvino", "bf16")
