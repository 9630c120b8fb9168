"""The export's OpenVINO side: bf16 validated on held-out data, and int8 graphs for OpenVINO quantized with NNCF.

- **bf16** has no file of its own: OpenVINO compiles the fp32 ONNX graphs in bf16 with their fp32 ends
  (movq_deploy.backends.openvino). The export measures what that keeps of fp32, graph by graph, on the held-out
  data (the prior's most likely token on held-out states, the encoder's indices of held-out crops, the decoder's
  PSNR on their token grids) and on the fixed validation inputs, with the very runner the runtime uses. The figures
  go into the manifest's "bf16" validation, where the CPU choice reads them (movq_deploy.backends.cpu_choice). It
  runs where openvino is installed and the CPU has native bf16 (elsewhere OpenVINO would compute something else).
- **int8 for OpenVINO**: NNCF's post-training quantization of the fp32 graph read by OpenVINO, calibrated on the
  int8 export's own data (the prior on the calibration states of movq_deploy.export.quantize_prior: training crops'
  token grids masked along the schedule; the decoder on those crops' token grids), the graph's fp32 ends
  (`fp32_ends`) left out. Activation scales are fixed (FakeQuantize ops), so rows stay independent of their
  batchmates. Written as OpenVINO IR (`<graph>.int8-openvino.xml` + `.bin`, uncompressed weights), listed under the
  manifest's "int8-openvino" graphs with its figures. It runs where nncf is installed.
"""
from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from movq_deploy.backends import cpu_features
from movq_deploy.contract import PRIOR_GRAPHS
from movq_deploy.export.memory import GraphMemory
from movq_deploy.export.quantize_images import ImageSets, psnr_figures, run_batched
from movq_deploy.export.quantize_prior import take, top_token_agreement
from movq_deploy.export.specs import GraphSpec
from movq_deploy.export.validation import compare_with_fp32, cpu_session

# Graphs quantized for OpenVINO: where int8 pays over bf16 at paper size (BENCHMARKS.md, "int8 on OpenVINO").
INT8_GRAPHS = ("prior", "prior_guided", "decoder")
# The most rows per NNCF calibration item and per call while comparing (fewer where the memory budget says so:
# GraphMemory.rows); a calibration's statistics do not depend on how its rows are grouped
CALIBRATION_BATCH = 4
RUN_BATCH = 16


def bf16_unavailable() -> Optional[str]:
    """Why the export cannot validate bf16 here (None: it can)."""
    if importlib.util.find_spec("openvino") is None:
        return "openvino is not installed"
    if not cpu_features.native_bf16():
        return f"this CPU has no native bf16 ({cpu_features.describe()})"
    return None


def int8_unavailable() -> Optional[str]:
    """Why the export cannot make OpenVINO int8 graphs here (None: it can)."""
    missing = [name for name in ("openvino", "nncf") if importlib.util.find_spec(name) is None]
    return f"{' and '.join(missing)} not installed" if missing else None


class RunnerSession:
    """A runtime runner seen as an ONNX Runtime session (`run(output names, feeds) -> list`), for the checks."""

    def __init__(self, runner):
        self.runner = runner

    def run(self, names, feeds):
        outputs = self.runner.run(feeds)
        return [outputs[name] for name in (names or [spec.name for spec in self.runner.outputs])]


def held_out_figures(spec: GraphSpec, work: Path, candidate, images: ImageSets, held_out_states: Optional[dict],
                     memory: GraphMemory):
    """What `candidate` (a session-like object) keeps of the fp32 graph on the held-out data: the prior's most
    likely token on `held_out_states`, the encoder's indices of the held-out crops, the decoder's images of their
    token grids (PSNR). {} where there is no held-out data."""
    if not len(images.held_out):
        return {}
    fp32_path = work / f"{spec.name}.onnx"
    batch = memory.rows(spec.name, "comparing with fp32 on held-out data", most=RUN_BATCH)
    if spec.name in PRIOR_GRAPHS:
        mask_id = spec.module.step.prior.config.mask_id
        return {"held_out_top_token_agreement": top_token_agreement(cpu_session(fp32_path), candidate,
                                                                    held_out_states, mask_id, batch)}
    grids = images.token_grids(work / "encoder.onnx", "held_out", memory)  # the fp32 encoder's
    if spec.name == "encoder":
        indices = run_batched(candidate, "image", images.held_out, batch)
        return {"index_agreement": float((indices == grids).mean()), "images": len(grids)}
    reference = run_batched(cpu_session(fp32_path), "indices", grids, batch)
    return {**psnr_figures(reference, run_batched(candidate, "indices", grids, batch)), "images": len(grids)}


