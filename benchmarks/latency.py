"""Latency of every stage on every backend this machine has, side by side with PyTorch.

    python benchmarks/latency.py [--engine-dir engines/] [--ckpt PATH] [--batch-sizes 1,16,64] [--steps 8]
                                 [--out results/] [--budget-s S] [--config tiny|paper] [--quick]

For each backend available (TensorRT, ONNX Runtime CUDA, ONNX Runtime CPU; each precision the engine directory
holds) and the PyTorch peers a user would otherwise pick (eager, torch.compile; same weights, same threads), at
each batch size: one prior step, decode, encode, and a whole `sample` (all steps + decode). Each is warmed up, then
repeated until a time budget; p50/p90/p99, images/s and the speed-up over PyTorch eager in the same run.

Against the physical limit: the dense FLOPs of each stage (prior analytic from its config, tokenizer counted from
the torch module) and the achieved rate as a fraction of this machine's GEMM rate, measured in the same run.
The loop's own overhead: the share of `Generator.sample` time spent outside engine calls.

Writes a Markdown table to stdout and latency.json (results, machine, library versions), latency.md and
latency.png (latency against batch per backend) to --out. `--config tiny|paper` times freshly initialized models
of that size instead of --engine-dir (exported to a temporary engine directory first); --quick is the short run
`make demo` ends with (batch 1 and 16, short budget, no torch.compile).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from movq_deploy.files import atomic_write_text
from movq_deploy.generator import Generator
from movq_deploy.manifest import EngineDir
from movq_deploy.models.reference import ReferenceSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `benchmarks` importable
from benchmarks.flops import counted_flops, prior_step_flops  # noqa: E402
from benchmarks.latency_report import STAGES, plot, report_markdown, title_of  # noqa: E402
from benchmarks.machine import gemm_rate, load_average, machine_info  # noqa: E402
from benchmarks.subject import (  # noqa: E402
    CONFIGS, DEFAULT_ENGINE_DIRS, agreement_feeds, graph_of, load_subject, stage_feeds,
)
from benchmarks.timing import CallTimer, summarize, time_calls  # noqa: E402
from benchmarks.latency_targets import evaluate_targets  # noqa: E402
from benchmarks.torch_peers import EAGER, TorchPeer, loop_sample  # noqa: E402

PRECISION_ORDER = ("fp32", "fp16", "int8")
# A stage whose predicted single call (its FLOPs at this fraction of the GEMM rate) exceeds --max-call-s is skipped.
PREDICTION_EFFICIENCY = 0.5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine-dir",
                        help=f"engine directory (default: the first of {', '.join(DEFAULT_ENGINE_DIRS)})")
    parser.add_argument("--ckpt", help="weights for the PyTorch peers (default: the checkpoint the manifest names)")
    parser.add_argument("--config", choices=sorted(CONFIGS),
                        help="time freshly initialized models of this size instead of --engine-dir")
    parser.add_argument("--batch-sizes", help="comma-separated (default 1,16,64; --quick 1,16)")
    parser.add_argument("--steps", type=int, default=8, help="MaskGIT steps of a whole sample (default 8)")
    parser.add_argument("--out", default="results", help="folder for latency.json/.md/.png (default results/)")
    parser.add_argument("--budget-s", type=float, help="timed seconds per measurement (default 1; --quick 0.2)")
    parser.add_argument("--max-call-s", type=float, default=30.0,
                        help="skip a measurement whose predicted single call exceeds this (default 30)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile peer")
    parser.add_argument("--quick", action="store_true",
                        help="batch 1 and 16, short budget, no torch.compile, short table (make demo)")
    args = parser.parse_args(argv)
    if args.batch_sizes is None:
        args.batch_sizes = "1,16" if args.quick else "1,16,64"
    try:
        args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated positive ints, got {args.batch_sizes!r}")
    if args.batch_sizes[0] <= 0:
        parser.error(f"--batch-sizes must be positive, got {args.batch_sizes}")
    if args.budget_s is None:
        args.budget_s = 0.2 if args.quick else 1.0
    if args.budget_s <= 0 or args.steps <= 0:
        parser.error("--budget-s and --steps must be positive")
    if args.config and (args.engine_dir or args.ckpt):
        parser.error("--config times fresh models: it takes no --engine-dir or --ckpt")
    args.compile = not (args.quick or args.no_compile)
    return args


# ---- FLOPs ---------------------------------------------------------------------------------------------------


def stage_flops(peer: TorchPeer, prior_config, engines: EngineDir, steps: int) -> dict:
    """Dense FLOPs per image of each stage: the prior step analytic (checked against the torch count), encoder
    and decoder counted from the torch modules at batch 1."""
    rng = np.random.default_rng(0)
    analytic = prior_step_flops(prior_config, 1)
    counted = {}
    for stage in ("prior_step", "decode", "encode"):
        feeds = stage_feeds(stage, 1, engines, rng)
        counted[stage] = counted_flops(lambda: peer.runners[graph_of(stage)].run(feeds))
    per_image = {"prior_step": float(analytic["total"]), "decode": counted["decode"], "encode": counted["encode"]}
    per_image["sample"] = steps * per_image["prior_step"] + per_image["decode"]
    return {"per_image": per_image, "prior_step_parts": analytic, "prior_step_counted": counted["prior_step"]}


# ---- candidates: what is timed ------------------------------------------------------------------------------


class Candidate:
    """One backend/precision: its three runners and a `sample(n)`. For a Generator (`is_generator`), the runners
    are the ones its sample calls, so timing them splits a sample into engine calls and the loop around them."""

    def __init__(self, backend: str, precision: str, runners: dict, sample: Callable[[int], object],
                 device: str, is_generator: bool = False):
        self.backend, self.precision, self.runners, self.sample = backend, precision, runners, sample
        self.device = device
        self.is_generator = is_generator


def runtime_candidates(engines: EngineDir, steps: int, max_batch: int, skipped: list) -> list:
    """A Generator for every backend/precision pair the engine directory holds and this machine can open."""
    pairs = [("tensorrt", p) for p in PRECISION_ORDER if p in engines.engines]
    for backend in ("onnxruntime-cuda", "onnxruntime-cpu"):
        pairs += [(backend, p) for p in PRECISION_ORDER if p in engines.graphs]
    candidates = []
    for backend, precision in pairs:
        try:
            generator = Generator(engines, backend=backend, precision=precision, batch_size=max_batch)
        except (RuntimeError, ValueError, FileNotFoundError, ImportError) as error:
            skipped.append({"backend": backend, "precision": precision, "reason": str(error).splitlines()[0]})
            continue

        def sample(n, generator=generator):
            return generator.sample(n=n, steps=steps, seed=0, output_type="np")

        device = "cpu" if backend == "onnxruntime-cpu" else "cuda"
        candidates.append(Candidate(backend, precision, generator.backend.runners, sample, device,
                                    is_generator=True))
    return candidates


def torch_candidates(movq, prior, engines: EngineDir, steps: int, with_compile: bool) -> list:
    """PyTorch eager (whole sample: the reference sampler) and torch.compile (whole sample: the same loop as the
    Generator around the compiled graphs), fp32, plus fp16 autocast on CUDA."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    movq, prior = movq.to(device), prior.to(device)
    grid, mask_id, num_classes = engines.grid.shape, engines.mask_id, engines.num_classes
    reference = ReferenceSampler(movq, prior)
    candidates = []
    for precision in ("fp32", "fp16") if device == "cuda" else ("fp32",):
        for mode in ("eager", "compile") if with_compile else ("eager",):
            peer = TorchPeer(movq, prior, mode=mode, device=device, precision=precision)
            if mode == "eager" and precision == "fp32":
                def sample(n):
                    return reference.sample(n, steps=steps, seed=0, batch_size=n)
            else:
                def sample(n, runners=peer.runners):
                    return loop_sample(runners, grid, mask_id, num_classes, n, steps)
            candidates.append(Candidate(peer.name, precision, peer.runners, sample, device))
    return candidates


