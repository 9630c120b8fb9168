"""The int8 limit: this CPU's int8 GEMM rate beside its fp32 rate, and how close the int8 prior step comes to it.

    python benchmarks/studies/int8_gemm.py [--configs tiny,paper] [--batch-sizes 1,16,64] [--budget-s 1] [--out results/]

The int8 rate is ONNX Runtime's own int8 GEMM (MLAS QGEMM, u8 activations x s8 weights, VNNI where the CPU has
it): a one-node MatMulInteger graph of size 1024^3 whose weight is a constant (prepacked, as a model's weights
are), with the intra-op threads the backends use. The fp32 rates beside it are the ones benchmarks/latency.py
measures (numpy, torch and MLAS MatMul), plus the same one-node MatMul with a constant weight. Each rate is the
best of the readings taken before and after the model timings.

The prior step is exported from freshly initialized models of each --configs size (speed does not depend on the
weights) and quantized as `export/to_onnx.py --int8` does (per-channel int8 weights, fixed activation scales). Its dense FLOPs
(benchmarks/flops.py, analytic) over its p50 time, as a fraction of the int8 GEMM rate, is the figure of merit:
the attention products, the norms and the sampling tail stay fp32 in that graph, so 100% is out of reach.
Writes int8_gemm.json and int8_gemm.md to --out.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from benchmarks.flops import prior_step_flops  # noqa: E402
from benchmarks.machine import gemm_rate, load_average, machine_info, mlas_int8_gemm, one_node_session  # noqa: E402
from benchmarks.report import write_report  # noqa: E402
from benchmarks.timing import summarize, time_calls  # noqa: E402

CONFIGS = {"tiny": ("tiny", "tiny"), "paper": ("paper-f16", "paper")}  # --configs -> (MoVQ preset, prior preset)
TARGET_FRACTION, TARGET_MIN_BATCH = 0.60, 8  # int8 prior step >= 60% of the int8 GEMM rate at paper size, batch >= 8


def int8_gemm_rate(threads: int, budget_s: float = 1.0, size: int = 1024) -> dict:
    """GOP/s (2 ops per multiply-add) of MLAS's u8s8 GEMM and, for the same shape and threads, its fp32 GEMM, both
    with a constant (prepacked) right-hand side."""
    rng = np.random.default_rng(0)
    ops = 2.0 * size**3
    a32 = rng.standard_normal((size, size), dtype=np.float32)
    b32 = rng.standard_normal((size, size), dtype=np.float32)

    def rate(fn):
        times = time_calls(fn, budget_s / 2, warmup=2, min_repeats=3, max_repeats=200)
        return round(ops / float(np.median(times)) / 1e9, 1)

    return {"size": size, "threads": threads,
            "onnxruntime_u8s8_gops": rate(mlas_int8_gemm(size, threads)),
            "onnxruntime_fp32_const_gflops": rate(one_node_session("MatMul", a32, b32, threads))}


def export_int8_prior(config: str, workdir: Path) -> "tuple[Path, object]":
    """prior.int8.onnx of a freshly initialized `config` prior (as export/to_onnx.py --int8 writes it) and the
    prior's config."""
    import torch

    from movq_deploy.export.memory import GraphMemory
    from movq_deploy.export.onnx_graph import export_graph, finalize_graph
    from movq_deploy.export.precision import quantize_int8
    from movq_deploy.export.specs import graph_specs, io_shapes
    from movq_deploy.models.movq import MoVQ, MoVQConfig
    from movq_deploy.models.prior import MaskGITPrior, PriorConfig

    tokenizer_preset, prior_preset = CONFIGS[config]
    torch.manual_seed(0)
    movq_config = MoVQConfig.preset(tokenizer_preset)
    prior = MaskGITPrior(PriorConfig.preset(prior_preset, movq_config)).eval()
    spec = graph_specs(MoVQ(movq_config).eval(), prior)["prior"]
    fp32_path, int8_path = workdir / f"{config}.prior.onnx", workdir / f"{config}.prior.int8.onnx"
    export_graph(spec, fp32_path)
    finalize_graph(spec, fp32_path, io_shapes(spec))
    scratch = workdir / f"{config}.scratch"
    scratch.mkdir()
    # Random weights: calibrate on the validation's random states (speed does not depend on the scales).
    batch = GraphMemory.measure({"prior": spec}).rows("prior", "calibrating", every_tensor=True, most=16)
    quantize_int8(spec, fp32_path, int8_path, scratch, spec.make_inputs(32, np.random.default_rng(0)), batch)
    return int8_path, prior.config


def prior_feeds(prior_config, batch: int) -> dict:
    """The first sampling step (every slot masked; every step costs the same)."""
    from movq_deploy import contract

    rng = np.random.default_rng(batch)
    n = prior_config.num_slots
    labels = np.full(batch, prior_config.num_classes, np.int32) if prior_config.conditional else None
    return contract.prior_step_feeds(np.full((batch, n), prior_config.mask_id, np.int32), labels,
                                     rng.random((batch, n), dtype=np.float32), rng.gumbel(size=(batch, n)),
                                     temperature=1.0, choice_scale=3.9)


