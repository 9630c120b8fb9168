"""Validation: every graph run in ONNX Runtime (CPU) against PyTorch, or a reduced-precision graph against the fp32
graph, on fixed inputs at two batch sizes; error figures, tolerances and the summary table."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from movq_deploy.contract import PRIOR_GRAPHS
from movq_deploy.export.specs import ExportError, GraphSpec, run_torch

VALIDATION_BATCHES = (1, 3)
# fp32 ONNX Runtime vs PyTorch. A module-level dict so that a test can tighten it to make validation fail.
TOLERANCE = {
    "decoder_max_pixel_error": 1,  # uint8 levels: a rounding flip at .5, nothing more
    "decoder_max_fraction_off": 0.01,  # ... and on at most 1% of the pixels ("mostly 0")
    "encoder_max_mismatches": 0,  # index mismatches that are not ties (distances equal within fp32 rounding)
    "prior_max_token_mismatches": 0,  # same noise, same tokens
    "prior_max_confidence_error": 1e-3,  # on the masked slots (known slots must be +inf in both)
}


def cpu_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # the fp16 graphs on the CPU warn about every inserted Cast
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare(name: str, reference: list, candidate: list, feeds: dict, count_ties=None) -> dict:
    """Error figures of `candidate` outputs against `reference` outputs of graph `name` on `feeds`.

    With `count_ties` (validation against PyTorch), index/token mismatches that are ties are counted apart.
    """
    if name == "decoder":
        diff = np.abs(reference[0].astype(np.int16) - candidate[0].astype(np.int16))
        return {"max_pixel_error": int(diff.max()), "mean_pixel_error": float(diff.mean()),
                "fraction_off": float((diff > 0).mean())}
    off = reference[0] != candidate[0]
    ties = count_ties(feeds, reference[0], candidate[0], off) if count_ties is not None and off.any() else 0
    if name == "encoder":
        figures = {"index_agreement": float(1 - off.mean()), "mismatches": int(off.sum()) - ties}
        return {**figures, "tie_mismatches": ties} if count_ties is not None else figures
    (ref_tokens, ref_conf), (tokens, conf) = reference, candidate
    masked = np.isfinite(ref_conf)  # known slots have confidence +inf
    same = masked & ~off
    conf_error = float(np.abs(ref_conf[same] - conf[same]).max(initial=0.0))
    if not (np.isinf(ref_conf) == np.isinf(conf)).all():
        conf_error = float("nan")  # a known slot lost its +inf, or a masked one got it
    figures = {"token_agreement": float((ref_tokens[masked] == tokens[masked]).mean()) if masked.any() else 1.0,
               "token_mismatches": int(off.sum()) - ties, "max_confidence_error": conf_error}
    return {**figures, "tie_mismatches": ties} if count_ties is not None else figures


def _worst(rows: "list[dict]") -> dict:
    """Per figure, the worst value over the validation batches (min for agreements, max for errors)."""
    worst = {}
    for key in rows[0]:
        values = [row[key] for row in rows]
        if any(value != value for value in values):  # NaN (e.g. +inf where a confidence should be finite)
            worst[key] = float("nan")
        else:
            worst[key] = min(values) if "agreement" in key else max(values)
    return worst


def validate_fp32(spec: GraphSpec, path: Path) -> dict:
    """Runs the graph in ONNX Runtime (CPU) and PyTorch at VALIDATION_BATCHES; raises ExportError above TOLERANCE."""
    session = cpu_session(path)
    rows = []
    for batch in VALIDATION_BATCHES:
        feeds = spec.make_inputs(batch, np.random.default_rng(1000 + batch))
        outputs = session.run(spec.output_names, feeds)
        for name, value in zip(spec.output_names, outputs):
            if value.shape[0] != batch:
                raise ExportError(f"{path.name}: output {name} has batch {value.shape[0]} for an input batch {batch}")
        rows.append(compare(spec.name, run_torch(spec, feeds), outputs, feeds, spec.count_ties))
    errors = _worst(rows)
    failures = _tolerance_failures(spec.name, errors)
    if failures:
        raise ExportError(f"{path.name} disagrees with PyTorch: {'; '.join(failures)}")
    return errors


def _tolerance_failures(name: str, errors: dict) -> "list[str]":
    prior = [("token_mismatches", "prior_max_token_mismatches"), ("max_confidence_error", "prior_max_confidence_error")]
    checks = {
        "decoder": [("max_pixel_error", "decoder_max_pixel_error"), ("fraction_off", "decoder_max_fraction_off")],
        "encoder": [("mismatches", "encoder_max_mismatches")],
    }.get(name, prior)  # the prior-step graphs (plain and guided)
    failures = []
    for figure, limit in checks:
        value = errors[figure]
        if not value <= TOLERANCE[limit]:  # NaN fails too
            failures.append(f"{figure} = {value:g} > {TOLERANCE[limit]:g}")
    return failures


def compare_graphs(spec: GraphSpec, reference_path: Path, path: Path) -> dict:
    """Agreement of a reduced-precision graph with the fp32 graph (both ONNX Runtime CPU) on the fixed inputs."""
    return compare_with_fp32(spec, reference_path, cpu_session(path))


def compare_with_fp32(spec: GraphSpec, reference_path: Path, candidate) -> dict:
    """Agreement of `candidate` (anything with an ONNX Runtime session's `run(output names, feeds) -> list`) with
    the fp32 graph at `reference_path` (ONNX Runtime CPU) on the fixed inputs: worst figures over
    VALIDATION_BATCHES, and for the prior-step graphs the most likely token's agreement."""
    reference = cpu_session(reference_path)
    rows = []
    for batch in VALIDATION_BATCHES:
        feeds = spec.make_inputs(batch, np.random.default_rng(1000 + batch))
        ref_out = reference.run(spec.output_names, feeds)
        rows.append(compare(spec.name, ref_out, candidate.run(spec.output_names, feeds), feeds))
        if spec.name in PRIOR_GRAPHS:  # the most likely token: a temperature this low makes the draw an argmax
            cold = {**feeds, "temperature": np.full(batch, 1e-4, dtype=np.float32)}
            ref_top, top = reference.run(["sampled"], cold)[0], candidate.run(["sampled"], cold)[0]
            masked = feeds["tokens"] == spec.module.step.prior.config.mask_id
            rows[-1]["top_token_agreement"] = float((ref_top[masked] == top[masked]).mean())
    return _worst(rows)


def summary(errors: dict) -> str:
    return ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in errors.items() if not isinstance(value, dict))


def format_table(validation: dict) -> str:
    """A Markdown table of the validation figures: fp32 vs PyTorch, fp16/int8 vs the fp32 graph."""
    lines = ["| graph | precision | compared with | figures (worst over batch sizes 1 and 3) |",
             "|---|---|---|---|"]
    for precision, graphs in validation.items():
        for name, errors in graphs.items():
            against = "PyTorch" if precision == "fp32" else "fp32 ONNX"
            lines.append(f"| {name} | {precision} | {against} | {summary(errors)} |")
    return "\n".join(lines)
