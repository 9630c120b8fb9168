"""The CPU speed targets of benchmarks/latency.py, judged as ratios of rows measured in one run.

Each target is {"target", "value", "met", "detail"}; met is None where this run did not measure it (a backend or a
batch size missing), so a table can say "not measured" instead of guessing. `evaluate_targets` holds one model's
rows to the earlier issues' targets (ONNX Runtime against PyTorch eager, the int8 graphs); `cpu_path_targets` holds
the whole run to the CPU paths' (the package against every peer, bf16 and int8 against their GEMM rates, the
pipeline, the loop, "auto" never slower than ONNX Runtime fp32).
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


# ---- the CPU paths against their peers and their limits (one run, every model) ------------------------------

PEERS = (EAGER, COMPILE, "openvino-direct")  # what a user would run instead of the package
PAPER = "paper"  # the size whose targets these are (benchmarks/latency.py --config paper)


def cpu_path_targets(rows: list, batch_sizes: list) -> list:
    """The targets of the CPU paths, from every model's rows of one run: at paper size the package's fastest path
    against the fastest peer, bf16 and int8 against their GEMM rates, the pipeline against the bf16 reference
    sampler, the loop's overhead; for every model, "auto" never more than 5% slower than ONNX Runtime fp32."""
    timed = [row for row in rows if "p50_ms" in row]
    out = []
    if any(row["model"] == PAPER for row in timed):
        paper = [row for row in timed if row["model"] == PAPER]
        out += [_ahead_of_peers(paper, 16, 1.3), _ahead_of_peers(paper, 1, 1.2), _bf16_limit(paper),
                _int8_limit(paper), _pipeline(paper), _loop_overhead(paper)]
    for model in dict.fromkeys(row["model"] for row in rows):
        out.append(_never_slower([row for row in timed if row["model"] == model], model, batch_sizes))
    return out


def _target(name, value, met, detail="", unit=None) -> dict:
    return {"target": name, "value": value, "met": met, "detail": detail, **({"unit": unit} if unit else {})}


def _label(row) -> str:
    return f"{row['backend']} {row['precision']}"


def _fastest(rows: list, stage: str, batch: int, peers: bool) -> Optional[dict]:
    found = [r for r in rows if r["stage"] == stage and r["batch"] == batch and (r["backend"] in PEERS) == peers]
    return min(found, key=lambda r: r["p50_ms"]) if found else None


def _ahead_of_peers(rows: list, batch: int, minimum: float) -> dict:
    ours, theirs = _fastest(rows, "prior_step", batch, False), _fastest(rows, "prior_step", batch, True)
    name = f"paper prior step, batch {batch}: fastest package path >= {minimum:g}x the fastest peer"
    if not (ours and theirs):
        return _target(name, None, None)
    ratio = theirs["p50_ms"] / ours["p50_ms"]
    return _target(name, ratio, ratio >= minimum, f"{_label(ours)} {ours['p50_ms']:.0f} ms vs {_label(theirs)} "
                                                  f"{theirs['p50_ms']:.0f} ms")


def _limit_rows(rows: list, precision: str, min_batch: int) -> dict:
    """{batch: the package's prior-step row of `precision` closest to its GEMM rate} for batch >= min_batch."""
    best: dict = {}
    for row in rows:
        if row["stage"] == "prior_step" and row.get("compute") == precision and row["backend"] not in PEERS \
                and row["batch"] >= min_batch and row.get("gemm_fraction"):
            if row["batch"] not in best or row["gemm_fraction"] > best[row["batch"]]["gemm_fraction"]:
                best[row["batch"]] = row
    return best


def _bf16_limit(rows: list) -> dict:
    best = _limit_rows(rows, "bf16", 1)
    name = "paper bf16 prior step >= 80% of the bf16 GEMM rate"
    if not best:
        return _target(name, None, None)
    worst = min(r["gemm_fraction"] for r in best.values())
    return _target(name, worst, worst >= 0.80, ", ".join(f"batch {b}: {r['gemm_fraction']:.0%}"
                                                          for b, r in sorted(best.items())))


def _int8_limit(rows: list) -> dict:
    best = _limit_rows(rows, "int8", 8)
    name = "paper int8 prior step >= 65% of the int8 GEMM rate (batch >= 8)"
    if not best:
        return _target(name, None, None)
    worst = min(r["gemm_fraction"] for r in best.values())
    return _target(name, worst, worst >= 0.65, ", ".join(f"batch {b}: {r['gemm_fraction']:.0%} ({_label(r)})"
                                                          for b, r in sorted(best.items())))


def _pipeline(rows: list) -> dict:
    ours = _fastest(rows, "sample", 16, False)
    reference = next((r for r in rows if (r["backend"], r["precision"], r["stage"], r["batch"]) ==
                      (EAGER, "bf16", "sample", 16)), None)
    name = "paper Generator.sample(n=16) >= 1.3x the PyTorch reference sampler in bf16"
    if not (ours and reference):
        return _target(name, None, None)
    ratio = reference["p50_ms"] / ours["p50_ms"]
    return _target(name, ratio, ratio >= 1.3, f"{_label(ours)} {ours['p50_ms'] / 1e3:.1f} s vs "
                                              f"{reference['p50_ms'] / 1e3:.1f} s")


def _loop_overhead(rows: list) -> dict:
    generator = next((r for r in rows if (r["backend"], r["stage"]) == ("auto", "sample") and r["batch"] == 16
                      and "loop_overhead" in r), None)
    direct = next((r for r in rows if (r["backend"], r["stage"], r["batch"]) == ("openvino-direct", "sample", 16)),
                  None)
    name = "paper: the package's loop adds <= 3% to sample(n=16) (auto)"
    if generator is None:
        return _target(name, None, None)
    detail = f"{generator['loop_overhead']:.1%} of its time outside engine calls"
    if direct:
        detail += f"; {generator['p50_ms'] / direct['p50_ms']:.2f}x the time of OpenVINO called directly in bf16"
    overhead = generator["loop_overhead"]
    return _target(name, overhead, overhead <= 0.03, detail, unit="%")


def _never_slower(rows: list, model: str, batch_sizes: list) -> dict:
    """The worst ratio of "auto" to ONNX Runtime fp32 over every stage at batch 1 and 16."""
    def p50(backend, precision, stage, batch):
        return next((r["p50_ms"] for r in rows if (r["backend"], r["stage"], r["batch"]) == (backend, stage, batch)
                     and (precision is None or r["precision"] == precision)), None)

    ratios = {}
    for stage in ("prior_step", "decode", "encode", "sample"):
        for batch in (1, 16):
            ours, base = p50("auto", None, stage, batch), p50("onnxruntime-cpu", "fp32", stage, batch)
            if ours is not None and base is not None:
                ratios[(stage, batch)] = ours / base
    name = f"{model}: auto never > 5% slower than ONNX Runtime fp32 (every stage, batch 1 and 16)"
    if not ratios:
        return _target(name, None, None)
    (stage, batch), worst = max(ratios.items(), key=lambda item: item[1])
    return _target(name, worst, worst <= 1.05, f"worst: {stage} batch {batch} at {worst:.2f}x its time; "
                                               f"{len(ratios)} stage/batch pairs")
