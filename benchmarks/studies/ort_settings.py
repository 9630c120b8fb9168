"""What ONNX Runtime already offers for the CPU, measured: the settings behind the runtime's defaults.

    python benchmarks/studies/ort_settings.py [--engine-dir engines/ --ckpt PATH | --config tiny|paper]
                                      [--batch-sizes 1,8] [--budget-s 1] [--out results/]

Times the prior step (and the decoder) under each setting against PyTorch eager fp32 with the same threads:
graph optimization levels, ONNX Runtime's transformer optimizer (BERT attention/LayerNorm/GELU fusions), intra-op
threads, thread spinning, I/O binding with preallocated outputs, and dynamic int8 quantization variants (each
with the share of masked slots whose most likely token agrees with fp32's). Writes ort_settings.json/.md to --out.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort
import torch

from movq_deploy.backends.onnxruntime import physical_cores
from movq_deploy.files import atomic_write_text
from movq_deploy.manifest import EngineDir

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: make `benchmarks` importable
from benchmarks.flops import prior_step_flops  # noqa: E402
from movq_deploy.export.flops import counted_flops  # noqa: E402
from benchmarks.machine import gemm_rate, load_average, machine_info  # noqa: E402
from benchmarks.subject import CONFIGS, agreement_feeds, load_subject, stage_feeds  # noqa: E402
from benchmarks.timing import summarize, time_calls  # noqa: E402
from benchmarks.torch_peers import TorchPeer  # noqa: E402

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session(path: Path, level: str = "all", threads: int = 0, spinning: bool = True,
            fixed_batch: "int | None" = None, block_base: "int | None" = None) -> ort.InferenceSession:
    """A CPU session; `fixed_batch` pins the symbolic batch axis (shapes become static: ONNX Runtime can fold
    the shape arithmetic and plan memory once), `block_base` sets the thread pool's dynamic block base."""
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:  # idle worker threads sleep instead of busy-waiting for the next op
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if fixed_batch is not None:
        options.add_free_dimension_override_by_name("batch", fixed_batch)
    if block_base is not None:
        options.add_session_config_entry("session.dynamic_block_base", str(block_base))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def io_bound_call(sess: ort.InferenceSession, feeds: dict):
    """A call with inputs bound once as OrtValues and outputs preallocated: no per-call copies or allocations."""
    binding = sess.io_binding()
    for name, array in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array)))
    for output in sess.get_outputs():
        binding.bind_output(output.name, "cpu")
    sess.run_with_iobinding(binding)  # first run allocates the outputs; bind them so later runs reuse them
    for output, value in zip(sess.get_outputs(), binding.get_outputs()):
        binding.bind_ortvalue_output(output.name, value)
    return lambda: sess.run_with_iobinding(binding)


def head_matmuls(path: Path, head_shape: "tuple[int, int]") -> "list[str]":
    """Names of the MatMul nodes whose weight has the output head's shape (width, c*K)."""
    import onnx

    model = onnx.load(str(path))
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and any(shapes.get(name) == head_shape for name in node.input)]


