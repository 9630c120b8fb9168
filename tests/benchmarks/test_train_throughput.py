"""The GPU training-throughput script's rehearsal: tiny models on the CPU, every model and mode, a table."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks import train_throughput  # noqa: E402


def test_rehearsal_runs_every_model_and_mode(tmp_path):
    # The "eager" compile backend keeps dynamo's trace and the fallback logic but skips code generation (the
    # aot_eager and inductor paths are covered in tests/training/test_mixed_precision.py and on the GPU).
    rows = train_throughput.main(["--rehearsal", "--compile-backend", "eager", "--warmup", "0", "--steps", "1",
                                  "--out", str(tmp_path)])
    assert [(r["model"], r["mode"]) for r in rows] == [(m, mode) for m in ("tokenizer", "prior")
                                                       for mode in train_throughput.MODES]
    for row in rows:
        assert row["batch"] == 4 and row["images_per_s"] > 0 and "error" not in row, row
    assert [r["compiled"] for r in rows if r["mode"] == "bf16+compile"] == [True, True]
    saved = json.loads((tmp_path / "train_throughput.json").read_text())
    assert saved["rows"] == rows and saved["args"]["device"] == "cpu"
    table = (tmp_path / "train_throughput.md").read_text()
    assert table.count("\n| tokenizer |") == 3 and "| prior | 1.1M | bf16+compile | 4 |" in table


def test_budget_skips_what_would_start_late(tmp_path):
    rows = train_throughput.main(["--models", "prior", "--prior-config", "tiny", "--tokenizer-config", "tiny",
                                  "--device", "cpu", "--budget-s", "0", "--modes", "fp32,bf16", "--min-batch", "2",
                                  "--max-batch", "2", "--warmup", "0", "--steps", "1", "--out", str(tmp_path)])
    assert rows[0]["mode"] == "fp32" and "images_per_s" in rows[0]  # the first always runs
    assert rows[1]["skipped"].startswith("past --budget-s")
