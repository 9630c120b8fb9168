"""The GPU bar: what PyTorch and ONNX Runtime CUDA reach on a GPU, the numbers TensorRT engines must beat.

    python benchmarks/gpu_bar.py [--config paper|tiny] [--batch-sizes 1,64] [--steps 8] [--modes ...] [--no-ort]
                                 [--device cuda|cpu] [--budget-s 1] [--deadline-s 360] [--out results/]

For the paper configuration (paper-f16 tokenizer + the 307M prior, 256^2 images, random weights: speed does not
depend on them) and each batch size, it times one prior step, one decode and a whole sample (`steps` prior steps
through the package's own MaskGIT loop, movq_deploy.sampling, then the decode), in
- PyTorch: eager fp32 ("eager"), bf16 autocast ("eager-bf16"), torch.compile ("compile") and
  torch.compile(mode="reduce-overhead") (CUDA graphs, "reduce-overhead"); "compile-bf16" and
  "reduce-overhead-bf16" run the compiled modules under bf16 autocast;
- the package's graphs (exported here, fp32 and fp16) on ONNX Runtime's CUDA provider, and the prior step once more
  with ONNX Runtime's CUDA graphs (enable_cuda_graph: I/O bound to fixed device buffers, one session per batch).
Every mode runs the same modules (movq_deploy.models.graphs) with numpy in and out, as a user of the runtime sees
them. fp32 matmuls run as PyTorch's defaults leave them (TF32 for convolutions, not for matmuls: both recorded).

Measurements run in order (the PyTorch modes, eager first, then ONNX Runtime) and none starts after --deadline-s
(compilation counts): the rest are listed as skipped, so the script fits a fixed slice of GPU time. `--device cpu --config tiny` is the rehearsal
(the ONNX Runtime rows then run on its CPU provider). Writes gpu_bar.json and gpu_bar.md to --out.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.machine import machine_info  # noqa: E402
from benchmarks.timing import summarize, time_calls  # noqa: E402
from movq_deploy import contract  # noqa: E402
from benchmarks.report import write_report  # noqa: E402
from movq_deploy.models.graphs import DecoderGraph, PriorStepGraph  # noqa: E402
from movq_deploy.models.movq import MoVQ, MoVQConfig  # noqa: E402
from movq_deploy.models.prior import MaskGITPrior, PriorConfig  # noqa: E402

CONFIGS = {"paper": ("paper-f16", "paper"), "tiny": ("tiny", "tiny")}  # --config -> (MoVQ preset, prior preset)
TORCH_MODES = ("eager", "eager-bf16", "compile", "reduce-overhead", "compile-bf16", "reduce-overhead-bf16")
DEFAULT_MODES = ("eager", "eager-bf16", "compile", "reduce-overhead")
STAGES = ("prior_step", "decode", "sample")
PRIOR_INPUTS = ("tokens", "class_labels", "uniform", "gumbel", "temperature", "choice_scale")


@dataclass
class Models:
    movq: MoVQ
    prior: MaskGITPrior
    grid: tuple
    mask_id: int
    num_classes: int


def fresh_models(config: str, device: str) -> Models:
    tokenizer_preset, prior_preset = CONFIGS[config]
    torch.manual_seed(0)
    movq_config = MoVQConfig.preset(tokenizer_preset)
    prior_config = PriorConfig.preset(prior_preset, movq_config)
    movq, prior = MoVQ(movq_config).eval().to(device), MaskGITPrior(prior_config).eval().to(device)
    return Models(movq, prior, movq_config.grid, prior_config.mask_id, prior_config.num_classes)


class TorchRunner:
    """A graph module behind `run(feeds) -> {name: array}` (numpy in and out, as the runtime's runners), in one of
    TORCH_MODES."""

    def __init__(self, module: torch.nn.Module, input_names, output_names, mode: str, device: str):
        self.input_names, self.output_names, self.device = list(input_names), list(output_names), device
        self.bf16 = mode.endswith("bf16")
        base = mode.removesuffix("-bf16")
        if base == "eager":
            self.module = module
        else:  # one module per mode: each torch.compile keeps its own graphs (and CUDA graphs)
            self.module = torch.compile(module, mode="reduce-overhead" if base == "reduce-overhead" else None)
        self.cuda_graphs = base == "reduce-overhead" and device == "cuda"

    def run(self, feeds):
        args = [None if feeds.get(name) is None else torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device)
                for name in self.input_names]
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # each call is a new step: its outputs are read right away
        with torch.inference_mode(), torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16):
            outputs = self.module(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        return {name: out.cpu().numpy() for name, out in zip(self.output_names, outputs)}


def torch_runners(models: Models, mode: str, device: str) -> dict:
    return {"prior": TorchRunner(PriorStepGraph(models.prior), PRIOR_INPUTS, ["sampled", "confidence"], mode, device),
            "decoder": TorchRunner(DecoderGraph(models.movq), ["indices"], ["image"], mode, device)}


# ---- ONNX Runtime rows -------------------------------------------------------------------------------------------


def export_graphs(models: Models, workdir: Path, log) -> dict:
    """prior and decoder ONNX graphs, fp32 and fp16, as export/to_onnx.py writes them (structural checks only: the
    export tests validate them): {precision: {graph: path}}."""
    from movq_deploy.export.onnx_graph import export_graph, finalize_graph
    from movq_deploy.export.precision import convert_fp16
    from movq_deploy.export.specs import graph_specs, io_shapes

    specs = graph_specs(models.movq.cpu(), models.prior.cpu())
    paths: dict = {"fp32": {}, "fp16": {}}
    for name in ("prior", "decoder"):
        tick = time.perf_counter()
        fp32 = workdir / f"{name}.onnx"
        export_graph(specs[name], fp32)
        finalize_graph(specs[name], fp32, io_shapes(specs[name]))
        convert_fp16(specs[name], fp32, workdir / f"{name}.fp16.onnx")
        paths["fp32"][name], paths["fp16"][name] = fp32, workdir / f"{name}.fp16.onnx"
        log(f"exported {name} (fp32, fp16) in {time.perf_counter() - tick:.0f} s")
    return paths


def ort_runners(paths: dict, device: str) -> dict:
    from movq_deploy.backends.onnxruntime import OnnxRuntimeRunner

    runners = {name: OnnxRuntimeRunner(path, device=device) for name, path in paths.items()}
    if device == "cuda" and "CUDAExecutionProvider" not in runners["prior"].session.get_providers():
        raise RuntimeError("ONNX Runtime's CUDA provider did not start (the session fell back to the CPU)")
    return runners


class CudaGraphStep:
    """The prior step on ONNX Runtime CUDA with enable_cuda_graph: inputs copied into fixed device buffers, the
    graph captured on the first run and replayed after (one session per batch size: shapes are fixed)."""

    def __init__(self, path: Path, feeds: dict):
        import onnxruntime as ort

        providers = [("CUDAExecutionProvider", {"enable_cuda_graph": "1"})]
        self.session = ort.InferenceSession(str(path), providers=providers)
        if "CUDAExecutionProvider" not in self.session.get_providers():
            raise RuntimeError("ONNX Runtime's CUDA provider did not start")
        self.inputs = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0)
                       for name, value in feeds.items()}
        batch = len(feeds["tokens"])
        dtypes = {"tensor(int32)": np.int32, "tensor(float)": np.float32}
        self.outputs = {out.name: ort.OrtValue.ortvalue_from_shape_and_type(
            [dim if isinstance(dim, int) else batch for dim in out.shape], dtypes[out.type], "cuda", 0)
            for out in self.session.get_outputs()}
        self.binding = self.session.io_binding()
        for name, value in self.inputs.items():
            self.binding.bind_ortvalue_input(name, value)
        for name, value in self.outputs.items():
            self.binding.bind_ortvalue_output(name, value)

    def run(self, feeds: dict) -> dict:
        for name, value in feeds.items():
            self.inputs[name].update_inplace(np.ascontiguousarray(value))
        self.session.run_with_iobinding(self.binding)
        return {name: value.numpy() for name, value in self.outputs.items()}


# ---- timing ------------------------------------------------------------------------------------------------------


def prior_feeds(models: Models, batch: int) -> dict:
    """The first sampling step (every slot masked; every step costs the same)."""
    rng = np.random.default_rng(batch)
    n = models.prior.config.num_slots
    labels = np.full(batch, models.num_classes, np.int32) if models.num_classes else None
    return contract.prior_step_feeds(np.full((batch, n), models.mask_id, np.int32), labels,
                                     rng.random((batch, n), dtype=np.float32), rng.gumbel(size=(batch, n)),
                                     temperature=1.0, choice_scale=3.9)


def stage_call(stage: str, runners: dict, models: Models, batch: int, steps: int):
    """A no-argument call of `stage` at `batch` on `runners` ({"prior", "decoder"})."""
    if stage == "prior_step":
        feeds = prior_feeds(models, batch)
        return lambda: runners["prior"].run(feeds)
    if stage == "decode":
        h, w, c = models.grid
        codes = models.movq.config.codebook_size
        indices = np.random.default_rng(batch).integers(0, codes, (batch, h, w, c), dtype=np.int32)
        return lambda: runners["decoder"].run({"indices": indices})
    from benchmarks.torch_peers import loop_sample

    return lambda: loop_sample(runners, models.grid, models.mask_id, models.num_classes, batch, steps)


def time_stage(call, budget_s: float, device: str) -> dict:
    """p50 & co. of `call` after warm-up (compilation and CUDA graph capture happen there: warmup_s)."""
    def synced():
        call()
        if device == "cuda":
            torch.cuda.synchronize()  # outputs come back to the host already; this also drains stray work

    tick = time.perf_counter()
    for _ in range(3):  # reduce-overhead records its CUDA graphs on the second or third call
        synced()
    warmup_s = time.perf_counter() - tick
    stats = summarize(time_calls(synced, budget_s, warmup=0, min_repeats=3, max_repeats=200), 1)
    stats.pop("images_per_s")
    return {**stats, "warmup_s": warmup_s}


@dataclass
class Plan:
    """One measurement: a row of the table, and how to make its runners."""

    backend: str  # "pytorch" | "onnxruntime-cuda" | "onnxruntime-cuda-graph" (| "onnxruntime-cpu" in rehearsal)
    mode: str  # a TORCH_MODES entry, or the ONNX graphs' precision
    stage: str
    batch: int


def plans(modes, batch_sizes, with_ort: bool) -> "list[Plan]":
    """The bar first: the PyTorch modes in --modes order (eager before compiled: compilation is slow), then the
    package's graphs on ONNX Runtime (their export of the 307M prior takes a minute or two of CPU)."""
    out = []
    for mode in sorted(modes, key=lambda m: not m.startswith("eager")):
        out += [Plan("pytorch", mode, stage, batch) for batch in batch_sizes for stage in STAGES]
    if with_ort:
        for precision in ("fp32", "fp16"):
            out += [Plan("onnxruntime", precision, stage, batch) for batch in batch_sizes for stage in STAGES]
            out += [Plan("onnxruntime-cuda-graph", precision, "prior_step", batch) for batch in batch_sizes]
    return out


def run_plans(args, models: Models, log) -> list:
    started, rows, cache = time.perf_counter(), [], {}
    onnx_paths, workdir = None, tempfile.TemporaryDirectory(prefix="movq-gpu-bar-")
    ort_device = "cuda" if args.device == "cuda" else "cpu"
    for plan in plans(args.modes, args.batch_sizes, args.ort):
        row = {"backend": plan.backend, "mode": plan.mode, "stage": plan.stage, "batch": plan.batch}
        if plan.backend == "onnxruntime":
            row["backend"] = f"onnxruntime-{ort_device}"
        elapsed = time.perf_counter() - started
        if elapsed > args.deadline_s:
            rows.append({**row, "skipped": f"deadline: {elapsed:.0f} s > --deadline-s {args.deadline_s:g}"})
            continue
        try:
            if plan.backend.startswith("onnxruntime") and onnx_paths is None:
                onnx_paths = export_graphs(models, Path(workdir.name), log)
                models.movq.to(args.device), models.prior.to(args.device)
            if plan.backend == "onnxruntime-cuda-graph":
                if ort_device != "cuda":
                    raise RuntimeError("ONNX Runtime CUDA graphs need the CUDA provider")
                step = CudaGraphStep(onnx_paths[plan.mode]["prior"], prior_feeds(models, plan.batch))
                call = stage_call("prior_step", {"prior": step}, models, plan.batch, args.steps)
            else:
                key = (plan.backend, plan.mode)
                if key not in cache:
                    cache[key] = (ort_runners(onnx_paths[plan.mode], ort_device) if plan.backend == "onnxruntime"
                                  else torch_runners(models, plan.mode, args.device))
                call = stage_call(plan.stage, cache[key], models, plan.batch, args.steps)
            row.update(time_stage(call, args.budget_s, args.device))
            log(f"  {row['backend']:22s} {plan.mode:20s} {plan.stage:10s} batch {plan.batch:3d}: "
                f"p50 {row['p50_ms']:9.2f} ms (warm-up {row['warmup_s']:.1f} s)")
        except Exception as error:  # one failing mode must not hide the others' numbers
            row["skipped"] = f"failed: {type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
            log(f"  {row['backend']:22s} {plan.mode:20s} {plan.stage:10s} batch {plan.batch:3d}: {row['skipped']}")
        rows.append(row)
    workdir.cleanup()
    return rows


def table(rows: list, batch_sizes) -> str:
    lines = ["| backend | mode | batch | prior step ms | decode ms | sample ms | sample images/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    keys = list(dict.fromkeys((r["backend"], r["mode"]) for r in rows))
    for backend, mode in keys:
        for batch in batch_sizes:
            cells = {r["stage"]: r for r in rows if (r["backend"], r["mode"], r["batch"]) == (backend, mode, batch)}
            if not cells:
                continue
            ms = [f"{cells[s]['p50_ms']:.2f}" if "p50_ms" in cells.get(s, {}) else
                  ("skipped" if s in cells else "-") for s in STAGES]
            sample = cells.get("sample", {})
            rate = f"{batch / sample['p50_ms'] * 1e3:.1f}" if "p50_ms" in sample else "-"
            lines.append(f"| {backend} | {mode} | {batch} | {' | '.join(ms)} | {rate} |")
    skipped = [f"- {r['backend']} {r['mode']} {r['stage']} batch {r['batch']}: {r['skipped']}"
               for r in rows if "skipped" in r]
    return "\n".join(lines + ([""] + skipped if skipped else []))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="paper")
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated of {', '.join(TORCH_MODES)}")
    parser.add_argument("--no-ort", dest="ort", action="store_false", help="leave out the ONNX Runtime rows")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--budget-s", type=float, default=1.0, help="timed seconds per measurement (default 1)")
    parser.add_argument("--deadline-s", type=float, default=360.0,
                        help="start no measurement after this many seconds (default 360: done in ~8 minutes)")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.modes or any(m not in TORCH_MODES for m in args.modes):
        parser.error(f"--modes must name some of {', '.join(TORCH_MODES)}, got {','.join(args.modes)!r}")
    try:
        args.batch_sizes = sorted({int(b) for b in args.batch_sizes.split(",")})
    except ValueError:
        parser.error(f"--batch-sizes must be comma-separated positive ints, got {args.batch_sizes!r}")
    if args.batch_sizes[0] <= 0 or args.steps <= 0 or args.budget_s <= 0 or args.deadline_s <= 0:
        parser.error("--batch-sizes, --steps, --budget-s and --deadline-s must be positive")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (rehearse with --device cpu --config tiny)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.time()
    models = fresh_models(args.config, args.device)
    print(f"{args.config} models on {args.device}: prior {sum(p.numel() for p in models.prior.parameters()) / 1e6:.0f}M"
          f", tokenizer {models.movq.num_parameters() / 1e6:.1f}M parameters", flush=True)
    rows = run_plans(args, models, lambda line: print(line, flush=True))
    command = " ".join(["python benchmarks/gpu_bar.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    report = {"command": command, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "duration_s": round(time.time() - started, 1), "machine": machine_info(),
              "settings": {"config": args.config, "batch_sizes": args.batch_sizes, "steps": args.steps,
                           "modes": args.modes, "device": args.device, "budget_s": args.budget_s,
                           "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                           "tf32_conv": torch.backends.cudnn.allow_tf32},
              "results": rows}
    device = (report["machine"]["gpus"] or [report["machine"]["cpu_model"]])[0]
    text = (f"## GPU bar ({device}; {args.config}, {args.steps} steps)\n\n`{command}`\n\n"
            f"{table(rows, args.batch_sizes)}\n")
    return write_report(args.out, "gpu_bar", report, text)


if __name__ == "__main__":
    main()