def quantize_variant(fp32_path: Path, out: Path, heads: int, width: int, fuse: bool, prepare: bool,
                     per_channel: bool, fp32_head: "tuple[int, int] | None" = None) -> Path:
    """onnxruntime.quantization.quantize_dynamic (int8 weights, uint8 activations quantized at run time);
    `fp32_head` = the head weight's shape keeps that MatMul (the logits) in fp32."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    source = fp32_path
    if fuse:
        source, _ = fused_variant(source, out.with_suffix(".fused.onnx"), heads, width)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if prepare:
            prepared = out.with_suffix(".prepared.onnx")
            quant_pre_process(str(source), str(prepared))
            source = prepared
        excluded = head_matmuls(source, fp32_head) if fp32_head else None
        quantize_dynamic(str(source), str(out), weight_type=QuantType.QInt8, per_channel=per_channel,
                         nodes_to_exclude=excluded)
    return out


def fused_variant(fp32_path: Path, out: Path, heads: int, width: int) -> "tuple[Path, dict]":
    from onnxruntime.transformers.optimizer import optimize_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = optimize_model(str(fp32_path), model_type="bert", num_heads=heads, hidden_size=width, opt_level=0)
    fused.save_model_to_file(str(out))
    return out, {op: n for op, n in fused.get_fused_operator_statistics().items() if n}


def top_token_agreement(reference: ort.InferenceSession, candidate: ort.InferenceSession, engines: EngineDir) -> float:
    """Most likely token (temperature 1e-4 makes the draw an argmax) of masked slots: half-masked random states
    and the all-masked first step, 8 images each."""
    n = engines.grid.num_slots
    tokens = np.random.default_rng(0).integers(0, engines.codebook_size, (8, n), dtype=np.int32)
    feeds, masked = agreement_feeds(engines, tokens)
    ref, cand = reference.run(["sampled"], feeds)[0], candidate.run(["sampled"], feeds)[0]
    return float((ref[masked] == cand[masked]).mean())


def prior_variants(prior_path: Path, engine_dir: Path, graphs: dict, prior, threads: int, tmp: Path) \
        -> "tuple[dict[str, Callable[[int], ort.InferenceSession]], dict]":
    """The prior-step sessions to time, by name: each a maker (batch) -> session; and the BERT fusions applied."""
    heads, width = prior.config.heads, prior.config.width
    fused_path, fusions = fused_variant(prior_path, tmp / "prior.fused.onnx", heads, width)
    int8_variants = {
        "int8 per-channel, fused + pre-process (export's recipe)": dict(fuse=True, prepare=True, per_channel=True),
        "int8 per-channel, unfused": dict(fuse=False, prepare=True, per_channel=True),
        "int8 per-tensor, fused": dict(fuse=True, prepare=True, per_channel=False),
        "int8 per-channel, fused, output head fp32": dict(
            fuse=True, prepare=True, per_channel=True, fp32_head=(width, prior.config.c * prior.config.codebook_size)),
    }
    variants = {
        "fp32 opt disable": lambda batch: session(prior_path, "disable", threads),
        "fp32 opt basic": lambda batch: session(prior_path, "basic", threads),
        "fp32 opt extended": lambda batch: session(prior_path, "extended", threads),
        "fp32 opt all (runtime default)": lambda batch: session(prior_path, "all", threads),
        "fp32 opt all, 1 thread": lambda batch: session(prior_path, "all", 1),
        "fp32 opt all, no spinning": lambda batch: session(prior_path, "all", threads, spinning=False),
        "fp32 BERT-fused + opt all": lambda batch: session(fused_path, "all", threads),
        "fp32 opt all, batch axis fixed": lambda batch: session(prior_path, "all", threads, fixed_batch=batch),
        "fp32 opt all, dynamic block base 4": lambda batch: session(prior_path, "all", threads, block_base=4),
    }
    for name, options in int8_variants.items():
        path = quantize_variant(prior_path, tmp / f"prior.int8.{len(variants)}.onnx", heads, width, **options)
        variants[name] = lambda batch, path=path: session(path, "all", threads)
    if "int8" in graphs:
        int8_path = engine_dir / graphs["int8"]["prior"]["file"]
        variants["int8 from the engine dir"] = lambda batch: session(int8_path, "all", threads)
    return variants, fusions


class Recorder:
    """Times a call until the budget and keeps its row: p50 and friends, GFLOP/s and the share of the GEMM rate."""

    def __init__(self, budget_s: float, gemm_flops: float):
        self.budget_s, self.gemm_flops, self.rows = budget_s, gemm_flops, []

    def __call__(self, graph: str, variant: str, batch: int, fn, flops: float, agreement=None) -> None:
        stats = summarize(time_calls(fn, self.budget_s), batch)
        row = {"graph": graph, "variant": variant, "batch": batch, **stats,
               "gflops_per_s": flops / (stats["p50_ms"] / 1e3) / 1e9,
               "gemm_fraction": flops / (stats["p50_ms"] / 1e3) / self.gemm_flops}
        if agreement is not None:
            row["top_token_agreement"] = agreement
        self.rows.append(row)
        print(f"{graph:7s} {variant:58s} batch {batch:3d}: p50 {stats['p50_ms']:8.2f} ms "
              f"{row['gemm_fraction']:5.0%} of GEMM" + (f"  agreement {agreement:.1%}" if agreement else ""))


def time_prior(record: Recorder, batch: int, engines: EngineDir, eager: TorchPeer, prior_config, variants: dict,
               reference: ort.InferenceSession) -> None:
    feeds = stage_feeds("prior_step", batch, engines, np.random.default_rng(batch))
    flops = prior_step_flops(prior_config, batch)["total"]
    torch_feeds = dict(feeds)
    record("prior", "pytorch eager fp32", batch, lambda: eager.runners["prior"].run(torch_feeds), flops)
    for variant, make in variants.items():
        sess = make(batch)
        agreement = top_token_agreement(reference, sess, engines) if variant.startswith("int8") else None
        record("prior", variant, batch, lambda: sess.run(None, feeds), flops, agreement)
        if variant.startswith("fp32 opt all (runtime"):
            record("prior", "fp32 opt all + I/O binding", batch, io_bound_call(sess, feeds), flops)


def time_decoder(record: Recorder, batch: int, engines: EngineDir, eager: TorchPeer, decoder_path: Path,
                 threads: int) -> None:
    feeds = stage_feeds("decode", batch, engines, np.random.default_rng(batch))
    flops = batch * counted_flops(lambda: eager.runners["decoder"].run(
        stage_feeds("decode", 1, engines, np.random.default_rng(0))))
    record("decoder", "pytorch eager fp32", batch, lambda: eager.runners["decoder"].run(feeds), flops)
    for level in ("disable", "basic", "extended", "all"):
        sess = session(decoder_path, level, threads)
        record("decoder", f"fp32 opt {level}", batch, lambda: sess.run(None, feeds), flops)
    sess = session(decoder_path, "all", 1)
    record("decoder", "fp32 opt all, 1 thread", batch, lambda: sess.run(None, feeds), flops)


def settings_table(rows: list) -> str:
    """The Markdown table; adds each row's speed-up over PyTorch eager at its graph and batch."""
    for row in rows:
        base = next(r for r in rows if (r["graph"], r["batch"], r["variant"]) ==
                    (row["graph"], row["batch"], "pytorch eager fp32"))
        row["speedup_vs_eager"] = base["p50_ms"] / row["p50_ms"]
    lines = ["| graph | variant | batch | p50 ms | x eager | % GEMM | top-token agreement |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        agreement = f"{row['top_token_agreement']:.1%}" if "top_token_agreement" in row else ""
        lines.append(f"| {row['graph']} | {row['variant']} | {row['batch']} | {row['p50_ms']:.2f} | "
                     f"{row['speedup_vs_eager']:.2f} | {row['gemm_fraction']:.0%} | {agreement} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir", help="engine directory (default: as benchmarks/latency.py)")
    parser.add_argument("--ckpt")
    parser.add_argument("--config", choices=sorted(CONFIGS))
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--budget-s", type=float, default=1.0)
    parser.add_argument("--out", default="results")
    parser.add_argument("--skip-decoder", action="store_true")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    threads = physical_cores() or torch.get_num_threads()
    torch.set_num_threads(threads)

    with tempfile.TemporaryDirectory(prefix="movq-ort-settings-") as tmp:
        engines, ckpt, movq, prior = load_subject(args.config, args.engine_dir, args.ckpt, Path(tmp))
        engine_dir, graphs = engines.path, engines.graphs
        prior_path = engine_dir / graphs["fp32"]["prior"]["file"]
        eager = TorchPeer(movq, prior, mode="eager")
        gemm = gemm_rate(threads, budget_s=2.0)
        record = Recorder(args.budget_s, gemm["cpu_fp32_gflops"] * 1e9)
        variants, fusions = prior_variants(prior_path, engine_dir, graphs, prior, threads, Path(tmp))
        reference = session(prior_path, "all", threads)
        for batch in batch_sizes:
            time_prior(record, batch, engines, eager, prior.config, variants, reference)
            if not args.skip_decoder:
                time_decoder(record, batch, engines, eager, engine_dir / graphs["fp32"]["decoder"]["file"], threads)

    table = settings_table(record.rows)
    print("\n" + table)
    report = {"machine": {**machine_info(), "load_average_at_end": load_average()}, "threads": threads,
              "gemm": gemm, "bert_fusions": fusions, "model": args.config or str(ckpt), "rows": record.rows}
    out = Path(args.out)
    atomic_write_text(out / "ort_settings.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out / "ort_settings.md", f"BERT fusions: {fusions}\n\n{table}\n")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"ort_settings.py: {error}")
