"""benchmarks/studies/bf16_ends.py and openvino_int8.py on the tiny conditional export: every variant measured
against fp32 on held-out data, the reports written."""
from __future__ import annotations

import json

import pytest

from movq_deploy.backends import cpu_features

pytest.importorskip("nncf", reason="nncf is not installed (the train extra)")
pytestmark = pytest.mark.skipif(not (cpu_features.native_bf16() and cpu_features.native_int8()),
                                reason=f"needs native bf16 and int8 ({cpu_features.describe()})")


def test_bf16_ends_measures_every_cut(tiny_engines, tmp_path):
    from benchmarks.studies import bf16_ends

    report = bf16_ends.main(["--engine-dir", str(tiny_engines.engine_dir), "--out", str(tmp_path)])
    prior, encoder = report["results"]["prior"], report["results"]["encoder"]
    assert prior["all bf16"]["parts"] == ["bf16"] and prior["sampling head fp32"]["parts"] == ["bf16", "f32"]
    for figures in prior.values():
        assert 0.0 < figures["held_out_top_token_agreement"] <= 1.0 and 0.0 < figures["held_out_sampled_agreement"]
    assert all(0.0 < figures["index_agreement"] <= 1.0 for figures in encoder.values())
    assert all(figures["psnr_db"] > 0 for figures in report["results"]["decoder"].values())
    table = (tmp_path / "bf16_ends.md").read_text()
    assert "| encoder | package: last 2 convolutions + search fp32 | bf16 + f32 |" in table


def test_openvino_int8_times_and_compares_each_variant(tiny_engines, tmp_path):
    from benchmarks.studies import openvino_int8

    report = openvino_int8.main(["--engine-dir", str(tiny_engines.engine_dir), "--graphs", "prior,encoder",
                                 "--batch-sizes", "1,2", "--budget-s", "0.01", "--out", str(tmp_path)])
    for graph in ("prior", "encoder"):
        results = report["graphs"][graph]
        assert set(results["p50_ms"]) == {"bf16", "int8 nncf", "int8 qdq", "ort int8"}
        assert all(min(times.values()) > 0 for times in results["p50_ms"].values())
    assert all(0.0 < f["held_out_top_token_agreement"] <= 1.0 for f in report["graphs"]["prior"]["agreement"].values())
    assert json.loads((tmp_path / "openvino_int8.json").read_text())["batch_sizes"] == [1, 2]
