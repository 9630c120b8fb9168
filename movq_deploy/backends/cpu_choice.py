"""Which CPU path runs each graph of an engine directory, and why: ONNX Runtime, or OpenVINO in fp32, bf16 or int8.

The rule for `backend="auto"` on a machine without a usable GPU (docs/DESIGN.md, "The CPU choice"), graph by graph:

- precision "auto": OpenVINO in bf16 when all of these hold, else ONNX Runtime in fp32:
    1. openvino is installed;
    2. the CPU computes bf16 natively (AVX-512 BF16 or AMX; emulated bf16 is slower than fp32);
    3. the manifest holds the graph's bf16 validation figures (measured at export) and they meet BF16_FIGURES;
    4. one image costs at least MIN_BF16_GFLOP in the graph (the manifest's `flops_per_image`): below that the
       cost of OpenVINO's call, made of two or three compiled parts, outweighs its faster GEMMs at batch 1.
- precision "int8": OpenVINO's int8 graphs where the directory has them, openvino is installed, the CPU has int8
  dot products (VNNI or AMX) and the graph is as large as bf16's rule asks; a large graph the export did not
  quantize for OpenVINO (int8 did not pay over bf16 there) runs in bf16 if it may; the others run ONNX Runtime's
  int8 graphs.
- precision "fp32": ONNX Runtime in fp32, the reference the other paths are validated against.
- precision "bf16": every graph on OpenVINO in bf16: an error where that is not possible (OpenVINO missing, no
  native bf16, no validation figures), a warning where a graph's figure falls short of BF16_FIGURES.

The choice is fixed per graph when the Generator opens; it never depends on the batch, so an image is the same
whatever shares its calls and however a request is chunked. torch-free; openvino is imported only if used.
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from movq_deploy.backends import cpu_features
from movq_deploy.manifest import EngineDir

logger = logging.getLogger("movq_deploy")

ORT_CPU, OPENVINO = "onnxruntime-cpu", "openvino"
OPENVINO_INT8 = "int8-openvino"  # the manifest's precision key of OpenVINO's int8 graphs (NNCF, OpenVINO IR)
OPENVINO_INSTALL = "pip install 'movq-deploy[openvino]'"
REEXPORT_BF16 = ("re-export with export/to_onnx.py where openvino is installed, on a CPU with native bf16, to "
                 "measure them")
# What bf16 must keep of fp32, per graph, on the held-out data of the export (figure, minimum): the prior's most
# likely token, the encoder's nearest code, the decoder's pixels.
BF16_FIGURES = {"prior": ("held_out_top_token_agreement", 0.99),
                "prior_guided": ("held_out_top_token_agreement", 0.99),
                "encoder": ("index_agreement", 0.99), "decoder": ("psnr_db", 40.0)}
# Measured (BENCHMARKS.md, "The CPU choice"): the digits graphs (0.03-0.07 GFLOP per image) run 0.77-1.11x ONNX
# Runtime's speed on OpenVINO bf16 at batch 1 (0.4-1.2x on a loaded day), the paper-size ones (28-300 GFLOP)
# 1.7-2.5x; the per-call overhead of ~0.1-0.3 ms is repaid from ~0.2 GFLOP per image on. 1 GFLOP keeps a factor
# of five in hand.
MIN_BF16_GFLOP = 1.0


@dataclass(frozen=True)
class Placement:
    """Where one graph runs: a backend ("onnxruntime-cpu" | "openvino") and a precision ("fp32", "bf16", "int8")."""

    backend: str
    precision: str

    def __str__(self) -> str:
        return f"{self.backend} {self.precision}"


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def bf16_unusable(engine_dir: EngineDir, graph: str) -> Optional[str]:
    """Why graph `graph` may not run in bf16 here (None: it may): OpenVINO missing, no native bf16, its validation
    figures missing (`bf16_unvalidated`), or below BF16_FIGURES (`bf16_below_target`)."""
    return bf16_unvalidated(engine_dir, graph) or bf16_below_target(engine_dir, graph)


def bf16_unvalidated(engine_dir: EngineDir, graph: str) -> Optional[str]:
    """Why graph `graph` cannot run in bf16 here at all: OpenVINO missing, no native bf16, no validation figures."""
    if not openvino_installed():
        return f"openvino is not installed ({OPENVINO_INSTALL})"
    if not cpu_features.native_bf16():
        return f"this CPU has no native bf16 (it has {cpu_features.describe()})"
    figure, _ = BF16_FIGURES[graph]
    if engine_dir.validation.get("bf16", {}).get(graph, {}).get(figure) is None:
        return f"{engine_dir.manifest_path} holds no bf16 validation of the {graph} graph; {REEXPORT_BF16}"
    return None


def bf16_below_target(engine_dir: EngineDir, graph: str) -> Optional[str]:
    """Why graph `graph`'s bf16 validation figure falls short of BF16_FIGURES (None: it meets it, or is absent)."""
    figure, minimum = BF16_FIGURES[graph]
    value = engine_dir.validation.get("bf16", {}).get(graph, {}).get(figure)
    if value is not None and value < minimum:
        return f"its bf16 {figure} {value:.4g} is below {minimum:g}"
    return None


def too_small_for_bf16(engine_dir: EngineDir, graph: str) -> Optional[str]:
    """Why graph `graph` stays on ONNX Runtime for its size (None: it is large enough for bf16 to pay)."""
    flops = (engine_dir.graph("fp32", graph) or {}).get("flops_per_image")
    if flops is None:
        return f"its cost per image is not in the manifest; {REEXPORT_BF16}"
    if flops < MIN_BF16_GFLOP * 1e9:
        return f"{flops / 1e9:.2g} GFLOP per image, below {MIN_BF16_GFLOP:g}"
    return None