def time_prior(path: Path, prior_config, batch_sizes, budget_s: float, threads: int) -> list:
    from movq_deploy.backends.onnxruntime import OnnxRuntimeRunner

    runner = OnnxRuntimeRunner(path, threads=threads)
    rows = []
    for batch in batch_sizes:
        feeds = prior_feeds(prior_config, batch)
        stats = summarize(time_calls(lambda: runner.run(feeds), budget_s, warmup=1, min_repeats=3), batch)
        flops = float(prior_step_flops(prior_config, batch)["total"])
        rows.append({"batch": batch, **stats, "flops": flops, "gops_per_s": flops / (stats["p50_ms"] / 1e3) / 1e9})
    return rows


def report_lines(command: str, rates: dict, rows: dict, loads) -> "list[str]":
    best = rates["best"]
    ratio = best["onnxruntime_u8s8_gops"] / best["onnxruntime_fp32_const_gflops"]
    lines = ["## The int8 limit (int8 GEMM rate, int8 prior step)", "", f"`{command}`", "",
             f"{rates['threads']} threads; load average (1 min) {loads[0]} at start, {loads[1]} at end.", "",
             "| GEMM 1024^3 | rate (best reading) |", "|---|---:|",
             f"| ONNX Runtime MLAS u8s8 (MatMulInteger, constant B) | {best['onnxruntime_u8s8_gops']:.0f} GOP/s |",
             f"| ONNX Runtime MLAS fp32 (MatMul, constant B) | {best['onnxruntime_fp32_const_gflops']:.0f} GFLOP/s |",
             f"| fp32 as latency.py measures it (best of numpy, torch, MLAS) | {best['cpu_fp32_gflops']:.0f} GFLOP/s |",
             f"| int8 / fp32 (MLAS, constant B) | {ratio:.2f}x |",
             "", "| config | batch | int8 prior step p50 ms | GOP/s | % of int8 GEMM rate |",
             "|---|---:|---:|---:|---:|"]
    for config, config_rows in rows.items():
        for row in config_rows:
            lines.append(f"| {config} | {row['batch']} | {row['p50_ms']:.2f} | {row['gops_per_s']:.0f} | "
                         f"{row['int8_gemm_fraction']:.0%} |")
    paper = [r for r in rows.get("paper", []) if r["batch"] >= TARGET_MIN_BATCH]
    if paper:
        worst = min(r["int8_gemm_fraction"] for r in paper)
        lines += ["", f"Target: int8 prior step >= {TARGET_FRACTION:.0%} of the int8 GEMM rate at paper size, batch >= "
                      f"{TARGET_MIN_BATCH}: {worst:.0%} ({'met' if worst >= TARGET_FRACTION else '**missed**'})."]
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,paper", help="comma-separated of tiny, paper (default both)")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--budget-s", type=float, default=1.0, help="timed seconds per measurement (default 1)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (default: the backends' default)")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    if not configs or any(c not in CONFIGS for c in configs):
        parser.error(f"--configs must name some of {', '.join(CONFIGS)}, got {args.configs!r}")
    try:
        batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated positive ints, got {args.batch_sizes!r}")
    if batch_sizes[0] <= 0 or args.budget_s <= 0:
        parser.error("--batch-sizes and --budget-s must be positive")

    from movq_deploy.backends.onnxruntime import physical_cores

    threads = args.threads or physical_cores()
    started, machine = time.time(), machine_info()
    readings = [{**int8_gemm_rate(threads, args.budget_s), **gemm_rate(threads, args.budget_s)}]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="movq-int8-gemm-") as workdir:
        for config in configs:
            print(f"exporting and quantizing a fresh {config} prior ...", flush=True)
            path, prior_config = export_int8_prior(config, Path(workdir))
            rows[config] = time_prior(path, prior_config, batch_sizes, args.budget_s, threads)
    readings.append({**int8_gemm_rate(threads, args.budget_s), **gemm_rate(threads, args.budget_s)})
    keys = ("onnxruntime_u8s8_gops", "onnxruntime_fp32_const_gflops", "cpu_fp32_gflops")
    best = {key: max(r[key] for r in readings) for key in keys}
    for config_rows in rows.values():
        for row in config_rows:
            row["int8_gemm_fraction"] = row["gops_per_s"] / best["onnxruntime_u8s8_gops"]
    command = " ".join(["python benchmarks/studies/int8_gemm.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    machine["load_average_at_end"] = load_average()
    loads = [(machine[k] or ["-"])[0] for k in ("load_average_at_start", "load_average_at_end")]
    rates = {"threads": threads, "best": best, "readings": readings}
    report = {"command": command, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "duration_s": round(time.time() - started, 1), "machine": machine, "rates": rates, "prior_steps": rows}
    text = "\n".join(report_lines(command, rates, rows, loads)) + "\n"
    return write_report(args.out, "int8_gemm", report, text)


if __name__ == "__main__":
    main()
