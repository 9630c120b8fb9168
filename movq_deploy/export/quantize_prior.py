"""Static activation scales for the int8 prior-step graphs, calibrated once at export on real prior-step states.

ONNX Runtime's dynamic quantization computes each activation's scale over the whole call, so an image's tokens
would change with the images that share its batch. Here the dynamic graph keeps its kernels (QAttention with fused
Q/K/V, u8s8 GEMMs) but every DynamicQuantizeLinear becomes a QuantizeLinear with a fixed scale and zero point, and
each MatMulInteger -> Cast -> Mul(scales) becomes one MatMulIntegerToFloat: a row's outputs depend on that row only.

Calibration states: CALIBRATION_GRIDS of the tokenizer's training crops, encoded by the fp32 encoder graph to token
grids, each masked at every step of a CALIBRATION_STEPS-step cosine schedule (all masked first), with the crops'
class labels (a fifth of the rows the null class) for a class-conditional prior and guidance scales 0/1/3 for the
guided graph. The activation ranges are the min/max that ONNX Runtime's calibrator sees on the fp32 graph for them. (Its
quantize_static in QDQ form was measured too: more agreement, but 15-19% slower at batch 16 without the fused
attention; BENCHMARKS.md, "int8 prior: static activation scales".)
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from movq_deploy import contract, sampling
from movq_deploy.export.onnx_graph import consumers, producers
from movq_deploy.export.specs import ExportError

CALIBRATION_STEPS = 12  # mask ratios cos(pi/2 * t/12), t = 0..11: the paper's longest schedule
# Token grids (training crops) calibrated on: 192 states. The digits prior's agreement is the same from 4 to 64
# crops (BENCHMARKS.md), and at paper size each state costs a fp32 step.
CALIBRATION_GRIDS = 16
GUIDANCE_SCALES = (0.0, 1.0, 3.0)
# The most prior-step states per call while calibrating or comparing (fewer where the memory budget says so): past
# that a call runs no faster per row, and each ONNX Runtime session's memory arena keeps the largest call's size
STATES_PER_CALL = 16
NULL_CLASS_SHARE = 0.2


def masked_counts(num_slots: int, steps: int) -> "list[int]":
    """The masked-slot count of each step's input along the cosine schedule: all masked, then remask_counts."""
    return [num_slots] + [int(n) for n in sampling.remask_counts(num_slots, steps)[:-1]]


def prior_states(grids: np.ndarray, labels: np.ndarray, prior_config, guided: bool, rng: np.random.Generator,
                 steps: int = CALIBRATION_STEPS) -> dict:
    """Prior-step feeds [len(grids) * steps]: each token grid [N] masked at every step of a `steps`-step schedule
    (random slots), with its label (the null class for labels the prior lacks and for a NULL_CLASS_SHARE of the rows),
    the schedule's choice scale, and for the guided graph a guidance scale from GUIDANCE_SCALES."""
    counts = masked_counts(prior_config.num_slots, steps)
    tokens, rows, scales = [], [], []
    for row, grid in enumerate(np.asarray(grids).reshape(len(grids), -1)):
        for step, count in enumerate(counts):
            state = grid.copy()
            state[rng.permutation(len(grid))[:count]] = prior_config.mask_id
            tokens.append(state)
            rows.append(row)
            scales.append(sampling.choice_scale(step, steps, sampling.DEFAULTS.choice_temperature))
    tokens = np.stack(tokens).astype(np.int32)
    class_labels = None
    if prior_config.conditional:
        class_labels = np.asarray(labels, dtype=np.int32)[rows]
        unknown = (class_labels < 0) | (class_labels >= prior_config.num_classes)
        null = unknown | (rng.random(len(tokens)) < NULL_CLASS_SHARE)
        class_labels[null] = prior_config.num_classes
    feeds = contract.prior_step_feeds(tokens, class_labels, rng.random(tokens.shape, dtype=np.float32),
                                      rng.gumbel(size=tokens.shape), 1.0, np.asarray(scales))
    if guided:
        feeds["guidance_scale"] = rng.choice(GUIDANCE_SCALES, len(tokens)).astype(np.float32)
    return feeds


def take(feeds: dict, rows) -> dict:
    return {name: np.ascontiguousarray(value[rows]) for name, value in feeds.items()}