# ---- timing ----------------------------------------------------------------------------------------------------


def time_stage(candidate: Candidate, stage: str, batch: int, engines: EngineDir, budget_s: float,
               predicted_s: float) -> dict:
    """Stats of one stage at one batch size; for a Generator's sample also the share of time outside engine calls."""
    few = predicted_s > budget_s  # long calls: one warm-up, two timed calls are all the budget allows
    if stage == "sample":
        timers = {}
        if candidate.is_generator:
            for name, runner in candidate.runners.items():
                timers[name] = runner.run = CallTimer(runner.run)  # instance attribute: shadows the method
        wall = CallTimer(lambda: candidate.sample(batch))
        try:
            times = time_calls(wall, budget_s, warmup=1, min_repeats=2 if few else 3)
        finally:
            for name in timers:
                del candidate.runners[name].run  # the class's method again
        stats = summarize(times, batch)
        if timers:
            engine_s = sum(t.seconds for t in timers.values())
            stats["engine_share"] = engine_s / wall.seconds
            stats["loop_overhead"] = 1.0 - stats["engine_share"]
            stats["engine_calls_per_sample"] = sum(t.calls for t in timers.values()) / wall.calls
        return stats
    feeds = stage_feeds(stage, batch, engines, np.random.default_rng(batch))
    runner = candidate.runners[graph_of(stage)]
    times = time_calls(lambda: runner.run(feeds), budget_s, warmup=1 if few else 2, min_repeats=2 if few else 3)
    return summarize(times, batch)


