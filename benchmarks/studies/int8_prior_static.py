"""int8 prior-step graphs, three ways: agreement with fp32, step time, and batch independence.

    python benchmarks/studies/int8_prior_static.py [--engine-dir engines/ [--ckpt PATH] | --config paper]
                                           [--methods percentile|none] [--activations uint8] [--skip-agreement]
                                           [--batch-sizes 1,16,64] [--rounds 5] [--budget-s 0.3] [--out results/]

From the same fp32 prior-step graphs (prior, and prior_guided for a class-conditional prior):
- "dynamic": ONNX Runtime's quantize_dynamic after the export's fusions (the earlier int8 export): each activation's
  scale is computed over the whole call, so an image's tokens can change with its batchmates;
- "static (export)": what `export/to_onnx.py --int8` writes now (movq_deploy.export.quantize_prior): the same
  kernels with activation scales fixed at export;
- "QDQ <method> <activations>": onnxruntime's quantize_static (QDQ, per-channel int8 weights, the MatMuls with a
  constant weight only; the sampling tail from logits / temperature on and every norm/softmax/GELU stay fp32).
Per variant:
- top-token agreement with the fp32 graph: the share of masked slots whose most likely token (temperature 1e-4) is
  fp32's, on held-out states (the tokenizer's held-out images encoded by the fp32 encoder, masked along the
  MaskGIT cosine schedule, with their labels and the null class; guidance scales 0/1/3 for prior_guided);
- the step time at each --batch-sizes (all slots masked), every variant called in turn, round after round;
- batch independence: each of 8 held-out states run alone and inside the batch of 8: are `sampled` and
  `confidence` bit-identical?
Calibration states come from the tokenizer's training crops the same way. With --config paper (random weights:
speed only) the grids are random tokens. Writes int8_prior_static.json/.md to --out.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from benchmarks.machine import load_average, machine_info  # noqa: E402
from benchmarks.report import write_report  # noqa: E402
from benchmarks.timing import time_calls  # noqa: E402
from movq_deploy import contract  # noqa: E402
from movq_deploy.export.memory import GraphMemory  # noqa: E402
from movq_deploy.export.quantize_prior import (  # noqa: E402
    CALIBRATION_GRIDS, FeedsReader, prior_states, take, top_token_agreement,
)

METHODS = ("minmax", "percentile", "entropy")
ACTIVATIONS = ("uint8", "int8")
INDEPENDENCE_BATCH = 8


def quantize_static_prior(fp32_path: Path, path: Path, calibration: dict, method: str, activation: str,
                          scratch: Path) -> None:
    """quantize_static's QDQ graph of the prior-step graph fp32_path (after the BERT fusions but Attention):
    per-channel int8 weights of the MatMuls with a constant weight, their outputs left in fp32."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    from movq_deploy.export.precision import fp16_tail

    fused, prepared = scratch / f"{path.stem}.fused.onnx", scratch / f"{path.stem}.prepared.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fuse_without_attention(fp32_path, fused)
        quant_pre_process(str(fused), str(prepared))
    model = onnx.load(str(prepared))
    for index, node in enumerate(model.graph.node):  # nodes_to_exclude selects by name
        node.name = node.name or f"{node.op_type}_{index}"
    onnx.save(model, str(prepared))
    tail = fp16_tail("prior", model)  # from logits / temperature (and guidance_scale) on
    weights = {tensor.name for tensor in model.graph.initializer}
    tail += [node.name for node in model.graph.node  # activation x activation (attention scores and mix): fp32
             if node.op_type == "MatMul" and node.input[1] not in weights]
    calibrate = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
                 "entropy": CalibrationMethod.Entropy}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(
            str(prepared), str(path), FeedsReader(calibration, 16), quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"], per_channel=True, weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8 if activation == "uint8" else QuantType.QInt8,
            nodes_to_exclude=tail, calibrate_method=calibrate,
            # Requantizing the MatMul outputs (QLinearMatMul) cost 3 points of agreement on the digits prior.
            extra_options={"MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": ["MatMul"],
                           "WeightSymmetric": True, "ActivationSymmetric": activation == "int8"},
        )
    onnx.checker.check_model(onnx.load(str(path)))


