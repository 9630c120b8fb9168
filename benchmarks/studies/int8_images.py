"""The int8 encoder and decoder against their fp32 graphs: speed at one batch size, decoded PSNR, index agreement.

    python benchmarks/studies/int8_images.py [--configs tiny,paper] [--ckpt PATH] [--batch 16] [--repeats 5]
                                     [--calibration-images 64] [--method minmax] [--fp32-zq-convs] [--out results/]

For each --configs size (freshly initialized models; `--ckpt` takes a trained checkpoint's tokenizer instead), the
fp32 encoder and decoder graphs are exported, then quantized as `export/to_onnx.py --int8` does
(movq_deploy.export.quantize_images: calibration on training crops of the tokenizer's data or scikit-image's
photographs, agreement on the held-out crops), with the quantization settings given here. fp32 and int8 calls take
turns at --batch, so both sides of each ratio share the machine's load; the ratio of the medians is the speed-up.
Per-call process CPU time is reported beside the wall time: on a shared machine it moves much less.
Writes int8_images.json and int8_images.md to --out.
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

from benchmarks.machine import load_average, machine_info  # noqa: E402
from movq_deploy.export.memory import GraphMemory  # noqa: E402
from movq_deploy.export.quantize_images import (  # noqa: E402
    ImageQuantConfig, load_image_sets, quantize_image_graphs, run_batched,
)
from movq_deploy.export.validation import cpu_session  # noqa: E402
from benchmarks.report import write_report  # noqa: E402

CONFIGS = {"tiny": "tiny", "paper": "paper-f16"}  # --configs -> MoVQ preset


def export_image_graphs(config: str, ckpt: "str | None", work: Path) -> "tuple[int, dict | None, GraphMemory]":
    """encoder.onnx and decoder.onnx of a fresh `config` tokenizer (or ckpt's) in work; (image size, ckpt record,
    their memory per image within the default budget)."""
    import torch

    from movq_deploy.export.onnx_graph import export_graph, finalize_graph
    from movq_deploy.export.specs import graph_specs, io_shapes
    from movq_deploy.models.checkpoint import load_models
    from movq_deploy.models.movq import MoVQ, MoVQConfig
    from movq_deploy.models.prior import MaskGITPrior, PriorConfig

    record = None
    if ckpt:
        movq, _, loaded = load_models(ckpt, with_prior=False)
        record = loaded.get("record")
    else:
        torch.manual_seed(0)
        movq = MoVQ(MoVQConfig.preset(CONFIGS[config])).eval()
    prior = MaskGITPrior(PriorConfig.preset("tiny", movq.config)).eval()  # graph_specs wants one; not exported
    specs = graph_specs(movq, prior)
    for name in ("encoder", "decoder"):
        export_graph(specs[name], work / f"{name}.onnx")
        finalize_graph(specs[name], work / f"{name}.onnx", io_shapes(specs[name]))
    return movq.config.image_size, record, GraphMemory.measure({name: specs[name] for name in ("encoder", "decoder")})


def time_pair(fp32_path: Path, int8_path: Path, feeds: dict, repeats: int) -> dict:
    """fp32 and int8 sessions called in turn `repeats` times after one warm-up each: medians of wall and CPU time."""
    from movq_deploy.backends.onnxruntime import OnnxRuntimeRunner

    runners = {"fp32": OnnxRuntimeRunner(fp32_path), "int8": OnnxRuntimeRunner(int8_path)}
    wall, cpu = {k: [] for k in runners}, {k: [] for k in runners}
    for runner in runners.values():
        runner.run(feeds)
    for _ in range(repeats):
        for key, runner in runners.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            runner.run(feeds)
            wall[key].append(time.perf_counter() - start)
            cpu[key].append(time.process_time() - start_cpu)
    row = {f"{key}_ms": float(np.median(wall[key]) * 1e3) for key in runners}
    row.update({f"{key}_cpu_ms": float(np.median(cpu[key]) * 1e3) for key in runners})
    row["speedup"] = row["fp32_ms"] / row["int8_ms"]
    row["cpu_speedup"] = row["fp32_cpu_ms"] / row["int8_cpu_ms"]
    return row


def measure(config: str, args, quant: ImageQuantConfig, log) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"movq-int8-images-{config}-") as tmp:
        work = Path(tmp)
        tick = time.perf_counter()
        size, record, memory = export_image_graphs(config, args.ckpt, work)
        images = load_image_sets(size, quant.calibration_images, args.calibration_data, record)
        if args.held_out:
            images.held_out = images.held_out[:args.held_out]
        scratch = work / "scratch"
        scratch.mkdir()
        figures = quantize_image_graphs(work, scratch, images, quant, memory)
        log(f"{config}: exported and quantized in {time.perf_counter() - tick:.0f} s")
        batch = images.held_out[np.arange(args.batch) % len(images.held_out)]
        tokens = run_batched(cpu_session(work / "encoder.onnx"), "image", batch,
                             memory.rows("encoder", "encoding the timed batch"))
        timings = {"decode": time_pair(work / "decoder.onnx", work / "decoder.int8.onnx", {"indices": tokens},
                                       args.repeats),
                   "encode": time_pair(work / "encoder.onnx", work / "encoder.int8.onnx", {"image": batch},
                                       args.repeats)}
    for stage, row in timings.items():
        log(f"{config} {stage} batch {args.batch}: fp32 {row['fp32_ms']:.1f} ms, int8 {row['int8_ms']:.1f} ms "
            f"({row['speedup']:.2f}x; CPU time {row['cpu_speedup']:.2f}x)")
    return {"timings": timings, "figures": figures, "image_size": size}


def report_lines(command: str, args, results: dict, loads) -> "list[str]":
    lines = ["## int8 encoder and decoder vs fp32 (ONNX Runtime CPU)", "", f"`{command}`", "",
             f"Batch {args.batch}, {args.repeats} calls each in turn; load average (1 min) {loads[0]} at start, "
             f"{loads[1]} at end.", "",
             "| config | stage | fp32 ms | int8 ms | speed-up (wall) | speed-up (CPU time) | agreement vs fp32 |",
             "|---|---|---:|---:|---:|---:|---|"]
    for config, result in results.items():
        figures = result["figures"]
        agreement = {"decode": f"PSNR {figures['decoder']['psnr_db']:.1f} dB (worst image "
                               f"{figures['decoder']['worst_image_psnr_db']:.1f})",
                     "encode": f"{figures['encoder']['index_agreement']:.1%} of indices"}
        for stage, row in result["timings"].items():
            lines.append(f"| {config} | {stage} | {row['fp32_ms']:.1f} | {row['int8_ms']:.1f} | {row['speedup']:.2f}x"
                         f" | {row['cpu_speedup']:.2f}x | {agreement[stage]} |")
    lines += ["", "Targets: int8 decode >= 1.8x fp32 at batch 16; decoded PSNR >= 35 dB; index agreement >= 97%."]
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="tiny,paper", help="comma-separated of tiny, paper")
    parser.add_argument("--ckpt", help="a trained checkpoint's tokenizer instead of fresh weights (one config)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--held-out", type=int, default=0, help="use only this many held-out crops (0: all)")
    parser.add_argument("--calibration-data", help="image folder (default: the tokenizer's data or skimage's)")
    parser.add_argument("--calibration-images", type=int, default=ImageQuantConfig.calibration_images)
    parser.add_argument("--calibration-batch", type=int, default=ImageQuantConfig.calibration_batch)
    parser.add_argument("--method", default=ImageQuantConfig.method)
    parser.add_argument("--encoder-fp32-final-convs", type=int, default=ImageQuantConfig.encoder_fp32_final_convs)
    parser.add_argument("--decoder-fp32-final-convs", type=int, default=ImageQuantConfig.decoder_fp32_final_convs)
    parser.add_argument("--fp32-zq-convs", action="store_true", help="keep the decoder's convolutions of z_q fp32")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    configs = [c for c in args.configs.split(",") if c]
    if not configs or any(c not in CONFIGS for c in configs) or (args.ckpt and len(configs) != 1):
        parser.error(f"--configs must name some of {', '.join(CONFIGS)} (one with --ckpt), got {args.configs!r}")
    if args.batch <= 0 or args.repeats <= 0:
        parser.error("--batch and --repeats must be positive")
    try:
        quant = ImageQuantConfig(args.calibration_images, args.calibration_batch, args.method,
                                 args.encoder_fp32_final_convs, args.decoder_fp32_final_convs, args.fp32_zq_convs)
    except ValueError as error:
        parser.error(str(error))
    started, machine = time.time(), machine_info()
    results = {config: measure(config, args, quant, lambda line: print(line, flush=True)) for config in configs}
    command = " ".join(["python benchmarks/studies/int8_images.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    machine["load_average_at_end"] = load_average()
    loads = [(machine[k] or ["-"])[0] for k in ("load_average_at_start", "load_average_at_end")]
    report = {"command": command, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
              "duration_s": round(time.time() - started, 1), "machine": machine, "results": results}
    text = "\n".join(report_lines(command, args, results, loads)) + "\n"
    return write_report(args.out, "int8_images", report, text)


if __name__ == "__main__":
    main()