class FeedsReader:
    """onnxruntime.quantization's CalibrationDataReader over prior-step feeds, `batch` rows at a time."""

    def __init__(self, feeds: dict, batch: int):
        self.feeds, self.batch, self.start = feeds, batch, 0
        self.rows = len(feeds["tokens"])

    def get_next(self) -> "dict | None":
        if self.start >= self.rows:
            return None
        chunk = take(self.feeds, slice(self.start, self.start + self.batch))
        self.start += self.batch
        return chunk

    def rewind(self) -> None:
        self.start = 0


def activation_ranges(prepared_path: Path, feeds: dict, tensors: "set[str]", scratch: Path,
                      batch: int) -> "dict[str, tuple]":
    """{tensor: (min, max)} of `tensors` (inputs of the graph's MatMul / Attention nodes) over `feeds`, from ONNX
    Runtime's MinMax calibrator on the fp32 graph (it keeps only each batch's min/max: memory stays small)."""
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calibrator = create_calibrator(str(prepared_path), ["MatMul", "Attention"],
                                       augmented_model_path=str(scratch / "calibration.onnx"),
                                       calibrate_method=CalibrationMethod.MinMax)
        calibrator.collect_data(FeedsReader(feeds, batch))
        ranges = calibrator.compute_data()
    missing = sorted(tensors - set(ranges.keys()))
    if missing:
        raise ExportError(f"calibration saw no values of {', '.join(missing[:3])}")
    return {name: tuple(float(np.asarray(v).reshape(-1)[0]) for v in ranges[name].range_value) for name in tensors}


def uint8_scale(low: float, high: float) -> "tuple[float, int]":
    """Scale and zero point of asymmetric uint8 over [low, high] widened to hold 0 (as DynamicQuantizeLinear)."""
    low, high = min(low, 0.0), max(high, 0.0)
    scale = (high - low) / 255.0 or 1.0
    return scale, int(np.clip(round(-low / scale), 0, 255))


def freeze_activation_scales(model: onnx.ModelProto, ranges: "dict[str, tuple]") -> int:
    """In place: each DynamicQuantizeLinear(x) becomes QuantizeLinear(x, fixed scale, fixed zero point) (its scale
    and zero-point outputs become constants of the same names), and each MatMulInteger -> Cast -> Mul(a_scale *
    b_scale) one MatMulIntegerToFloat. Returns how many activations got a fixed scale."""
    frozen = 0
    for node in model.graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            continue
        scale, zero_point = uint8_scale(*ranges[node.input[0]])
        _, scale_name, zero_name = node.output
        model.graph.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), scale_name),
                                        numpy_helper.from_array(np.array(zero_point, np.uint8), zero_name)])
        node.op_type = "QuantizeLinear"
        del node.output[1:]
        node.input.extend([scale_name, zero_name])
        frozen += 1
    producer, readers = producers(model), consumers(model)
    fused = []
    for node in [n for n in model.graph.node if n.op_type == "MatMulInteger"]:
        cast = readers[node.output[0]][0]
        mul = readers[cast.output[0]][0]
        scales = producer[mul.input[1]]  # Mul(a_scale, b_scale)
        if cast.op_type != "Cast" or mul.op_type != "Mul" or scales.op_type != "Mul":
            raise ExportError(f"unexpected int8 MatMul pattern after {node.name}: {cast.op_type}, {mul.op_type}")
        a, b, a_zero, b_zero = node.input
        node.op_type, node.domain = "MatMulIntegerToFloat", "com.microsoft"
        del node.input[:]
        node.input.extend([a, b, scales.input[0], scales.input[1], a_zero, b_zero])
        node.output[0] = mul.output[0]
        fused += [cast, mul, scales]
    for node in fused:
        model.graph.node.remove(node)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    return frozen


def top_token_agreement(reference, candidate, feeds: dict, mask_id: int, batch: int) -> float:
    """Share of masked slots whose argmax draw (temperature 1e-4) is the same in both sessions."""
    cold = {**feeds, "temperature": np.full_like(feeds["temperature"], 1e-4)}
    rows = len(cold["tokens"])
    same = total = 0
    for start in range(0, rows, batch):
        chunk = take(cold, slice(start, start + batch))
        ref = reference.run(["sampled"], chunk)[0]
        out = candidate.run(["sampled"], chunk)[0]
        masked = chunk["tokens"] == mask_id
        same += int((ref[masked] == out[masked]).sum())
        total += int(masked.sum())
    return same / total