def fuse_without_attention(fp32_path: Path, path: Path) -> None:
    """ONNX Runtime's BERT fusions (LayerNormalization, BiasGelu) but not Attention, whose QDQ form is not
    quantized, nor SkipLayerNormalization (slower on the CPU than LayerNormalization + Add)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = options.enable_skip_layer_norm = options.enable_bias_skip_layer_norm = False
    # num_heads / hidden_size only matter to the Attention fusion
    fused = optimize_model(str(fp32_path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0,
                           optimization_options=options)
    fused.save_model_to_file(str(path))


def batch_independence(session, feeds: dict) -> dict:
    """Each of the first INDEPENDENCE_BATCH states alone vs inside that batch: bit-identical outputs?"""
    batch = take(feeds, slice(0, INDEPENDENCE_BATCH))
    together = session.run(list(contract.PRIOR_OUTPUTS), batch)
    sampled_same = confidence_same = 0
    for row in range(INDEPENDENCE_BATCH):
        alone = session.run(list(contract.PRIOR_OUTPUTS), take(batch, [row]))
        sampled_same += bool(np.array_equal(alone[0][0], together[0][row]))
        confidence_same += bool(np.array_equal(alone[1][0], together[1][row]))
    return {"rows": INDEPENDENCE_BATCH, "sampled_identical": sampled_same, "confidence_identical": confidence_same}


def time_rounds(paths: dict, feeds_at: dict, rounds: int, budget_s: float) -> dict:
    """{variant: {batch: median over rounds of the p50 ms}}: every variant at every batch once per round, in turn."""
    from movq_deploy.backends.onnxruntime import OnnxRuntimeRunner

    runners = {variant: OnnxRuntimeRunner(path) for variant, path in paths.items()}
    p50s = {variant: {batch: [] for batch in feeds_at} for variant in paths}
    for _ in range(rounds):
        for batch, feeds in feeds_at.items():
            for variant, runner in runners.items():
                times = time_calls(lambda: runner.run(feeds), budget_s, warmup=1, min_repeats=3)
                p50s[variant][batch].append(float(np.median(times)) * 1e3)
    return {variant: {batch: float(np.median(values)) for batch, values in by_batch.items()}
            for variant, by_batch in p50s.items()}


def trained_subject(engine_dir: Path, ckpt: "str | None", calibration_images: int, work: Path):
    """(prior-step specs, calibration and held-out (token grids, labels)) of a trained engine directory: its fp32
    prior-step graphs copied to `work`, the grids the tokenizer's data encoded by its fp32 encoder graph."""
    from benchmarks.subject import resolve_ckpt
    from movq_deploy.export.quantize_images import load_image_sets
    from movq_deploy.export.specs import graph_specs
    from movq_deploy.manifest import EngineDir
    from movq_deploy.models.checkpoint import load_models

    engines = EngineDir.load(engine_dir)
    movq, prior, loaded = load_models(resolve_ckpt(ckpt, engines))
    every = graph_specs(movq, prior)
    specs = {name: spec for name, spec in every.items() if name in contract.PRIOR_GRAPHS}
    for name in specs:
        (work / f"{name}.onnx").write_bytes((engine_dir / f"{name}.onnx").read_bytes())
    images = load_image_sets(engines.image_size, calibration_images, record=loaded.get("record"))
    encoder, memory = engine_dir / "encoder.onnx", GraphMemory.measure({"encoder": every["encoder"]})
    return specs, (images.token_grids(encoder, "calibration", memory), images.calibration_labels), \
        (images.token_grids(encoder, "held_out", memory), images.held_out_labels)


def paper_subject(calibration_images: int, work: Path):
    """The paper-size prior with random weights (speed only): its fp32 prior-step graph in `work`; random grids."""
    import torch

    from movq_deploy.export.onnx_graph import export_graph, finalize_graph
    from movq_deploy.export.specs import graph_specs, io_shapes
    from movq_deploy.models.movq import MoVQ, MoVQConfig
    from movq_deploy.models.prior import MaskGITPrior, PriorConfig

    torch.manual_seed(0)
    movq_config = MoVQConfig.preset("paper-f16")
    prior = MaskGITPrior(PriorConfig.preset("paper", movq_config)).eval()
    spec = graph_specs(MoVQ(movq_config).eval(), prior)["prior"]
    export_graph(spec, work / "prior.onnx")
    finalize_graph(spec, work / "prior.onnx", io_shapes(spec))
    rng, config = np.random.default_rng(7), prior.config

    def random_grids(count):
        return rng.integers(0, config.codebook_size, (count, config.num_slots)), rng.integers(0, 10, count)

    return {"prior": spec}, random_grids(calibration_images), random_grids(8)