def run_benchmark(args, candidates, engines, flops, gemm, threads: int) -> list:
    """Times every candidate's stages. The candidates take turns on each stage and batch size, so that a ratio
    between two of them compares timings taken minutes apart at most; the GEMM rate is measured again before each
    batch size and the best reading is the machine's rate (a single reading can catch a busy moment)."""
    rows = []
    for batch in args.batch_sizes:
        update_gemm(gemm, gemm_rate(threads, budget_s=0.4))
        for stage in STAGES:
            for candidate in candidates:
                if candidate.precision == "int8" and stage in ("decode", "encode") and \
                        engines.graph("int8", graph_of(stage)) is None:
                    continue  # exported before the encoder and decoder were quantized: they are the fp32 graphs
                row = {"backend": candidate.backend, "precision": candidate.precision, "device": candidate.device,
                       "stage": stage, "batch": batch}
                gemm_gflops = gemm["gpu_fp16_gflops"] if candidate.device == "cuda" else gemm["cpu_fp32_gflops"]
                stage_flops_total = flops["per_image"][stage] * batch
                predicted_s = stage_flops_total / (gemm_gflops * 1e9 * PREDICTION_EFFICIENCY)
                if predicted_s > args.max_call_s:
                    row["skipped"] = (f"predicted {predicted_s:.0f} s per call > --max-call-s {args.max_call_s:g}")
                    rows.append(row)
                    continue
                start = time.perf_counter()
                try:
                    row.update(time_stage(candidate, stage, batch, engines, args.budget_s, predicted_s))
                except Exception as error:  # one failing backend must not hide the others' numbers
                    row["skipped"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
                    rows.append(row)
                    continue
                elapsed = time.perf_counter() - start
                # Warm-up (first-call allocation, torch.compile's compilation): the time not in the timed calls.
                row["warmup_s"] = max(0.0, elapsed - row["mean_ms"] * row["repeats"] / 1e3)
                row["flops"] = stage_flops_total
                rows.append(row)
                print(f"  {candidate.backend:17s} {candidate.precision:5s} {stage:10s} batch {batch:3d}: "
                    f"p50 {row['p50_ms']:9.2f} ms ({row['repeats']} calls, {elapsed:.1f} s)")
    update_gemm(gemm, gemm_rate(threads, budget_s=0.4))
    for row in rows:
        if "p50_ms" in row:
            gemm_gflops = gemm["gpu_fp16_gflops"] if row["device"] == "cuda" else gemm["cpu_fp32_gflops"]
            row["gflops_per_s"] = row["flops"] / (row["p50_ms"] / 1e3) / 1e9
            row["gemm_fraction"] = row["gflops_per_s"] / gemm_gflops
    add_speedups(rows)
    return rows


def update_gemm(gemm: dict, reading: dict) -> None:
    """Keeps the best of the GEMM readings in `gemm` and every reading in gemm["readings"]."""
    gemm.setdefault("readings", []).append({k: v for k, v in reading.items() if k.endswith("gflops")})
    for key, value in reading.items():
        if key.endswith("gflops"):
            gemm[key] = max(gemm.get(key, 0.0), value)


def add_speedups(rows: list) -> None:
    """speedup_vs_eager = eager p50 / row p50, eager at the row's precision where timed, else eager fp32."""
    eager = {(r["stage"], r["batch"], r["precision"]): r["p50_ms"] for r in rows
             if r["backend"] == EAGER and "p50_ms" in r}
    for row in rows:
        if "p50_ms" not in row:
            continue
        base = eager.get((row["stage"], row["batch"], row["precision"]),
                         eager.get((row["stage"], row["batch"], "fp32")))
        if base is not None:
            row["speedup_vs_eager"] = base / row["p50_ms"]


# ---- int8 agreement ----------------------------------------------------------------------------------


def top_token_agreement(fp32_runner, int8_runner, engines: EngineDir, tokens: np.ndarray) -> float:
    """Share of masked slots whose most likely token is the same in both priors (a temperature of 1e-4 makes the
    inverse-CDF draw an argmax), over a half-decoded state built from real samples and the all-masked first step."""
    feeds, masked = agreement_feeds(engines, tokens)
    reference, candidate = fp32_runner.run(feeds)["sampled"], int8_runner.run(feeds)["sampled"]
    return float((reference[masked] == candidate[masked]).mean())


# ---- main --------------------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace) -> dict:
    """Everything latency.json records but the command and the clock: the candidates timed, their rows, targets."""
    with tempfile.TemporaryDirectory(prefix="movq-latency-") as workdir:
        if args.config:
            print(f"exporting freshly initialized {args.config} models to a temporary engine directory ...")
        engines, ckpt, movq, prior = load_subject(args.config, args.engine_dir, args.ckpt, Path(workdir))
        skipped: list = []
        candidates = runtime_candidates(engines, args.steps, max(args.batch_sizes), skipped)
        # The PyTorch peers get the threads ONNX Runtime uses on the CPU, so both compete on equal terms.
        cpu = next((c for c in candidates if c.backend == "onnxruntime-cpu"), None)
        threads = (cpu.runners["prior"].session.get_session_options().intra_op_num_threads if cpu else 0)
        threads = threads or torch.get_num_threads()
        torch.set_num_threads(threads)
        print(f"threads: {threads} (ONNX Runtime intra-op = torch.set_num_threads)")
        candidates = torch_candidates(movq, prior, engines, args.steps, args.compile) + candidates

        machine = machine_info()
        gemm: dict = {}
        update_gemm(gemm, gemm_rate(threads, budget_s=min(2.0, 4 * args.budget_s)))
        flops = stage_flops(candidates[0], prior.config, engines, args.steps)
        rows = run_benchmark(args, candidates, engines, flops, gemm, threads)
        print(f"GEMM rate (best of {len(gemm['readings'])} readings): {gemm['cpu_fp32_gflops']:.1f} GFLOP/s fp32 CPU"
            + (f", {gemm['gpu_fp16_gflops']:.0f} GFLOP/s fp16 GPU" if 'gpu_fp16_gflops' in gemm else ""))

        int8_agreement = None
        by_key = {(c.backend, c.precision): c for c in candidates}
        if ("onnxruntime-cpu", "int8") in by_key and ("onnxruntime-cpu", "fp32") in by_key:
            n = min(16, max(args.batch_sizes))
            tokens = Generator(engines, "onnxruntime-cpu", "fp32").sample_tokens(n=n, steps=args.steps, seed=1)
            int8_agreement = top_token_agreement(by_key["onnxruntime-cpu", "fp32"].runners["prior"],
                                                 by_key["onnxruntime-cpu", "int8"].runners["prior"], engines, tokens)
    machine["load_average_at_end"] = load_average()
    return {
        "machine": machine,
        "threads": threads,
        "gemm": gemm,
        "model": {"config": args.config or "checkpoint", "ckpt": None if args.config else str(ckpt),
                  "engine_dir": None if args.config else str(engines.path), "tokenizer": engines.model["tokenizer"],
                  "prior": engines.model["prior"], "grid": engines.to_dict()["grid"], "image_size": engines.image_size},
        "settings": {"batch_sizes": args.batch_sizes, "steps": args.steps, "budget_s": args.budget_s,
                     "quick": args.quick, "torch_compile": args.compile},
        "flops": flops,
        "skipped_backends": skipped,
        "results": rows,
        "int8_top_token_agreement": int8_agreement,
        "targets": evaluate_targets(rows, int8_agreement, args.batch_sizes, engines.validation.get("int8")),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    command = " ".join(["python benchmarks/latency.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    measured = measure(args)
    report = {"command": command, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "duration_s": round(time.time() - started, 1), **measured}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "latency.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    plot(report["results"], out / "latency.png", title_of(report))
    text = report_markdown(report)
    atomic_write_text(out / "latency.md", text)
    print("\n" + text[:-1])
    print(f"wrote {out / 'latency.json'}, {out / 'latency.md'}, {out / 'latency.png'} in {report['duration_s']:.0f} s")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"latency.py: {error}")
