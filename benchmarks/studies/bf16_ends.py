"""Where bf16 loses agreement with fp32, and which fp32 ends win it back: each graph cut differently on OpenVINO.

    python benchmarks/studies/bf16_ends.py [--engine-dir runs/demo/engines [--ckpt PATH]] [--out results/]

On a trained model (the digits demo's by default), each graph is compiled by OpenVINO with several choices of what
stays fp32 (every other op in bf16, OpenVINO's CPU plugin, one inference precision per compiled part) and compared
with the fp32 graph on the export's held-out data (movq_deploy.export.openvino_graphs.held_out_figures): the
prior's most likely token on held-out states, the encoder's indices of held-out crops, the decoder's PSNR on their
token grids. The package's choice is movq_deploy.backends.openvino.fp32_ends ("package" below). For the prior also
the sampled-token agreement (the draw at temperature 1), which the inverse-CDF draw makes more sensitive.
Writes bf16_ends.json/.md to --out.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from benchmarks.machine import machine_info  # noqa: E402
from benchmarks.report import write_report  # noqa: E402
from benchmarks.subject import load_subject  # noqa: E402


def cuts():
    """{graph: {variant: ends(model, graph) -> (prefix, suffix)}}: what stays fp32 in each variant."""
    from movq_deploy.backends.openvino import downstream, fp32_ends, from_last, upstream

    def nothing(model, graph):
        return set(), set()

    def head(model, graph):  # the sampling head only: from logits / temperature on
        return set(), downstream(model, {"temperature", "guidance_scale"})

    def from_matmul(count):
        return lambda model, graph: (set(), from_last(model, "MatMul", count))

    def after_convolutions(count, fourier):
        """The last `count` convolutions and what follows them (count 0: only what follows the last one)."""
        def ends(model, graph):
            if count:
                suffix = from_last(model, "Convolution", count)
            else:
                last = [op for op in model.get_ordered_ops() if op.get_type_name() == "Convolution"][-1]
                suffix = downstream(model, {last.get_friendly_name()})
            return (upstream(model, {"Sin", "Cos"}) - suffix if fourier else set()), suffix
        return ends

    return {
        "prior": {"all bf16": nothing, "sampling head fp32": head, "package: logits projection + head fp32":
                  fp32_ends, "last 2 MatMuls + head fp32": from_matmul(2), "last 5 MatMuls + head fp32":
                  from_matmul(5)},
        "encoder": {"all bf16": nothing, "search fp32 (after the last convolution)": after_convolutions(0, False),
                    "last convolution + search fp32": after_convolutions(1, False),
                    "package: last 2 convolutions + search fp32": fp32_ends},
        "decoder": {"all bf16": nothing, "Fourier phase + output tail fp32": after_convolutions(0, True),
                    "package: Fourier phase + last convolution + tail fp32": fp32_ends,
                    "last convolution + tail fp32, no Fourier phase": after_convolutions(1, False)},
    }


def sampled_agreement(reference, candidate, states: dict, mask_id: int) -> float:
    """Share of masked slots whose sampled token (temperature 1, the states' own noise) is the fp32 one."""
    masked = states["tokens"] == mask_id
    return float((reference.run(["sampled"], states)[0][masked] ==
                  candidate.run(["sampled"], states)[0][masked]).mean())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir")
    parser.add_argument("--ckpt")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    import torch

    from movq_deploy.backends.openvino import OpenVinoRunner
    from movq_deploy.export.openvino_graphs import RunnerSession, held_out_figures
    from movq_deploy.export.memory import GraphMemory
    from movq_deploy.export.pipeline import _prior_states
    from movq_deploy.export.quantize_images import ImageQuantConfig, load_image_sets
    from movq_deploy.export.specs import graph_specs
    from movq_deploy.export.validation import cpu_session

    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bf16-ends-") as folder:
        engines, ckpt, movq, prior = load_subject(None, args.engine_dir, args.ckpt, Path(folder))
        record = torch.load(ckpt, map_location="cpu", weights_only=True).get("record")
        images = load_image_sets(engines.image_size, ImageQuantConfig.calibration_images, None, record)
        specs, work = graph_specs(movq, prior), Path(folder) / "graphs"
        memory = GraphMemory.measure(specs)
        work.mkdir()
        for graph in ("encoder", "decoder", "prior"):
            (work / f"{graph}.onnx").symlink_to(engines.verify(engines.graph("fp32", graph)).resolve())
        held_out = _prior_states(specs["prior"], work, images, "held_out", seed=1, memory=memory)
        for graph, variants in cuts().items():
            for variant, ends in variants.items():
                runner = RunnerSession(OpenVinoRunner(work / f"{graph}.onnx", graph, "bf16", ends=ends))
                figures = held_out_figures(specs[graph], work, runner, images, held_out, memory)
                if graph == "prior":
                    figures["held_out_sampled_agreement"] = sampled_agreement(
                        cpu_session(work / "prior.onnx"), runner, held_out, engines.mask_id)
                figures["parts"] = runner.runner.part_precisions
                results.setdefault(graph, {})[variant] = figures
                print(f"{graph:8s} {variant:55s} {figures}", flush=True)
    command = " ".join(["python benchmarks/studies/bf16_ends.py",
                        *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    lines = ["## bf16 on OpenVINO: what to keep in fp32 (`benchmarks/studies/bf16_ends.py`)", "", f"`{command}`", "",
             "| graph | fp32 kept | compiled parts | agreement with fp32 on held-out data |", "|---|---|---|---|"]
    for graph, variants in results.items():
        for variant, figures in variants.items():
            shown = ", ".join(f"{key} {value:.4g}" for key, value in figures.items() if key in (
                "held_out_top_token_agreement", "held_out_sampled_agreement", "index_agreement", "psnr_db"))
            lines.append(f"| {graph} | {variant} | {' + '.join(figures['parts'])} | {shown} |")
    report = {"command": command, "machine": machine_info(), "results": results}
    return write_report(Path(args.out), "bf16_ends", report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
