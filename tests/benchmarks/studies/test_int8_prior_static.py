"""benchmarks/studies/int8_prior_static.py on the tiny conditional export: every variant measured, the report written."""
from __future__ import annotations

import json

import pytest

from benchmarks.studies import int8_prior_static


def test_variants_are_measured_and_reported(tiny_engines, tmp_path):
    report = int8_prior_static.main(["--engine-dir", str(tiny_engines.engine_dir), "--calibration-images", "4",
                                     "--methods", "minmax", "--batch-sizes", "1,2", "--rounds", "1",
                                     "--budget-s", "0.01", "--out", str(tmp_path)])
    for graph in ("prior", "prior_guided"):
        variants = report["results"][graph]["variants"]
        assert list(variants) == ["fp32", "dynamic", "static (export)", "QDQ minmax uint8"]
        for name, row in variants.items():
            assert set(row["step_ms"]) == {1, 2} and min(row["step_ms"].values()) > 0
            assert name == "fp32" or 0.0 < row["top_token_agreement"] <= 1.0
        for name in ("fp32", "static (export)", "QDQ minmax uint8"):  # fixed scales: rows alone = rows together
            assert variants[name]["independence"] == {"rows": 8, "sampled_identical": 8, "confidence_identical": 8}
    assert json.loads((tmp_path / "int8_prior_static.json").read_text())["results"]["prior"]["states"]["held_out"] > 0
    assert "| prior_guided | static (export) |" in (tmp_path / "int8_prior_static.md").read_text()


def test_bad_lists_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        int8_prior_static.main(["--methods", "kmeans", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        int8_prior_static.main(["--config", "paper", "--ckpt", "x.pt", "--out", str(tmp_path)])