def auto_placement(engine_dir: EngineDir, precision: str) -> Tuple[Dict[str, Placement], str]:
    """({graph: Placement}, why) for backend "auto" on the CPU and precision "auto", "fp32" or "int8"."""
    if precision == "fp32":
        placement = {graph: Placement(ORT_CPU, "fp32") for graph in engine_dir.graph_names}
        return placement, "fp32 asked for: ONNX Runtime, the reference"
    chosen = {graph: _auto_graph(engine_dir, graph, precision) for graph in engine_dir.graph_names}
    by_place: Dict[Placement, List[str]] = {}  # one clause per placement: its graphs, each with its reason
    for graph, (where, why) in chosen.items():
        by_place.setdefault(where, []).append(graph + (f" ({why})" if why else ""))
    return ({graph: where for graph, (where, _) in chosen.items()},
            "; ".join(f"{where}: {', '.join(graphs)}" for where, graphs in by_place.items()))


def _auto_graph(engine_dir: EngineDir, graph: str, precision: str) -> Tuple[Placement, str]:
    """Where graph `graph` runs under backend "auto" at `precision` ("auto" or "int8"), and why not faster."""
    too_small = too_small_for_bf16(engine_dir, graph)
    if precision == "int8":
        why_not = too_small or openvino_int8_unusable(engine_dir, graph)
        if why_not is None:
            return Placement(OPENVINO, "int8"), ""
        if too_small is None and graph not in engine_dir.graphs.get(OPENVINO_INT8, {}) and \
                bf16_unusable(engine_dir, graph) is None:  # the export found that int8 does not pay here
            return Placement(OPENVINO, "bf16"), "not quantized for OpenVINO: int8 did not pay over bf16"
        return Placement(ORT_CPU, "int8"), why_not
    why_not = bf16_unusable(engine_dir, graph) or too_small
    return (Placement(ORT_CPU, "fp32"), why_not) if why_not else (Placement(OPENVINO, "bf16"), "")


def openvino_int8_unusable(engine_dir: EngineDir, graph: Optional[str] = None) -> Optional[str]:
    """Why OpenVINO's int8 graphs (or graph `graph`'s) cannot run here (None: they can)."""
    quantized = engine_dir.graphs.get(OPENVINO_INT8, {})
    if not quantized or (graph is not None and graph not in quantized):
        which = "OpenVINO int8 graphs" if graph is None else f"OpenVINO int8 {graph} graph"
        return f"{engine_dir.path} has no {which} (export with --int8 where nncf is installed)"
    if not openvino_installed():
        return f"openvino is not installed ({OPENVINO_INSTALL})"
    if not cpu_features.native_int8():
        return f"this CPU has no int8 dot products (it has {cpu_features.describe()})"
    return None


def openvino_placement(engine_dir: EngineDir, precision: str) -> Dict[str, Placement]:
    """{graph: Placement} for backend "openvino" at `precision` ("auto", "fp32", "bf16" or "int8"); ValueError or
    RuntimeError in one line when it cannot run here.

    "auto" is bf16 for the graphs that may run in bf16, fp32 for the others. "int8" runs OpenVINO's int8 graphs, and the graphs
    the export did not quantize (where int8 did not pay) in bf16 where they may, else in fp32.
    """
    if not openvino_installed():
        raise ImportError(f"openvino is not installed; install it with `{OPENVINO_INSTALL}`")
    graphs = engine_dir.graph_names
    if precision == "fp32":
        return {graph: Placement(OPENVINO, "fp32") for graph in graphs}
    if precision == "int8":
        why_not = openvino_int8_unusable(engine_dir)
        if why_not:
            raise RuntimeError(f"OpenVINO int8 is not usable here: {why_not}")
        quantized = engine_dir.graphs[OPENVINO_INT8]
        return {graph: Placement(OPENVINO, "int8") if graph in quantized
                else Placement(OPENVINO, "fp32" if bf16_unusable(engine_dir, graph) else "bf16") for graph in graphs}
    if precision not in ("auto", "bf16"):
        raise ValueError(f"OpenVINO runs precision fp32, bf16 or int8 on the CPU, not {precision!r}")
    if precision == "auto":
        return {graph: Placement(OPENVINO, "fp32" if bf16_unusable(engine_dir, graph) else "bf16")
                for graph in graphs}
    for graph in graphs:  # bf16 asked for: it runs where it was validated, and says where it fell short
        why_not = bf16_unvalidated(engine_dir, graph)
        if why_not:
            raise RuntimeError(f"bf16 is not usable for the {graph} graph here: {why_not}")
        short = bf16_below_target(engine_dir, graph)
        if short:
            logger.warning("movq-deploy: the %s graph runs in bf16 as asked, but %s (%s)", graph, short,
                           engine_dir.manifest_path)
    return {graph: Placement(OPENVINO, "bf16") for graph in graphs}


def describe(placement: Dict[str, Placement]) -> "tuple[str, str]":
    """(backend name, precision) of a placement: one name each where all graphs agree, else "+"-joined in graph
    order ("openvino+onnxruntime-cpu", "bf16+fp32")."""
    def joined(values) -> str:
        return "+".join(dict.fromkeys(values))

    return joined(p.backend for p in placement.values()), joined(p.precision for p in placement.values())