def write_variants(spec, work: Path, calibration_feeds: dict, args, log, memory) -> dict:
    """{variant: path}: fp32, ONNX Runtime's dynamic quantization (the earlier export), the export's static
    activation scales, and quantize_static's QDQ graphs for each --methods x --activations."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from movq_deploy.export.precision import prepare_int8_prior, quantize_int8

    name, scratch = spec.name, work / f"{spec.name}.scratch"
    scratch.mkdir()
    paths = {"fp32": work / f"{name}.onnx", "dynamic": work / f"{name}.dynamic.onnx",
             "static (export)": work / f"{name}.int8.onnx"}
    prepared, _ = prepare_int8_prior(spec, paths["fp32"], scratch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_dynamic(str(prepared), str(paths["dynamic"]), weight_type=QuantType.QInt8, per_channel=True)
    tick = time.perf_counter()
    quantize_int8(spec, paths["fp32"], paths["static (export)"], scratch, calibration_feeds,
                  memory.rows(name, "calibrating", every_tensor=True, most=16))
    log(f"{name}: static (export) calibrated in {time.perf_counter() - tick:.0f} s")
    for method in args.methods:
        for activation in args.activations:
            tick = time.perf_counter()
            path = work / f"{name}.qdq-{method}-{activation}.onnx"
            quantize_static_prior(paths["fp32"], path, calibration_feeds, method, activation, scratch)
            paths[f"QDQ {method} {activation}"] = path
            log(f"{name}: QDQ {method} {activation} calibrated in {time.perf_counter() - tick:.0f} s")
    return paths


def measure_graph(spec, work: Path, calibration, held_out, args, log) -> dict:
    from movq_deploy.export.validation import cpu_session

    config, guided = spec.module.step.prior.config, spec.name == contract.GUIDED_PRIOR
    calibration_feeds = prior_states(*calibration, config, guided, np.random.default_rng(0))
    held_feeds = prior_states(*held_out, config, guided, np.random.default_rng(1))
    held_feeds = take(held_feeds, np.random.default_rng(2).permutation(len(held_feeds["tokens"])))  # mixed
    memory = GraphMemory.measure({spec.name: spec})
    paths = write_variants(spec, work, calibration_feeds, args, log, memory)
    sessions = {variant: cpu_session(path) for variant, path in paths.items()}
    rows = {}
    for variant, session in sessions.items():
        rows[variant] = {"independence": batch_independence(session, held_feeds)}
        if variant != "fp32" and not args.skip_agreement:
            rows[variant]["top_token_agreement"] = top_token_agreement(
                sessions["fp32"], session, held_feeds, config.mask_id, memory.rows(spec.name, "comparing", most=64))
        log(f"{spec.name} {variant}: {rows[variant]}")
    del sessions
    first_step = {}
    for batch in args.batch_sizes:
        rows_at = np.arange(batch) % len(held_out[0])
        first_step[batch] = prior_states(held_out[0][rows_at], held_out[1][rows_at], config, guided,
                                         np.random.default_rng(batch), steps=1)
    timings = time_rounds(paths, first_step, args.rounds, args.budget_s)
    for variant, by_batch in timings.items():
        rows[variant]["step_ms"] = by_batch
        log(f"{spec.name} {variant} step ms: " + ", ".join(f"b{b} {ms:.2f}" for b, ms in by_batch.items()))
    return {"states": {"calibration": len(calibration_feeds["tokens"]), "held_out": len(held_feeds["tokens"])},
            "variants": rows}


def report_lines(command: str, subject: str, results: dict, loads) -> "list[str]":
    batches = sorted({b for graph in results.values() for row in graph["variants"].values() for b in row["step_ms"]})
    lines = [f"## int8 prior step: static vs dynamic quantization ({subject})", "", f"`{command}`", "",
             f"Load average (1 min) {loads[0]} at start, {loads[1]} at end. Step time: p50 ms, median over rounds.",
             "", "| graph | variant | top-token agreement | rows bit-independent (sampled / confidence) | "
             + " | ".join(f"batch {b} ms" for b in batches) + " |",
             "|---|---|---:|---|" + "---:|" * len(batches)]
    for graph, result in results.items():
        for variant, row in result["variants"].items():
            agreement = row.get("top_token_agreement")
            independence = row["independence"]
            lines.append(f"| {graph} | {variant} | {'-' if agreement is None else f'{agreement:.1%}'} | "
                         f"{independence['sampled_identical']}/{independence['rows']} / "
                         f"{independence['confidence_identical']}/{independence['rows']} | "
                         + " | ".join(f"{row['step_ms'][b]:.2f}" for b in batches) + " |")
    return lines


def parse_list(text: str, allowed=None, cast=str) -> list:
    values = [cast(v) for v in text.split(",") if v]
    if not values or (allowed and any(v not in allowed for v in values)):
        of = f" of {', '.join(allowed)}" if allowed else ""
        raise ValueError(f"{text!r}: expected a comma-separated list{of}")
    return values


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir", help="a trained engine directory exported with --int8 (default: engines/)")
    parser.add_argument("--ckpt", help="its checkpoint (default: the one its manifest names, beside it)")
    parser.add_argument("--config", choices=["paper"], help="the paper-size prior with random weights (speed only)")
    parser.add_argument("--methods", default="percentile",
                        help=f"quantize_static (QDQ) calibrations to compare, comma-separated of {', '.join(METHODS)}, "
                             "or none (at paper size its calibration outgrew 24 GB)")
    parser.add_argument("--activations", default="uint8", help=f"comma-separated of {', '.join(ACTIVATIONS)}")
    parser.add_argument("--calibration-images", type=int, default=CALIBRATION_GRIDS,
                        help="training crops whose token grids calibrate (default: as the export)")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--skip-agreement", action="store_true", help="no top-token agreement (random weights)")
    parser.add_argument("--budget-s", type=float, default=0.3, help="timing budget per variant, batch and round")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    try:
        args.methods = [] if args.methods == "none" else parse_list(args.methods, METHODS)
        args.activations = parse_list(args.activations, ACTIVATIONS)
        args.batch_sizes = parse_list(args.batch_sizes, cast=int)
    except ValueError as error:
        parser.error(str(error))
    if args.config and (args.engine_dir or args.ckpt):
        parser.error("--config takes fresh weights: leave out --engine-dir and --ckpt")
    if args.rounds <= 0 or args.budget_s <= 0 or args.calibration_images <= 0 or min(args.batch_sizes) <= 0:
        parser.error("--rounds, --budget-s, --calibration-images and --batch-sizes must be positive")
    log = lambda line: print(line, flush=True)  # noqa: E731
    started, machine = time.time(), machine_info()
    with tempfile.TemporaryDirectory(prefix="movq-int8-prior-") as tmp:
        work = Path(tmp)
        if args.config:
            specs, calibration, held_out = paper_subject(args.calibration_images, work)
            subject = "paper-size prior, random weights: speed only"
        else:
            from benchmarks.subject import default_engine_dir

            engine_dir = Path(args.engine_dir) if args.engine_dir else default_engine_dir()
            specs, calibration, held_out = trained_subject(engine_dir, args.ckpt, args.calibration_images, work)
            subject = str(engine_dir)
        results = {name: measure_graph(spec, work, calibration, held_out, args, log) for name, spec in specs.items()}
    command = " ".join(["python benchmarks/studies/int8_prior_static.py",
                        *map(shlex.quote, sys.argv[1:] if argv is None else argv)])
    machine["load_average_at_end"] = load_average()
    loads = [(machine[k] or ["-"])[0] for k in ("load_average_at_start", "load_average_at_end")]
    report = {"command": command, "subject": subject, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                  time.gmtime(started)),
              "duration_s": round(time.time() - started, 1), "machine": machine, "results": results}
    text = "\n".join(report_lines(command, subject, results, loads)) + "\n"
    return write_report(args.out, "int8_prior_static", report, text)


if __name__ == "__main__":
    main()