def bf16_validation(spec: GraphSpec, work: Path, images: ImageSets, held_out_states: Optional[dict],
                    memory: GraphMemory) -> dict:
    """The bf16 runner's agreement with the fp32 graph: on the validation inputs and on the held-out data."""
    from movq_deploy.backends.openvino import OpenVinoRunner

    runner = RunnerSession(OpenVinoRunner(work / f"{spec.name}.onnx", spec.name, "bf16"))
    figures = compare_with_fp32(spec, work / f"{spec.name}.onnx", runner)
    return {**figures, **held_out_figures(spec, work, runner, images, held_out_states, memory)}


def quantize_for_openvino(spec: GraphSpec, work: Path, images: ImageSets, calibration_states: Optional[dict],
                          held_out_states: Optional[dict], memory: GraphMemory) -> "tuple[str, str, dict]":
    """work/<graph>.int8-openvino.xml (+ .bin) by NNCF from work/<graph>.onnx, calibrated on the prior's
    `calibration_states` or on the calibration crops (encoder) / their token grids (decoder). Returns the IR and
    weight file names and the figures: agreement with fp32 on the validation inputs and the held-out data, and how
    it was quantized."""
    import nncf
    import openvino as ov
    from nncf.common.logging import nncf_logger

    from movq_deploy.backends.openvino import OpenVinoRunner, fold_constants, fp32_ends, shared_core

    model = fold_constants(shared_core().read_model(str(work / f"{spec.name}.onnx")))
    prefix, suffix = fp32_ends(model, spec.name)
    batch = memory.rows(spec.name, "calibrating OpenVINO int8", every_tensor=True, most=CALIBRATION_BATCH)
    if spec.name in PRIOR_GRAPHS:
        rows = len(calibration_states["tokens"])
        items = [take(calibration_states, slice(start, start + batch)) for start in range(0, rows, batch)]
    else:
        array = (images.calibration if spec.name == "encoder"
                 else images.token_grids(work / "encoder.onnx", "calibration", memory))
        name = spec.input_names[0]
        rows = len(array)
        items = [{name: np.ascontiguousarray(array[start:start + batch])} for start in range(0, rows, batch)]
    level = nncf_logger.level
    nncf.set_log_level(logging.WARNING)  # its INFO lines name every op it leaves unquantized
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantized = nncf.quantize(
                model, nncf.Dataset(items), subset_size=len(items),
                model_type=nncf.ModelType.TRANSFORMER if spec.name in PRIOR_GRAPHS else None,
                ignored_scope=nncf.IgnoredScope(names=sorted(prefix | suffix), validate=False),
            )
    finally:
        nncf.set_log_level(level)
    xml, weights = f"{spec.name}.int8-openvino.xml", f"{spec.name}.int8-openvino.bin"
    ov.save_model(quantized, str(work / xml), compress_to_fp16=False)
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ordered_ops())
    runner = RunnerSession(OpenVinoRunner(work / xml, spec.name, "int8"))
    figures = {**compare_with_fp32(spec, work / f"{spec.name}.onnx", runner),
               **held_out_figures(spec, work, runner, images, held_out_states, memory),
               "quantization": {"tool": f"nncf {nncf.__version__}", "calibration_rows": rows,
                                "fake_quantize_ops": fake_quantize, "fp32_ops": len(prefix | suffix)}}
    return xml, weights, figures
