"""Latency of every stage on every backend this machine has, side by side with the peers a user would pick instead.

    python benchmarks/latency.py [--engine-dir engines/] [--ckpt PATH] [--config tiny|paper[,...]]
                                 [--batch-sizes 1,16,64] [--steps 8] [--out results/] [--budget-s S] [--quick]

Models: the engine directory (default: the first of engines/, runs/demo/engines) with the checkpoint it came from,
and/or freshly initialized models of each `--config` size (random weights, exported to a temporary engine
directory first), all in one run and one table.

For each model, every package path this machine can open (ONNX Runtime fp32 and int8; OpenVINO fp32, bf16 and
int8; "auto", the Generator's default choice; TensorRT and ONNX Runtime CUDA on a GPU), and every peer: PyTorch
eager and torch.compile in fp32 and bf16 autocast (fp16 on CUDA), and OpenVINO called directly on the fp32 graphs
in bf16 with no package runtime around it. At each batch size: one prior step, decode, encode, and a whole sample
(all steps + decode: `Generator.sample` for the package, the reference sampler for eager, the same loop around the
graphs for torch.compile and OpenVINO direct). Each is warmed up, then repeated until a time budget. One
candidate at a time runs all its stages and batches, and its runners are closed before the next: an engine keeps
its largest call's buffers (ONNX Runtime's arena, OpenVINO's requests), and at paper size every path's batch-16
decode held at once passed 24 GB and the run was killed.

Against the physical limit: dense FLOPs of each stage over its p50, as a fraction of this machine's GEMM rate at
the stage's precision (fp32, bf16, int8), measured in the same run. The loop's own overhead: the share of a
Generator's sample outside engine calls. Agreement: each path's prior, most likely token, against the fp32 graph.

Writes latency.json (results, machine, library versions), latency.md (the tables and targets) and latency.png to
--out. --quick is the short run `make demo` ends with (batch 1 and 16, short budget, no torch.compile).
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from movq_deploy.backends.base import Runner
from movq_deploy.export.flops import counted_flops
from movq_deploy.files import atomic_write_text
from movq_deploy.generator import Generator
from movq_deploy.manifest import EngineDir
from movq_deploy.memory import release_freed
from movq_deploy.models.reference import ReferenceSampler

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: make `benchmarks` importable
from benchmarks.flops import prior_step_flops  # noqa: E402
from benchmarks.latency_report import STAGES, plot, report_markdown, title_of  # noqa: E402
from benchmarks.latency_targets import cpu_path_targets, evaluate_targets  # noqa: E402
from benchmarks.machine import gemm_rate, load_average, machine_info, reduced_precision_rates  # noqa: E402
from benchmarks.openvino_peer import OPENVINO_DIRECT, direct_runners  # noqa: E402
from benchmarks.subject import (  # noqa: E402
    CONFIGS, DEFAULT_ENGINE_DIRS, agreement_feeds, graph_of, load_subject, stage_feeds,
)
from benchmarks.timing import CallTimer, summarize, time_calls  # noqa: E402
from benchmarks.torch_peers import AUTOCAST, EAGER, TorchPeer, loop_sample  # noqa: E402

PRECISION_ORDER = ("fp32", "fp16", "bf16", "int8")
# A stage whose predicted single call (its FLOPs at this fraction of the GEMM rate) exceeds --max-call-s is skipped.
PREDICTION_EFFICIENCY = 0.5
RATE_KEYS = {"fp32": "cpu_fp32_gflops", "bf16": "cpu_bf16_gflops", "int8": "cpu_int8_gops"}  # CPU precision -> rate


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine-dir",
                        help=f"engine directory (default: the first of {', '.join(DEFAULT_ENGINE_DIRS)}, unless "
                             f"--config alone is given)")
    parser.add_argument("--ckpt", help="weights for the PyTorch peers (default: the checkpoint the manifest names)")
    parser.add_argument("--config", help=f"also time freshly initialized models of these sizes ({', '.join(CONFIGS)}; "
                                         f"comma-separated)")
    parser.add_argument("--batch-sizes", help="comma-separated (default 1,16,64; --quick 1,16)")
    parser.add_argument("--steps", type=int, default=8, help="MaskGIT steps of a whole sample (default 8)")
    parser.add_argument("--out", default="results", help="folder for latency.json/.md/.png (default results/)")
    parser.add_argument("--budget-s", type=float, help="timed seconds per measurement (default 1; --quick 0.2)")
    parser.add_argument("--max-call-s", type=float, default=30.0,
                        help="skip a measurement whose predicted single call exceeds this (default 30)")
    parser.add_argument("--exports", help="folder where --config's fresh models are exported and kept, and reused "
                                          "by the next run (default: a temporary folder)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile peers")
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
    args.configs = [c for c in (args.config or "").split(",") if c]
    unknown = sorted(set(args.configs) - set(CONFIGS))
    if unknown:
        parser.error(f"--config must name {', '.join(CONFIGS)}; got {', '.join(unknown)}")
    if args.ckpt and not (args.engine_dir or not args.configs):
        parser.error("--ckpt goes with the engine directory's model, not with --config's fresh ones")
    args.with_engine_dir = bool(args.engine_dir) or not args.configs
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
    """One path: its runners and a `sample(n)`. `kind` is "package" (a Generator: timing its runners splits a
    sample into engine calls and the loop around them) or "peer". `compute` is each stage's precision, for the GEMM
    rate it is held to."""

    def __init__(self, backend: str, precision: str, runners: dict, sample: Callable[[int], object],
                 device: str, kind: str = "peer", compute: Optional[dict] = None, placement: str = ""):
        self.backend, self.precision, self.runners, self.sample = backend, precision, runners, sample
        self.device, self.kind, self.placement = device, kind, placement
        self.compute = compute or {stage: precision for stage in STAGES}

    def close(self) -> None:
        """Frees what its runners hold (a PyTorch peer's modules stay: the other peers share them)."""
        for runner in self.runners.values():
            getattr(runner, "close", lambda: None)()

    @property
    def is_generator(self) -> bool:
        return self.kind == "package"


def runtime_candidates(engines: EngineDir, steps: int, max_batch: int, skipped: list) -> list:
    """Makers (called at the candidate's turn: `make() -> Candidate`, or None with the reason in `skipped`) of a
    Generator for every backend/precision pair the engine directory holds, and the Generator's default ("auto")."""
    pairs = [("tensorrt", p) for p in PRECISION_ORDER if p in engines.engines]
    pairs += [("onnxruntime-cuda", p) for p in ("fp32", "fp16", "int8") if p in engines.graphs]
    pairs += [("onnxruntime-cpu", p) for p in ("fp32", "int8") if p in engines.graphs]
    if importlib.util.find_spec("openvino") is not None:
        pairs += [("openvino", "fp32"), ("openvino", "bf16")] + [("openvino", "int8")] * ("int8-openvino" in
                                                                                         engines.graphs)
    pairs.append(("auto", "auto"))
    return [functools.partial(package_candidate, engines, backend, precision, steps, max_batch, skipped)
            for backend, precision in pairs]


def package_candidate(engines: EngineDir, backend: str, precision: str, steps: int, max_batch: int,
                      skipped: list) -> Optional[Candidate]:
    try:
        generator = Generator(engines, backend=backend, precision=precision, batch_size=max_batch)
    except (RuntimeError, ValueError, FileNotFoundError, ImportError) as error:
        skipped.append({"backend": backend, "precision": precision, "reason": str(error).splitlines()[0]})
        return None

    def sample(n):
        return generator.sample(n=n, steps=steps, seed=0, output_type="np")

    device = "cpu" if generator.placement else "cuda"  # the CPU paths say where each graph runs
    compute = {stage: generator.placement[graph_of(stage)].precision for stage in STAGES[:3]} \
        if generator.placement else None
    if compute:
        compute["sample"] = compute["prior_step"]
    return Candidate(backend, precision if backend != "auto" else generator.precision, generator.backend.runners,
                     sample, device, "package", compute,
                     placement=generator.backend_reason if backend == "auto" else "")


def peer_candidates(movq, prior, engines: EngineDir, steps: int, with_compile: bool, threads: int) -> list:
    """Makers of the peers (as runtime_candidates'): PyTorch eager (whole sample: the reference sampler) and
    torch.compile (whole sample: the same loop as the Generator around the compiled graphs), fp32 and bf16 autocast
    (fp16 autocast on CUDA), and OpenVINO called directly on the fp32 graphs in bf16 (CPU, where openvino is
    installed)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    movq, prior = movq.to(device), prior.to(device)
    grid, mask_id, num_classes = engines.grid.shape, engines.mask_id, engines.num_classes
    candidates = []
    for precision in ("fp32", "fp16") if device == "cuda" else ("fp32", "bf16"):
        reference = ReferenceSampler(movq, prior, autocast=AUTOCAST[precision])
        for mode in ("eager", "compile") if with_compile else ("eager",):
            peer = TorchPeer(movq, prior, mode=mode, device=device, precision=precision)
            if mode == "eager":
                def sample(n, reference=reference):
                    return reference.sample(n, steps=steps, seed=0, batch_size=n)
            else:
                def sample(n, runners=peer.runners):
                    return loop_sample(runners, grid, mask_id, num_classes, n, steps)
            candidate = Candidate(peer.name, precision, peer.runners, sample, device)
            candidates.append(lambda candidate=candidate: candidate)
    if device == "cpu" and importlib.util.find_spec("openvino") is not None:
        def openvino_direct() -> Candidate:
            runners = direct_runners(engines, threads)

            def sample(n):
                return loop_sample(runners, grid, mask_id, num_classes, n, steps)

            return Candidate(OPENVINO_DIRECT, "bf16", runners, sample, "cpu")

        candidates.append(openvino_direct)
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


def rate_of(gemm: dict, device: str, compute: str) -> float:
    """The GEMM rate a stage computed at `compute` on `device` is held to (GFLOP/s or GOP/s)."""
    if device == "cuda":
        return gemm["gpu_fp16_gflops"]
    return gemm.get(RATE_KEYS.get(compute, "cpu_fp32_gflops")) or gemm["cpu_fp32_gflops"]


def run_benchmark(args, makers, engines, flops, gemm, threads: int, model: str,
                  agreement: Callable[[Candidate], float]) -> "tuple[list, dict, str]":
    """Times every candidate's stages, one candidate at a time: opened at its turn (`makers`), its prior's
    `agreement` taken, then its stages, then closed. The GEMM rates are measured again before each candidate and
    the best reading is the machine's rate (a single reading can catch a busy moment). Returns the rows, the
    agreements and auto's placement."""
    rows, agreements, placement = [], {}, ""
    for make in makers:
        candidate = make()
        if candidate is None:
            continue
        agreements[f"{candidate.backend} {candidate.precision}"] = agreement(candidate)
        placement = candidate.placement or placement
        measure_gemm(gemm, threads, budget_s=0.4)
        for batch, stage in itertools.product(args.batch_sizes, STAGES):
            if candidate.precision == "int8" and candidate.backend == "onnxruntime-cpu" and \
                    stage in ("decode", "encode") and engines.graph("int8", graph_of(stage)) is None:
                continue  # exported before the encoder and decoder were quantized: they are the fp32 graphs
            row = {"model": model, "backend": candidate.backend, "precision": candidate.precision,
                   "device": candidate.device, "stage": stage, "batch": batch,
                   "compute": candidate.compute[stage]}
            stage_flops_total = flops["per_image"][stage] * batch
            predicted_s = stage_flops_total / (rate_of(gemm, candidate.device, row["compute"]) * 1e9
                                               * PREDICTION_EFFICIENCY)
            if predicted_s > args.max_call_s:
                row["skipped"] = f"predicted {predicted_s:.0f} s per call > --max-call-s {args.max_call_s:g}"
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
            print(f"  {model:10s} {candidate.backend:17s} {candidate.precision:9s} {stage:10s} batch {batch:3d}: "
                  f"p50 {row['p50_ms']:9.2f} ms ({row['repeats']} calls, {elapsed:.1f} s)", flush=True)
        candidate.close()
        release_freed()  # its buffers back to the system before the next candidate opens
    measure_gemm(gemm, threads, budget_s=0.4)
    for row in rows:
        if "p50_ms" in row:
            row["gflops_per_s"] = row["flops"] / (row["p50_ms"] / 1e3) / 1e9
            row["gemm_fraction"] = row["gflops_per_s"] / rate_of(gemm, row["device"], row["compute"])
    add_speedups(rows)
    return rows, agreements, placement


def measure_gemm(gemm: dict, threads: int, budget_s: float) -> None:
    """Adds a reading of the fp32, bf16 and int8 GEMM rates to `gemm`, which keeps the best of each and every
    reading in gemm["readings"]."""
    reading = gemm_rate(threads, budget_s=budget_s)
    if not torch.cuda.is_available():
        reading.update(reduced_precision_rates(threads, budget_s=budget_s))
    gemm.setdefault("readings", []).append({k: v for k, v in reading.items() if k.endswith(("gflops", "gops"))})
    for key, value in reading.items():
        if key.endswith(("gflops", "gops")) and value is not None:
            gemm[key] = max(gemm.get(key, 0.0), value)


def add_speedups(rows: list) -> None:
    """speedup_vs_eager = eager fp32 p50 / row p50; speedup_vs_ort = ONNX Runtime fp32 p50 / row p50 (the package's
    former default), within each model."""
    for key, backend in (("speedup_vs_eager", EAGER), ("speedup_vs_ort", "onnxruntime-cpu")):
        base = {(r["model"], r["stage"], r["batch"]): r["p50_ms"] for r in rows
                if r["backend"] == backend and r["precision"] == "fp32" and "p50_ms" in r}
        for row in rows:
            reference = base.get((row["model"], row["stage"], row["batch"]))
            if "p50_ms" in row and reference is not None:
                row[key] = reference / row["p50_ms"]


# ---- agreement -----------------------------------------------------------------------------------------------


def top_token_agreement(engines: EngineDir, tokens: np.ndarray, reference: Runner) -> Callable[[Candidate], float]:
    """candidate -> the share of masked slots whose most likely token (a temperature of 1e-4 makes the draw an
    argmax) is the `reference` fp32 graph's, over half-decoded states of real samples and the all-masked first
    step."""
    feeds, masked = agreement_feeds(engines, tokens)
    want = reference.run(feeds)["sampled"][masked]

    def agreement(candidate: Candidate) -> float:
        return float((candidate.runners["prior"].run(feeds)["sampled"][masked] == want).mean())

    return agreement


# ---- start-up ----------------------------------------------------------------------------------------------


def startup_seconds(engines: EngineDir) -> dict:
    """Seconds to open a Generator: ONNX Runtime fp32, and each OpenVINO precision the directory can run with an
    empty model cache (cold: OpenVINO compiles) and then with it filled (warm: it loads the compiled blobs)."""
    def opened(**kwargs) -> float:
        start = time.perf_counter()
        Generator(engines, **kwargs).close()
        return round(time.perf_counter() - start, 2)

    seconds = {"onnxruntime-cpu fp32": opened(backend="onnxruntime-cpu")}
    if importlib.util.find_spec("openvino") is None:
        return seconds
    for precision in ("fp32", "bf16", "int8"):
        with tempfile.TemporaryDirectory(prefix="movq-ov-cache-") as cache:
            try:
                cold = opened(backend="openvino", precision=precision, cache_dir=cache)
            except (RuntimeError, ValueError, FileNotFoundError, ImportError):
                continue  # not runnable here: runtime_candidates says why
            seconds[f"openvino {precision}"] = {"cold": cold, "warm": opened(backend="openvino", precision=precision,
                                                                             cache_dir=cache)}
    return seconds


# ---- main --------------------------------------------------------------------------------------------------------


def measure_model(args, config: Optional[str], workdir: Path, gemm: dict, machine: dict) -> dict:
    """One model's rows, FLOPs, agreements and targets."""
    if config:
        print(f"exporting freshly initialized {config} models to a temporary engine directory ...", flush=True)
    engines, ckpt, movq, prior = load_subject(config, args.engine_dir, args.ckpt, workdir)
    model = config or "checkpoint"
    startup = startup_seconds(engines)
    print(f"  {model}: Generator start-up (s): {startup}", flush=True)
    skipped: list = []
    makers = runtime_candidates(engines, args.steps, max(args.batch_sizes), skipped)
    threads = machine["threads"]
    makers += peer_candidates(movq, prior, engines, args.steps, args.compile, threads)
    device = next(prior.parameters()).device.type  # where peer_candidates put the modules
    flops = stage_flops(TorchPeer(movq, prior, device=device), prior.config, engines, args.steps)
    n = min(16, max(args.batch_sizes))
    with Generator(engines, "onnxruntime-cpu", "fp32") as fp32:  # the agreements' reference
        tokens = fp32.sample_tokens(n=n, steps=args.steps, seed=1)
        agreement = top_token_agreement(engines, tokens, fp32.backend.runners["prior"])
    rows, agreements, placement = run_benchmark(args, makers, engines, flops, gemm, threads, model, agreement)
    for row in rows:
        row["top_token_agreement"] = agreements.get(f"{row['backend']} {row['precision']}")
    return {
        "name": model, "ckpt": None if config else str(ckpt), "engine_dir": None if config else str(engines.path),
        "tokenizer": engines.model["tokenizer"], "prior": engines.model["prior"], "grid": engines.to_dict()["grid"],
        "image_size": engines.image_size, "auto_placement": placement, "flops": flops, "startup_s": startup,
        "skipped_backends": skipped, "results": rows, "top_token_agreement": agreements,
        "targets": evaluate_targets(rows, agreements.get("onnxruntime-cpu int8"), args.batch_sizes,
                                    engines.validation.get("int8")),
    }


def measure(args: argparse.Namespace) -> dict:
    """Everything latency.json records but the command and the clock."""
    # The PyTorch peers and OpenVINO get ONNX Runtime's intra-op threads, so all compete on equal terms.
    from movq_deploy.backends.onnxruntime import physical_cores

    threads = physical_cores() or torch.get_num_threads()
    torch.set_num_threads(threads)
    print(f"threads: {threads} (ONNX Runtime intra-op = OpenVINO = torch.set_num_threads)", flush=True)
    machine = {**machine_info(), "threads": threads}
    gemm: dict = {}
    measure_gemm(gemm, threads, budget_s=min(2.0, 4 * args.budget_s))
    models = []
    with tempfile.TemporaryDirectory(prefix="movq-latency-") as workdir:
        subjects = ([None] if args.with_engine_dir else []) + args.configs
        for config in subjects:
            folder = Path(args.exports or workdir) / (config or "checkpoint")
            folder.mkdir(parents=True, exist_ok=True)
            models.append(measure_model(args, config, folder, gemm, machine))
    print(f"GEMM rates (best of {len(gemm['readings'])} readings): {gemm['cpu_fp32_gflops']:.0f} GFLOP/s fp32"
          + (f", {gemm['cpu_bf16_gflops']:.0f} bf16" if gemm.get("cpu_bf16_gflops") else "")
          + (f", {gemm['cpu_int8_gops']:.0f} GOP/s int8" if gemm.get("cpu_int8_gops") else ""), flush=True)
    machine["load_average_at_end"] = load_average()
    rows = [row for model in models for row in model["results"]]
    return {
        "machine": machine, "threads": threads, "gemm": gemm, "models": models, "results": rows,
        "settings": {"batch_sizes": args.batch_sizes, "steps": args.steps, "budget_s": args.budget_s,
                     "quick": args.quick, "torch_compile": args.compile},
        "targets": cpu_path_targets(rows, args.batch_sizes),
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
