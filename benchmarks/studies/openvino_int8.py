"""int8 on OpenVINO, graph by graph: NNCF's graphs beside OpenVINO running ONNX Runtime's QDQ graphs, and bf16.

    python benchmarks/studies/openvino_int8.py [--engine-dir engines/ [--ckpt PATH]] [--graphs prior,decoder,encoder]
                                       [--batch-sizes 1,16] [--budget-s 1] [--out results/]

For each graph of an engine directory exported with --int8 (and the checkpoint it came from):
- "bf16": OpenVINO's bf16 of the fp32 graph with its fp32 ends (the package's bf16 path);
- "int8 nncf": NNCF's post-training quantization as the export makes it (movq_deploy.export.openvino_graphs),
  here for every graph asked for, including those the export leaves out;
- "int8 qdq": OpenVINO running a QDQ ONNX graph from onnxruntime's quantize_static: the encoder's and decoder's are
  the export's ONNX Runtime int8 graphs; the prior's is made here (benchmarks/studies/int8_prior_static.py's recipe);
- "ort int8": the export's ONNX Runtime int8 graph on ONNX Runtime (the package's other int8 path).
Per variant: p50 of one call at each batch size (all variants in turn), and the agreement with the fp32 graph on
the held-out data (the prior's top token on held-out states, the encoder's indices, the decoder's PSNR). Which
graphs the export quantizes for OpenVINO (openvino_graphs.INT8_GRAPHS) follows from this table. Writes
openvino_int8.json/.md to --out.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from benchmarks.machine import load_average, machine_info  # noqa: E402
from benchmarks.report import write_report  # noqa: E402
from benchmarks.subject import load_subject, stage_feeds  # noqa: E402
from benchmarks.timing import time_calls  # noqa: E402

STAGE_OF = {"prior": "prior_step", "decoder": "decode", "encoder": "encode"}


def variants(name: str, engines, spec, work: Path, images, states, memory) -> dict:
    """{variant: (runner, how it was made)} for graph `name`."""
    from benchmarks.studies.int8_prior_static import quantize_static_prior
    from movq_deploy.backends.onnxruntime import OnnxRuntimeRunner
    from movq_deploy.backends.openvino import OpenVinoRunner
    from movq_deploy.export.openvino_graphs import quantize_for_openvino

    fp32 = engines.verify(engines.graph("fp32", name))
    xml, _, figures = quantize_for_openvino(spec, work, images, states.get("calibration"), states.get("held_out"),
                                            memory)
    if name == "prior":
        qdq = work / "prior.qdq.onnx"
        quantize_static_prior(fp32, qdq, states["calibration"], "minmax", "uint8", work)
    else:
        qdq = engines.verify(engines.graph("int8", name))
    found = {"bf16": OpenVinoRunner(fp32, name, "bf16"), "int8 nncf": OpenVinoRunner(work / xml, name, "int8"),
             "int8 qdq": OpenVinoRunner(qdq, name, "int8")}
    ort_int8 = engines.graph("int8", name)
    if ort_int8 is not None:
        found["ort int8"] = OnnxRuntimeRunner(engines.verify(ort_int8))
    return found


def measure_graph(name: str, engines, spec, images, states, args, log, memory) -> dict:
    from movq_deploy.export.openvino_graphs import RunnerSession, held_out_figures

    with tempfile.TemporaryDirectory(prefix=f"ov-int8-{name}-") as folder:
        work = Path(folder)
        for graph in dict.fromkeys(("encoder", name)):  # the fp32 graphs it reads, under the export's names
            (work / f"{graph}.onnx").symlink_to(engines.verify(engines.graph("fp32", graph)).resolve())
        runners = variants(name, engines, spec, work, images, states, memory)
        agreement = {variant: held_out_figures(spec, work, RunnerSession(runner), images, states.get("held_out"),
                                               memory)
                     for variant, runner in runners.items()}
        feeds = {batch: stage_feeds(STAGE_OF[name], batch, engines, np.random.default_rng(batch))
                 for batch in args.batch_sizes}
        times = {variant: {} for variant in runners}
        for batch in args.batch_sizes:
            for variant, runner in runners.items():
                ms = 1e3 * float(np.median(time_calls(lambda: runner.run(feeds[batch]), args.budget_s, warmup=1,
                                                      min_repeats=2)))
                times[variant][batch] = ms
                log(f"{name:8s} {variant:10s} batch {batch:3d}: {ms:9.2f} ms")
    return {"p50_ms": times, "agreement": agreement}


def report_lines(command: str, results: dict, loads) -> "list[str]":
    lines = ["## int8 on OpenVINO (`benchmarks/studies/openvino_int8.py`)", "", f"`{command}`", "",
             f"Load average (1 min) {loads[0]} at start, {loads[1]} at end.", "",
             "| graph | variant | " + " | ".join(f"batch {b} ms" for b in results["batch_sizes"])
             + " | x bf16 (largest batch) | agreement with fp32 (held out) |", "|---|---|" + "---:|" *
             (len(results["batch_sizes"]) + 2)]
    for name, graph in results["graphs"].items():
        largest = str(max(results["batch_sizes"]))
        for variant, times in graph["p50_ms"].items():
            figures = graph["agreement"][variant]
            shown = ", ".join(f"{key} {value:.4g}" for key, value in figures.items()
                              if key in ("held_out_top_token_agreement", "index_agreement", "psnr_db"))
            speedup = graph["p50_ms"]["bf16"][largest] / times[largest]
            lines.append(f"| {name} | {variant} | " + " | ".join(f"{times[str(b)]:.2f}" for b in results["batch_sizes"])
                         + f" | {speedup:.2f} | {shown} |")
    return lines


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir")
    parser.add_argument("--ckpt")
    parser.add_argument("--graphs", default="prior,decoder,encoder")
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--budget-s", type=float, default=1.0)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    from movq_deploy.export.memory import GraphMemory
    from movq_deploy.export.pipeline import _prior_states
    from movq_deploy.export.quantize_images import ImageQuantConfig, load_image_sets
    from movq_deploy.export.specs import graph_specs

    loads = [load_average()]
    with tempfile.TemporaryDirectory(prefix="ov-int8-") as folder:
        engines, ckpt, movq, prior = load_subject(None, args.engine_dir, args.ckpt, Path(folder))
        import torch

        record = torch.load(ckpt, map_location="cpu", weights_only=True).get("record")
        images = load_image_sets(engines.image_size, ImageQuantConfig.calibration_images, None, record)
        specs = graph_specs(movq, prior)
        memory = GraphMemory.measure(specs)
        work = Path(folder) / "grids"
        work.mkdir()
        (work / "encoder.onnx").symlink_to(engines.verify(engines.graph("fp32", "encoder")).resolve())
        states = {part: _prior_states(specs["prior"], work, images, part, seed, memory)
                  for part, seed in (("calibration", 0), ("held_out", 1)) if part == "calibration" or len(images.held_out)}
        results = {"batch_sizes": args.batch_sizes, "graphs": {}}
        for name in args.graphs.split(","):
            graph = measure_graph(name, engines, specs[name], images, states if name == "prior" else {}, args, print,
                                  memory)
            results["graphs"][name] = {"p50_ms": {v: {str(b): t for b, t in times.items()}
                                                  for v, times in graph["p50_ms"].items()},
                                       "agreement": graph["agreement"]}
    loads.append(load_average())
    command = " ".join(["python benchmarks/studies/openvino_int8.py", *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    report = {"command": command, "machine": machine_info(), "load_average": loads, **results}
    lines = report_lines(command, results, [load and load[0] for load in loads])
    write_report(Path(args.out), "openvino_int8", report, "\n".join(lines) + "\n")
    return report


if __name__ == "__main__":
    main()
