"""The CPU speed targets of benchmarks/latency.py, judged as ratios of rows measured in one run.

Each target is {"target", "value", "met", "detail"}; met is None where this run did not measure it (a backend or a
batch size missing), so a table can say "not measured" instead of guessing.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `benchmarks` importable
from benchmarks.torch_peers import COMPILE, EAGER  # noqa: E402


def evaluate_targets(rows: list, int8_agreement: Optional[float], batch_sizes: list,
                     int8_validation: Optional[dict] = None) -> list:
    """The CPU speed targets as ratios measured in this run: [{"target", "value", "met"}] (met None = not measured).
    `int8_validation`: the manifest's int8 agreement figures, measured at export on held-out data."""
    def find(backend, precision, stage, batch):
        for row in rows:
            if (row["backend"], row["precision"], row["stage"], row["batch"]) == (backend, precision, stage, batch):
                return row if "p50_ms" in row else None
        return None

    def target(name, value, met, detail=""):
        return {"target": name, "value": value, "met": met, "detail": detail}

    ort = "onnxruntime-cpu"
    out = []
    row = find(ort, "fp32", "prior_step", 1)
    speedup = row.get("speedup_vs_eager") if row else None
    out.append(target("prior step fp32 ORT >= 1.3x PyTorch eager (batch 1)", speedup,
                      None if speedup is None else speedup >= 1.3))
    fractions = {b: find(ort, "fp32", "prior_step", b) for b in batch_sizes if b >= 8}
    fractions = {b: r["gemm_fraction"] for b, r in fractions.items() if r}
    out.append(target("prior step fp32 ORT >= 85% of GEMM rate (batch >= 8)",
                      min(fractions.values()) if fractions else None,
                      all(f >= 0.85 for f in fractions.values()) if fractions else None,
                      ", ".join(f"batch {b}: {f:.0%}" for b, f in fractions.items())))
    int8 = {b: find(ort, "int8", "prior_step", b) for b in batch_sizes}
    int8 = {b: r["speedup_vs_eager"] for b, r in int8.items() if r and "speedup_vs_eager" in r}
    out.append(target("int8 prior step >= 2.5x PyTorch eager fp32", min(int8.values()) if int8 else None,
                      all(s >= 2.5 for s in int8.values()) if int8 else None,
                      ", ".join(f"batch {b}: {s:.2f}x" for b, s in int8.items())))
    out.append(target("int8 prior top-token agreement >= 95%", int8_agreement,
                      None if int8_agreement is None else int8_agreement >= 0.95))
    out += int8_image_targets(find(ort, "fp32", "decode", 16), find(ort, "int8", "decode", 16), int8_validation or {})
    generator = find(ort, "fp32", "sample", 64)
    overhead = generator.get("loop_overhead") if generator else None
    out.append(target("loop overhead <= 3% of sample(n=64)", overhead, None if overhead is None else overhead <= 0.03))
    reference, compiled = find(EAGER, "fp32", "sample", 64), find(COMPILE, "fp32", "sample", 64)
    ratio = generator["images_per_s"] / reference["images_per_s"] if generator and reference else None
    out.append(target("Generator.sample(n=64) >= 1.5x reference sampler images/s", ratio,
                      None if ratio is None else ratio >= 1.5))
    ratio = generator["images_per_s"] / compiled["images_per_s"] if generator and compiled else None
    out.append(target("Generator.sample(n=64) not slower than torch.compile", ratio,
                      None if ratio is None else ratio >= 1.0))
    return out


def int8_image_targets(fp32_decode: Optional[dict], int8_decode: Optional[dict], validation: dict) -> list:
    """The int8 image graphs' targets: decode speed at batch 16 (this run), decoded PSNR and encoder index
    agreement against the fp32 graphs (the manifest's, measured at export on held-out data)."""
    speedup = fp32_decode["p50_ms"] / int8_decode["p50_ms"] if fp32_decode and int8_decode else None
    psnr = validation.get("decoder", {}).get("psnr_db")
    agreement = validation.get("encoder", {}).get("index_agreement")
    return [
        {"target": "int8 decode >= 1.8x fp32 ORT (batch 16)", "value": speedup,
         "met": None if speedup is None else speedup >= 1.8, "detail": ""},
        {"target": "int8 decoded PSNR vs fp32 >= 35 dB (held-out grids)", "value": psnr,
         "met": None if psnr is None else psnr >= 35.0, "detail": "", "unit": "dB"},
        {"target": "int8 encoder index agreement >= 97%", "value": agreement,
         "met": None if agreement is None else agreement >= 0.97, "detail": ""},
    ]
