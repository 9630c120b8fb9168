"""Latency of every stage on every backend this machine has, side by side with PyTorch (issue 6).

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
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.flops import counted_flops, prior_step_flops  # noqa: E402
from benchmarks.machine import gemm_rate, load_average, machine_info  # noqa: E402
from benchmarks.timing import CallTimer, summarize, time_calls  # noqa: E402
from benchmarks.torch_peers import TorchPeer, loop_sample  # noqa: E402
from movq_deploy import contract, sampling  # noqa: E402
from movq_deploy.files import atomic_path, atomic_write_text, sha256_file  # noqa: E402
from movq_deploy.generator import Generator  # noqa: E402
from movq_deploy.manifest import EngineDir  # noqa: E402
from movq_deploy.models.checkpoint import load_models, save_checkpoint  # noqa: E402
from movq_deploy.models.reference import ReferenceSampler  # noqa: E402

STAGES = ("prior_step", "decode", "encode", "sample")
EAGER, COMPILE = "pytorch-eager", "torch-compile"
BACKEND_ORDER = ("tensorrt", "onnxruntime-cuda", "onnxruntime-cpu")
PRECISION_ORDER = ("fp32", "fp16", "int8")
CONFIGS = {"tiny": ("tiny", "tiny"), "paper": ("paper-f16", "paper")}  # --config -> (MoVQ preset, prior preset)
DEFAULT_ENGINE_DIRS = ("engines", "runs/demo/engines")  # export/to_onnx.py's default --out, then what make demo writes
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


# ---- models and engines --------------------------------------------------------------------------------------


def export_fresh_models(config: str, workdir: Path) -> "tuple[Path, Path]":
    """Freshly initialized models of `config` size (speed does not depend on the weights) saved as a checkpoint
    and exported with export/to_onnx.py (fp32 + int8 prior; fp16 too where a GPU backend can run ONNX graphs)."""
    import importlib.util

    from movq_deploy.export.pipeline import export_engine_dir
    from movq_deploy.backends.onnxruntime import cuda_available
    from movq_deploy.models.movq import MoVQ, MoVQConfig
    from movq_deploy.models.prior import MaskGITPrior, PriorConfig

    tokenizer_preset, prior_preset = CONFIGS[config]
    torch.manual_seed(0)
    tokenizer_config = MoVQConfig.preset(tokenizer_preset)
    prior_config = PriorConfig.preset(prior_preset, tokenizer_config)
    movq, prior = MoVQ(tokenizer_config), MaskGITPrior(prior_config)
    ckpt = save_checkpoint(workdir / "ckpt.pt", tokenizer_config=tokenizer_config.to_dict(),
                           tokenizer=movq.state_dict(), prior_config=prior_config.to_dict(), prior=prior.state_dict(),
                           record={"note": f"random weights for benchmarks/latency.py --config {config}"})
    engine_dir = workdir / "engines"
    fp16 = cuda_available() or importlib.util.find_spec("tensorrt") is not None
    export_engine_dir(ckpt, engine_dir, fp16=fp16, int8=True, log=lambda line: None)
    return engine_dir, ckpt


def default_engine_dir() -> Path:
    for name in DEFAULT_ENGINE_DIRS:
        if (Path(name) / "manifest.json").is_file():
            return Path(name)
    raise FileNotFoundError(f"no engine directory at {' or '.join(DEFAULT_ENGINE_DIRS)}: run `make demo`, pass "
                            f"--engine-dir, or time fresh models with --config tiny")


def resolve_ckpt(ckpt: Optional[str], engines: EngineDir) -> Path:
    """`ckpt` (--ckpt), else the checkpoint the engines were exported from (it records the file name and sha256):
    looked for beside the engine directory, inside it, then in the working directory."""
    if ckpt:
        path = Path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return path
    source, engine_dir = engines.export, engines.path
    name, digest = source.get("checkpoint"), source.get("checkpoint_sha256")
    if not name:
        raise ValueError(f"{engine_dir}/manifest.json names no source checkpoint: pass --ckpt")
    for folder in (engine_dir.parent, engine_dir, Path.cwd()):
        path = folder / name
        if path.is_file() and (digest is None or sha256_file(path) == digest):
            return path
    raise FileNotFoundError(f"the checkpoint {name} the engines were exported from is not beside {engine_dir} "
                            f"(or was changed since): pass --ckpt")


# ---- inputs, FLOPs, predictions ------------------------------------------------------------------------------


def stage_feeds(stage: str, batch: int, engines: EngineDir, rng: np.random.Generator) -> dict:
    """Inputs of one engine call: the prior's first step (all slots masked; the cost is the same at every step),
    random code indices for decode, random pixels for encode."""
    h, w, c = engines.grid.shape
    if stage == "prior_step":
        n, defaults = engines.grid.num_slots, engines.sampling
        labels = sampling.resolve_class_labels(None, batch, engines.num_classes)  # the null class
        return contract.prior_step_feeds(
            np.full((batch, n), engines.mask_id, np.int32), labels, rng.random((batch, n), dtype=np.float32),
            rng.gumbel(size=(batch, n)), defaults.temperature,
            sampling.choice_scale(0, defaults.steps, defaults.choice_temperature))
    if stage == "decode":
        return {"indices": rng.integers(0, engines.codebook_size, (batch, h, w, c), dtype=np.int32)}
    if stage == "encode":
        size = engines.image_size
        return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)}
    raise ValueError(f"unknown stage {stage!r}")


def stage_flops(peer: TorchPeer, prior_config, engines: EngineDir, steps: int) -> dict:
    """Dense FLOPs per image of each stage: the prior step analytic (checked against the torch count), encoder
    and decoder counted from the torch modules at batch 1."""
    rng = np.random.default_rng(0)
    analytic = prior_step_flops(prior_config, 1)
    counted = {}
    for stage in ("prior_step", "decode", "encode"):
        feeds = stage_feeds(stage, 1, engines, rng)
        counted[stage] = counted_flops(lambda: peer.runners[_graph(stage)].run(feeds))
    per_image = {"prior_step": float(analytic["total"]), "decode": counted["decode"], "encode": counted["encode"]}
    per_image["sample"] = steps * per_image["prior_step"] + per_image["decode"]
    return {"per_image": per_image, "prior_step_parts": analytic, "prior_step_counted": counted["prior_step"]}


def _graph(stage: str) -> str:
    return {"prior_step": "prior", "decode": "decoder", "encode": "encoder"}[stage]


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
    runner = candidate.runners[_graph(stage)]
    times = time_calls(lambda: runner.run(feeds), budget_s, warmup=1 if few else 2, min_repeats=2 if few else 3)
    return summarize(times, batch)


def run_benchmark(args, candidates, engines, flops, gemm, threads: int, log=print) -> list:
    """Times every candidate's stages. The candidates take turns on each stage and batch size, so that a ratio
    between two of them compares timings taken minutes apart at most; the GEMM rate is measured again before each
    batch size and the best reading is the machine's rate (a single reading can catch a busy moment)."""
    rows = []
    for batch in args.batch_sizes:
        update_gemm(gemm, gemm_rate(threads, budget_s=0.4))
        for stage in STAGES:
            for candidate in candidates:
                if candidate.precision == "int8" and stage in ("decode", "encode"):
                    continue  # an int8 engine directory quantizes the prior only
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
                log(f"  {candidate.backend:17s} {candidate.precision:5s} {stage:10s} batch {batch:3d}: "
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


# ---- int8 agreement and targets ----------------------------------------------------------------------------------


def agreement_feeds(engines: EngineDir, tokens: np.ndarray) -> "tuple[dict, np.ndarray]":
    """Prior-step feeds whose draw is an argmax (temperature 1e-4), and the bool mask of their masked slots: the
    token grids `tokens` [B, N] half masked at random, then all masked (the first step): 2B states."""
    rng = np.random.default_rng(0)
    mask_id = engines.mask_id
    half = np.where(rng.random(tokens.shape) < 0.5, mask_id, tokens).astype(np.int32)
    states = np.concatenate([half, np.full_like(half, mask_id)])  # (2B, N)
    labels = sampling.resolve_class_labels(None, len(states), engines.num_classes)
    feeds = contract.prior_step_feeds(states, labels, np.full(states.shape, 0.5), np.zeros(states.shape), 1e-4, 0.0)
    return feeds, states == mask_id


def top_token_agreement(fp32_runner, int8_runner, engines: EngineDir, tokens: np.ndarray) -> float:
    """Share of masked slots whose most likely token is the same in both priors (a temperature of 1e-4 makes the
    inverse-CDF draw an argmax), over a half-decoded state built from real samples and the all-masked first step."""
    feeds, masked = agreement_feeds(engines, tokens)
    reference, candidate = fp32_runner.run(feeds)["sampled"], int8_runner.run(feeds)["sampled"]
    return float((reference[masked] == candidate[masked]).mean())


def evaluate_targets(rows: list, int8_agreement: Optional[float], batch_sizes: list) -> list:
    """Issue 6's CPU targets as ratios measured in this run: [{"target", "value", "met"}] (met None = not measured)."""
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


# ---- report ------------------------------------------------------------------------------------------------------


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def results_table(rows: list) -> str:
    lines = ["| stage | backend | precision | batch | p50 ms | p90 ms | p99 ms | images/s | x eager | GFLOP/s "
             "| % GEMM | calls |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for stage in STAGES:
        for row in (r for r in rows if r["stage"] == stage):
            head = f"| {stage} | {row['backend']} | {row['precision']} | {row['batch']} |"
            if "skipped" in row:
                lines.append(f"{head} skipped: {row['skipped']} |||||||")
                continue
            lines.append(
                f"{head} {row['p50_ms']:.2f} | {row['p90_ms']:.2f} | {row['p99_ms']:.2f} | {row['images_per_s']:.1f}"
                f" | {_fmt(row.get('speedup_vs_eager'), '.2f')} | {row['gflops_per_s']:.1f}"
                f" | {row['gemm_fraction']:.0%} | {row['repeats']} |")
    return "\n".join(lines)


def summary_table(rows: list, batch_sizes: list) -> str:
    """The short table: p50 of each stage and sample images/s per backend and batch."""
    lines = ["| backend | precision | batch | prior step ms | decode ms | encode ms | sample ms | images/s "
             "| x eager (sample) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    keys = list(dict.fromkeys((r["backend"], r["precision"]) for r in rows))
    for backend, precision in keys:
        for batch in batch_sizes:
            cell = {r["stage"]: r for r in rows
                    if (r["backend"], r["precision"], r["batch"]) == (backend, precision, batch) and "p50_ms" in r}
            if not cell:
                continue
            sample = cell.get("sample", {})
            ms = [_fmt(cell.get(s, {}).get("p50_ms"), ".2f") for s in STAGES]
            lines.append(f"| {backend} | {precision} | {batch} | {' | '.join(ms)} | "
                         f"{_fmt(sample.get('images_per_s'), '.1f')} | {_fmt(sample.get('speedup_vs_eager'), '.2f')} |")
    return "\n".join(lines)


def targets_table(targets: list) -> str:
    lines = ["| target | measured | met |", "|---|---:|---|"]
    for t in targets:
        value = t["value"]
        shown = "not measured" if value is None else (f"{value:.1%}" if "%" in t["target"] else f"{value:.2f}x")
        met = {True: "met", False: "**missed**", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {shown}{' (' + t['detail'] + ')' if t['detail'] else ''} | {met} |")
    return "\n".join(lines)


def overhead_line(rows: list) -> str:
    parts = [f"{r['backend']} {r['precision']} n={r['batch']}: {r['loop_overhead']:.1%}"
             for r in rows if r["stage"] == "sample" and "loop_overhead" in r]
    return "Loop overhead (share of Generator.sample outside engine calls): " + ("; ".join(parts) or "not measured")


def plot(rows: list, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(STAGES), figsize=(4.2 * len(STAGES), 3.8))
    for ax, stage in zip(axes, STAGES):
        keys = list(dict.fromkeys((r["backend"], r["precision"]) for r in rows if r["stage"] == stage))
        for backend, precision in keys:
            points = sorted((r["batch"], r["p50_ms"]) for r in rows if "p50_ms" in r and r["stage"] == stage
                            and (r["backend"], r["precision"]) == (backend, precision))
            if points:
                ax.plot(*zip(*points), marker="o", label=f"{backend} {precision}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("p50 latency (ms)")
        ax.set_title(stage)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


# ---- main --------------------------------------------------------------------------------------------------------


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    log = print
    with tempfile.TemporaryDirectory(prefix="movq-latency-") as workdir:
        if args.config:
            log(f"exporting freshly initialized {args.config} models to a temporary engine directory ...")
            engine_dir, ckpt = export_fresh_models(args.config, Path(workdir))
        else:
            engine_dir = default_engine_dir() if args.engine_dir is None else Path(args.engine_dir)
        engines = EngineDir.load(engine_dir)
        if not args.config:
            ckpt = resolve_ckpt(args.ckpt, engines)
        movq, prior, _ = load_models(ckpt)
        if prior is None:
            raise ValueError(f"{ckpt} holds no prior (stage 1 only): train the prior first")

        skipped: list = []
        candidates = runtime_candidates(engines, args.steps, max(args.batch_sizes), skipped)
        # The PyTorch peers get the threads ONNX Runtime uses on the CPU, so both compete on equal terms.
        cpu = next((c for c in candidates if c.backend == "onnxruntime-cpu"), None)
        threads = (cpu.runners["prior"].session.get_session_options().intra_op_num_threads if cpu else 0)
        threads = threads or torch.get_num_threads()
        torch.set_num_threads(threads)
        log(f"threads: {threads} (ONNX Runtime intra-op = torch.set_num_threads)")
        candidates = torch_candidates(movq, prior, engines, args.steps, args.compile) + candidates

        machine = machine_info()
        gemm: dict = {}
        update_gemm(gemm, gemm_rate(threads, budget_s=min(2.0, 4 * args.budget_s)))
        flops = stage_flops(candidates[0], prior.config, engines, args.steps)

        rows = run_benchmark(args, candidates, engines, flops, gemm, threads, log)
        log(f"GEMM rate (best of {len(gemm['readings'])} readings): {gemm['cpu_fp32_gflops']:.1f} GFLOP/s fp32 CPU"
            + (f", {gemm['gpu_fp16_gflops']:.0f} GFLOP/s fp16 GPU" if 'gpu_fp16_gflops' in gemm else ""))

        int8_agreement = None
        by_key = {(c.backend, c.precision): c for c in candidates}
        if ("onnxruntime-cpu", "int8") in by_key and ("onnxruntime-cpu", "fp32") in by_key:
            n = min(16, max(args.batch_sizes))
            tokens = Generator(engine_dir, "onnxruntime-cpu", "fp32").sample_tokens(n=n, steps=args.steps, seed=1)
            int8_agreement = top_token_agreement(by_key["onnxruntime-cpu", "fp32"].runners["prior"],
                                                 by_key["onnxruntime-cpu", "int8"].runners["prior"], engines, tokens)
        targets = evaluate_targets(rows, int8_agreement, args.batch_sizes)

    command = " ".join(["python benchmarks/latency.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    machine["load_average_at_end"] = load_average()
    report = {
        "command": command,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "duration_s": round(time.time() - started, 1),
        "machine": machine,
        "threads": threads,
        "gemm": gemm,
        "model": {"config": args.config or "checkpoint", "ckpt": None if args.config else str(ckpt),
                  "engine_dir": None if args.config else str(engine_dir), "tokenizer": engines.model["tokenizer"],
                  "prior": engines.model["prior"], "grid": engines.to_dict()["grid"], "image_size": engines.image_size},
        "settings": {"batch_sizes": args.batch_sizes, "steps": args.steps, "budget_s": args.budget_s,
                     "quick": args.quick, "torch_compile": args.compile},
        "flops": flops,
        "skipped_backends": skipped,
        "results": rows,
        "int8_top_token_agreement": int8_agreement,
        "targets": targets,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "latency.json", json.dumps(report, indent=2, allow_nan=False) + "\n")
    title = (f"{machine['cpu_model']}, {machine['cores']} cores{', ' + machine['gpus'][0] if machine['gpus'] else ''}"
             f" - {report['model']['config']} model, {args.steps} steps")
    plot(rows, out / "latency.png", title)

    summary = summary_table(rows, args.batch_sizes)
    start_load, end_load = ((machine[key] or [None])[0] for key in ("load_average_at_start", "load_average_at_end"))
    load = (f"{report['started_utc']}, {report['duration_s']:.0f} s, {threads} threads; load average (1 min) "
            f"{_fmt(start_load, '.1f')} at start, {_fmt(end_load, '.1f')} at end; GEMM rate "
            f"{gemm['cpu_fp32_gflops']:.0f} GFLOP/s fp32 CPU"
            + (f", {gemm['gpu_fp16_gflops']:.0f} fp16 GPU" if "gpu_fp16_gflops" in gemm else ""))
    text = [f"## Latency ({title})", "", f"`{command}`", "", load, "", summary, ""]
    if not args.quick:
        text += [results_table(rows), ""]
    text += [overhead_line(rows), "", targets_table(targets), ""]
    reasons = {}  # one line per backend and reason, naming its precisions
    for s in skipped:
        reasons.setdefault((s["backend"], s["reason"]), []).append(s["precision"])
    text += [f"Skipped: {backend} ({', '.join(precisions)}): {reason}"
             for (backend, reason), precisions in reasons.items()]
    atomic_write_text(out / "latency.md", "\n".join(text) + "\n")
    log("\n" + "\n".join(text))
    log(f"wrote {out / 'latency.json'}, {out / 'latency.md'}, {out / 'latency.png'} in {report['duration_s']:.0f} s")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"latency.py: {error}")
