"""Static int8 encoder and decoder: ONNX Runtime's quantize_static (QDQ), calibrated on real images.

    encoder.int8.onnx  calibrated on training crops of the tokenizer's data
    decoder.int8.onnx  calibrated on the token grids of those crops (from the fp32 encoder graph)

Convolutions and matrix products get per-channel int8 weights and uint8 activations (MLAS's u8s8 kernels, VNNI
where the CPU has it); ONNX Runtime fuses each DequantizeLinear -> Conv -> QuantizeLinear into one QLinearConv.
Everything else stays fp32, and so do the numerically fragile parts:
- the spatial-norm statistics (GroupNorm's InstanceNormalization and its gamma/beta Mul/Add): never quantized;
- the codebook distance (||e||^2 - 2 z.e and its ArgMin), after the encoder's last convolution: its rounding would
  flip nearest codes, so the last `fp32_final_convs` convolutions and everything after them stay fp32;
- the decoder's final convolution (to 3 channels, just before the uint8 rounding).
`fp32_zq_convs` also keeps the decoder's convolutions of z_q (post_quant_conv and the 1x1 gamma/beta convs of the
modulated norms) fp32. Agreement with the fp32 graphs is measured on held-out data: the decoded PSNR of held-out
token grids and the share of held-out encoder slots whose index is the fp32 one.

The result holds QDQ and, after ONNX Runtime's fusions, QLinear ops: an ONNX Runtime (CPU) graph. (TensorRT reads
QDQ graphs too, but the package's TensorRT path builds from the fp16 graphs.)
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import onnx

from movq_deploy.export.memory import GraphMemory
from movq_deploy.export.onnx_graph import consumers
from movq_deploy.export.specs import ExportError
from movq_deploy.export.validation import cpu_session

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
QUANTIZED_OPS = ["Conv", "MatMul"]
PSNR_CAP_DB = 100.0  # identical images have an infinite PSNR; the manifest stores finite JSON numbers
RUN_BATCH = 16  # the most images per call while encoding or comparing (fewer where the memory budget says so)


@dataclass(frozen=True)
class ImageQuantConfig:
    """How the encoder and decoder are quantized (the defaults are the measured best; see BENCHMARKS.md)."""

    calibration_images: int = 64  # training crops run through each graph to calibrate its activation ranges
    calibration_batch: int = 8  # the most crops per calibration call (fewer where the memory budget says so)
    method: str = "minmax"  # "percentile" / "entropy" histogram every activation: small images only
    encoder_fp32_final_convs: int = 2  # conv_out and quant_conv: z feeds the nearest-code search directly
    decoder_fp32_final_convs: int = 1  # conv_out, to the 3 colour channels
    fp32_zq_convs: bool = False  # the decoder's convolutions of z_q (post_quant_conv, gamma/beta of the norms)

    def __post_init__(self):
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        if self.calibration_images <= 0 or self.calibration_batch <= 0:
            raise ValueError("calibration_images and calibration_batch must be positive")
        if self.encoder_fp32_final_convs < 0 or self.decoder_fp32_final_convs < 0:
            raise ValueError("the fp32 final conv counts must be >= 0")


@dataclass
class ImageSets:
    """uint8 [n, S, S, 3] training crops (calibration) and held-out crops (agreement), where they came from, and
    the crops' class labels (int [n]; the int8 prior's calibration states carry them)."""

    calibration: np.ndarray
    held_out: np.ndarray
    source: str
    calibration_labels: Optional[np.ndarray] = None
    held_out_labels: Optional[np.ndarray] = None
    _grids: dict = field(default_factory=dict, repr=False, compare=False)

    def token_grids(self, encoder_path: Path, part: str, memory: GraphMemory) -> np.ndarray:
        """int32 [n, h, w, c]: the token grids of `part` ("calibration" or "held_out") by the fp32 encoder graph at
        `encoder_path`, computed once: the int8 decoder and both int8 prior graphs calibrate and compare on them."""
        key = (str(encoder_path), part)
        if key not in self._grids:
            batch = memory.rows("encoder", "encoding crops", most=RUN_BATCH)
            self._grids[key] = run_batched(cpu_session(encoder_path), "image", getattr(self, part), batch)
        return self._grids[key]


def load_image_sets(image_size: int, count: int, data_dir: "str | Path | None" = None,
                    record: Optional[dict] = None) -> ImageSets:
    """`count` training crops and every held-out crop of `data_dir`; by default the data the tokenizer was trained
    on (named in the checkpoint's record), else the photographs embedded in scikit-image."""
    from movq_deploy.training.data import load_data
    from movq_deploy.training.digits import SOURCE as DIGITS_SOURCE

    if data_dir is None:  # the recorded source, where it is still there (a folder, shards, scikit-learn's digits)
        source = ((record or {}).get("tokenizer") or {}).get("data", {}).get("source")
        usable = source not in (None, "skimage.data") and (source == DIGITS_SOURCE or Path(source).exists())
        data_dir = source if usable else None
    data = load_data(data_dir, image_size)
    crops = data.train_set(seed=12345)
    calibration, labels = zip(*(crops.crop(i) for i in range(count)))
    held_out, held_out_labels = data.eval_set().arrays()
    return ImageSets(np.stack(calibration), held_out, data.source, np.asarray(labels), np.asarray(held_out_labels))


class ArrayReader:
    """onnxruntime.quantization's CalibrationDataReader over one array, `batch` rows at a time."""

    def __init__(self, input_name: str, array: np.ndarray, batch: int):
        self.input_name, self.array, self.batch, self.start = input_name, array, batch, 0

    def get_next(self) -> "dict | None":
        if self.start >= len(self.array):
            return None
        chunk = np.ascontiguousarray(self.array[self.start:self.start + self.batch])
        self.start += self.batch
        return {self.input_name: chunk}

    def rewind(self) -> None:
        self.start = 0


def run_batched(session, input_name: str, array: np.ndarray, batch: int) -> np.ndarray:
    """The first output of `session` (anything with an ONNX Runtime session's `run`) over `array`, `batch` rows
    per call."""
    return np.concatenate([session.run(None, {input_name: np.ascontiguousarray(array[i:i + batch])})[0]
                           for i in range(0, len(array), batch)])


def fp32_nodes(name: str, model: onnx.ModelProto, config: ImageQuantConfig) -> "list[str]":
    """Names of the Conv/MatMul nodes of graph `name` ("encoder" or "decoder") that stay fp32 (see the module doc).

    Every node after the last convolution (the encoder's codebook distance is a MatMul) and the last
    `*_fp32_final_convs` convolutions; for the decoder with fp32_zq_convs, also the convolutions that z_q reaches
    without passing through another convolution (post_quant_conv and the modulated norms' gamma/beta).
    """
    nodes = list(model.graph.node)  # topological order
    conv_positions = [i for i, node in enumerate(nodes) if node.op_type == "Conv"]
    count = config.encoder_fp32_final_convs if name == "encoder" else config.decoder_fp32_final_convs
    first_kept = conv_positions[-min(count, len(conv_positions))] if count else conv_positions[-1] + 1
    keep = {node.name for node in nodes[first_kept:] if node.op_type in QUANTIZED_OPS}
    if name == "decoder" and config.fp32_zq_convs:
        lookup = next(node for node in nodes if node.op_type == "Gather")  # the codebook lookup: z_q
        readers, frontier, seen = consumers(model), list(lookup.output), set()
        while frontier:
            for node in readers.get(frontier.pop(), []):
                if node.name in seen:
                    continue
                seen.add(node.name)
                if node.op_type == "Conv":
                    keep.add(node.name)
                elif node.op_type not in ("InstanceNormalization",):  # through reshapes and resizes only
                    frontier.extend(node.output)
    return sorted(keep)


def quantize_graph(name: str, fp32_path: Path, path: Path, calibration: np.ndarray, config: ImageQuantConfig,
                   scratch: Path, batch: int) -> "list[str]":
    """Writes the static int8 graph of fp32_path to path, calibrated `batch` rows per call; returns the names of
    the nodes kept fp32."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quant_pre_process, quantize_static

    prepared = scratch / f"{name}.prepared.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)  # ONNX inference suffices
    model = onnx.load(str(prepared))
    for index, node in enumerate(model.graph.node):  # nodes_to_exclude selects by name
        node.name = node.name or f"{node.op_type}_{index}"
    onnx.save(model, str(prepared))
    keep = fp32_nodes(name, model, config)
    input_name = model.graph.input[0].name
    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[config.method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_static(
            str(prepared), str(path), ArrayReader(input_name, calibration, batch),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=keep,
            calibrate_method=method,
            # MinMax keeps only each activation's reduced min/max per batch. (CalibMaxIntermediateOutputs would
            # bound that further, but onnxruntime 1.32 discards the batches it was meant to merge.)
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    quantized = onnx.load(str(path))
    if not any(node.op_type == "QuantizeLinear" for node in quantized.graph.node):
        raise ExportError(f"{path.name}: quantize_static left no quantized node")
    onnx.checker.check_model(quantized)
    return keep


def decoder_agreement(fp32_path: Path, int8_path: Path, tokens: np.ndarray, batch: int) -> dict:
    """PSNR (dB, over all pixels, and of the worst image) and pixel errors of the int8 decoder's images against the
    fp32 decoder's, on token grids `tokens` [n, h, w, c]."""
    reference = run_batched(cpu_session(fp32_path), "indices", tokens, batch)
    candidate = run_batched(cpu_session(int8_path), "indices", tokens, batch)
    return {**psnr_figures(reference, candidate), "images": len(tokens)}


def psnr_figures(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """PSNR (dB, over all pixels, and of the worst image) and pixel errors of uint8 images [n,H,W,3] `candidate`
    against `reference`."""
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    squared = (reference - candidate) ** 2
    per_image = squared.reshape(len(reference), -1).mean(axis=1)

    def psnr(mse: float) -> float:
        return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, float(10 * np.log10(255.0**2 / mse)))

    return {"psnr_db": psnr(float(squared.mean())), "worst_image_psnr_db": psnr(float(per_image.max())),
            "max_pixel_error": int(np.abs(reference - candidate).max()),
            "mean_pixel_error": float(np.abs(reference - candidate).mean())}


def encoder_agreement(fp32_indices: np.ndarray, int8_path: Path, images: np.ndarray, batch: int) -> dict:
    """Share of slots whose int8 index is the fp32 one, over `images` [n, S, S, 3]."""
    indices = run_batched(cpu_session(int8_path), "image", images, batch)
    return {"index_agreement": float((indices == fp32_indices).mean()), "images": len(images)}


def quantize_image_graph(name: str, work: Path, images: ImageSets, config: ImageQuantConfig,
                         scratch: Path, memory: GraphMemory) -> dict:
    """work/{name}.int8.onnx from work/{name}.onnx ("encoder" or "decoder"; the decoder's calibration and held-out
    token grids come from work/encoder.onnx), each loop `memory.rows` images at a time. Returns its agreement
    figures on the held-out data, and "quantization": how it was made (calibration, the nodes kept fp32)."""
    train = images.calibration[:config.calibration_images]
    held_out_tokens = images.token_grids(work / "encoder.onnx", "held_out", memory)  # (n, h, w, c)
    fp32_path, path = work / f"{name}.onnx", work / f"{name}.int8.onnx"
    # the calibrator records every intermediate tensor of a call
    calibration_batch = memory.rows(name, "calibrating int8", every_tensor=True, most=config.calibration_batch)
    run_batch = memory.rows(name, "comparing int8 with fp32", most=RUN_BATCH)
    if name == "encoder":
        keep = quantize_graph(name, fp32_path, path, train, config, scratch, calibration_batch)
        agreement = encoder_agreement(held_out_tokens, path, images.held_out, run_batch)
    else:  # calibrated on the token grids of the calibration crops
        tokens = images.token_grids(work / "encoder.onnx", "calibration", memory)[:len(train)]
        keep = quantize_graph(name, fp32_path, path, tokens, config, scratch, calibration_batch)
        agreement = decoder_agreement(fp32_path, path, held_out_tokens, run_batch)
    return {**agreement, "quantization": {**asdict(config), "calibration_images": len(train),
                                          "source": images.source, "fp32_nodes": keep}}


def quantize_image_graphs(work: Path, scratch: Path, images: ImageSets, config: ImageQuantConfig,
                          memory: GraphMemory) -> "dict[str, dict]":
    """encoder.int8.onnx and decoder.int8.onnx beside work/encoder.onnx and work/decoder.onnx: {graph: figures}."""
    return {name: quantize_image_graph(name, work, images, config, scratch, memory) for name in ("encoder", "decoder")}
