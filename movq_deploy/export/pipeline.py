"""export_engine_dir: a checkpoint to a validated engine directory (every graph exported, checked and validated; fp16
and int8 variants; the manifest), written beside the output and swapped in at the end."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch

from movq_deploy import manifest as mf
from movq_deploy.contract import GUIDED_PRIOR, PRIOR_GRAPHS
from movq_deploy.manifest import EngineDir, Grid
from movq_deploy.memory import format_bytes, release_freed
from movq_deploy.backends.cpu_choice import OPENVINO_INT8
from movq_deploy.export import openvino_graphs
from movq_deploy.export.directory import _check_out, _replace_dir, carry_over_engines, make_work_dir
from movq_deploy.export.flops import flops_per_image
from movq_deploy.export.memory import GraphMemory
from movq_deploy.export.onnx_graph import OPSET, export_graph, finalize_graph, tensor_specs
from movq_deploy.export.precision import convert_fp16, quantize_int8
from movq_deploy.export.quantize_images import ImageQuantConfig, ImageSets, load_image_sets, quantize_image_graph
from movq_deploy.export.quantize_prior import CALIBRATION_GRIDS, STATES_PER_CALL, prior_states, top_token_agreement
from movq_deploy.export.specs import GraphSpec, graph_specs, io_shapes, one_line
from movq_deploy.export.validation import (
    TOLERANCE, VALIDATION_BATCHES, compare_graphs, cpu_session, format_table, summary, validate_fp32,
)
from movq_deploy.models.checkpoint import load_models
from movq_deploy.sampling import SamplingDefaults, check_guidance_scale

EXPORTER = "dynamo"  # recorded in each graph's manifest entry


def _fp32_graph(spec: GraphSpec, work: Path) -> "tuple[onnx.ModelProto, dict]":
    """Exported from PyTorch, checked, and validated against PyTorch."""
    path = work / f"{spec.name}.onnx"
    export_graph(spec, path)
    model = finalize_graph(spec, path, io_shapes(spec))
    return model, validate_fp32(spec, path)


def _fp16_graph(spec: GraphSpec, work: Path) -> "tuple[onnx.ModelProto, dict]":
    """Converted from the fp32 graph, and compared with it."""
    fp32_path, path = work / f"{spec.name}.onnx", work / f"{spec.name}.fp16.onnx"
    model = convert_fp16(spec, fp32_path, path)
    return model, compare_graphs(spec, fp32_path, path)


def _prior_states(spec: GraphSpec, work: Path, images: ImageSets, part: str, seed: int, memory: GraphMemory) -> dict:
    """Prior-step states of the first CALIBRATION_GRIDS crops of `part` ("calibration" or "held_out"): their token
    grids (fp32 encoder graph) masked along the sampling schedule (movq_deploy.export.quantize_prior)."""
    grids = images.token_grids(work / "encoder.onnx", part, memory)[:CALIBRATION_GRIDS]
    labels = getattr(images, f"{part}_labels")[:CALIBRATION_GRIDS]
    return prior_states(grids, labels, spec.module.step.prior.config, guided=spec.name == GUIDED_PRIOR,
                        rng=np.random.default_rng(seed))


def _int8_graph(spec: GraphSpec, work: Path, images: ImageSets, memory: GraphMemory) -> "tuple[onnx.ModelProto, dict]":
    """Quantized from the fp32 graph (its intermediate files in a scratch folder), calibrated on `images`, and
    compared with it: the encoder and decoder on the held-out images, the prior-step graphs on the validation
    inputs and on states of the held-out images (the random validation tokens are few and unlike real grids)."""
    fp32_path, path = work / f"{spec.name}.onnx", work / f"{spec.name}.int8.onnx"
    with tempfile.TemporaryDirectory(dir=work, prefix=".int8-") as scratch:
        if spec.name not in PRIOR_GRAPHS:
            figures = quantize_image_graph(spec.name, work, images, ImageQuantConfig(), Path(scratch), memory)
            return onnx.load(str(path)), figures
        calibration = _prior_states(spec, work, images, "calibration", seed=0, memory=memory)
        quantization = quantize_int8(spec, fp32_path, path, Path(scratch), calibration,
                                     memory.rows(spec.name, "calibrating the int8 prior", every_tensor=True,
                                                 most=STATES_PER_CALL))
    agreement = compare_graphs(spec, fp32_path, path)
    if len(images.held_out):
        held_out = _prior_states(spec, work, images, "held_out", seed=1, memory=memory)
        agreement["held_out_top_token_agreement"] = top_token_agreement(
            cpu_session(fp32_path), cpu_session(path), held_out, spec.module.step.prior.config.mask_id,
            memory.rows(spec.name, "comparing the int8 prior with fp32", most=STATES_PER_CALL))
    return onnx.load(str(path)), {**agreement, **quantization}


# precision -> (writer, the file name's infix, what its figures compare with); each precision makes every graph of
# `graph_specs` (prior_guided too, for a class-conditional prior)
PRECISIONS = {
    "fp32": (_fp32_graph, "", f"({EXPORTER}, opset {OPSET}) validated"),
    "fp16": (_fp16_graph, ".fp16", "vs fp32"),
    "int8": (_int8_graph, ".int8", "vs fp32"),  # ONNX Runtime CPU graphs only
}


def write_graphs(specs: "dict[str, GraphSpec]", work: Path, precisions: "list[str]", log: Callable[[str], None],
                 memory: GraphMemory, images: "ImageSets | None" = None) -> "tuple[dict, dict]":
    """Writes every graph of each precision into `work`, in order (fp16 and int8 start from the fp32 graph; int8
    calibrates the encoder and decoder on `images`), each loop over images `memory.rows` at a time; returns the
    manifest's "graphs" and "validation" entries."""
    graphs: dict = {}
    validation: dict = {}
    for precision in precisions:
        writer, infix, compared = PRECISIONS[precision]
        for name in specs:
            tick = time.perf_counter()
            model, figures = writer(specs[name], work, images, memory) if precision == "int8" else \
                writer(specs[name], work)
            validation.setdefault(precision, {})[name] = figures
            graphs.setdefault(precision, {})[name] = mf.file_entry(
                work, f"{name}{infix}.onnx", opset=OPSET, exporter=EXPORTER,
                inputs=tensor_specs(model.graph.input), outputs=tensor_specs(model.graph.output))
            log(f"{name:8s} {precision}  {len(model.graph.node):5d} nodes  {time.perf_counter() - tick:6.1f} s  "
                f"{compared}: {summary(figures)}")
            del model
            release_freed()  # the sessions and calibration outputs of this graph, before the next one
    for name in specs:  # what one image costs in each graph: the runtime's CPU choice and batch sizes read it
        graphs["fp32"][name]["flops_per_image"] = flops_per_image(specs[name])
        graphs["fp32"][name]["memory_per_image"] = memory.per_image[name]
    if images is not None:
        _openvino_graphs(specs, work, "int8" in precisions, log, images, graphs, validation, memory)
    for key in ("int8", OPENVINO_INT8):
        agreement = validation.get(key, {}).get("prior", {}).get("held_out_top_token_agreement", 1.0)
        if agreement < 0.95:
            log(f"warning: the {key} prior's most likely token agrees with fp32 on only {agreement:.1%} of held-out "
                f"masked slots (target 95%)")
    return graphs, validation


def _openvino_graphs(specs: "dict[str, GraphSpec]", work: Path, int8: bool, log: Callable[[str], None],
                     images: ImageSets, graphs: dict, validation: dict, memory: GraphMemory) -> None:
    """Where openvino (and nncf) are installed: the bf16 validation of every graph and, with `int8`, OpenVINO's
    int8 graphs (movq_deploy.export.openvino_graphs), into `graphs` and `validation`."""
    def states(spec, part, seed):
        if spec.name in PRIOR_GRAPHS and (part == "calibration" or len(images.held_out)):
            return _prior_states(spec, work, images, part, seed, memory)
        return None

    why_not = openvino_graphs.bf16_unavailable()
    if why_not:
        log(f"bf16 not validated: {why_not} (the CPU choice gives bf16 only to validated graphs)")
    for name, spec in specs.items():
        if why_not:
            break
        tick = time.perf_counter()
        figures = openvino_graphs.bf16_validation(spec, work, images, states(spec, "held_out", seed=1), memory)
        validation.setdefault("bf16", {})[name] = figures
        log(f"{name:8s} bf16   OpenVINO, {time.perf_counter() - tick:6.1f} s  vs fp32: {summary(figures)}")
        release_freed()
    why_not = openvino_graphs.int8_unavailable() if int8 else "--int8 not given"
    if int8 and why_not:
        log(f"no OpenVINO int8 graphs: {why_not}")
    for name, spec in specs.items():
        if why_not or name not in openvino_graphs.INT8_GRAPHS:
            continue
        tick = time.perf_counter()
        xml, weights, figures = openvino_graphs.quantize_for_openvino(
            spec, work, images, states(spec, "calibration", seed=0), states(spec, "held_out", seed=1), memory)
        validation.setdefault(OPENVINO_INT8, {})[name] = figures
        graphs.setdefault(OPENVINO_INT8, {})[name] = mf.file_entry(
            work, xml, weights=mf.file_entry(work, weights), format="openvino-ir",
            inputs=graphs["fp32"][name]["inputs"], outputs=graphs["fp32"][name]["outputs"])
        log(f"{name:8s} int8   OpenVINO (NNCF), {time.perf_counter() - tick:6.1f} s  vs fp32: {summary(figures)}")
        release_freed()


def paper_steps(conditional: bool) -> int:
    """The paper's number of MaskGIT steps T: 8 for its unconditional model (FFHQ), 12 for its class-conditional
    one (ImageNet)."""
    return 12 if conditional else 8


def load_exportable(ckpt_path: Path):
    """(movq, prior, ckpt) of a two-stage checkpoint whose prior fits its tokenizer; else a one-line ValueError."""
    try:
        movq, prior, ckpt = load_models(ckpt_path)
    except (FileNotFoundError, ValueError):
        raise
    except Exception as error:  # torch.load's legacy unpickler raises KeyError & co. on some foreign files
        raise ValueError(f"{ckpt_path} cannot be loaded: not a torch checkpoint ({one_line(error)})") from None
    if prior is None:
        raise ValueError(f"{ckpt_path} holds no prior (a stage-1 checkpoint): train the prior (train/prior.py) first")
    if prior.config.grid != movq.config.grid or prior.config.codebook_size != movq.config.codebook_size:
        raise ValueError(f"{ckpt_path}: the prior's grid/codebook {prior.config.grid}/{prior.config.codebook_size} "
                         f"do not match the tokenizer's {movq.config.grid}/{movq.config.codebook_size}")
    return movq, prior, ckpt


def export_engine_dir(
    ckpt_path: "str | os.PathLike[str]",
    out: "str | os.PathLike[str]" = "engines",
    steps: "int | None" = None,
    fp16: bool = False,
    int8: bool = False,
    log: Callable[[str], None] = print,
    calibration_data: "str | os.PathLike[str] | None" = None,
    guidance_scale: float = 0.0,
    memory_budget: "str | int | None" = None,
) -> EngineDir:
    """Exports, checks and validates every graph of ckpt_path into `out`; returns the engine directory written.

    `steps` is the sampling default recorded in the manifest; None follows the paper (`paper_steps`). int8: the
    int8 prior-step graphs, encoder and decoder, with static activation scales calibrated on `calibration_data`
    (the prior on the images' token grids; an image folder;
    default: the data the tokenizer was trained on, else scikit-image's photographs). `guidance_scale` is the
    classifier-free guidance default recorded in the manifest (class-conditional priors only; 0 = unguided).
    `memory_budget` bounds every batched loop over images (movq_deploy.memory; default $MOVQ_MEMORY_BUDGET, else a
    share of the memory available)."""
    if steps is not None and steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    guidance_scale = check_guidance_scale(guidance_scale, 1)
    out, ckpt_path = Path(out), Path(ckpt_path)
    _check_out(out)
    movq, prior, ckpt = load_exportable(ckpt_path)
    ckpt = {key: value for key, value in ckpt.items() if key not in ("tokenizer", "prior")}  # weights: in the models
    if guidance_scale and not prior.config.conditional:
        raise ValueError(f"--guidance-scale {guidance_scale:g} needs a class-conditional prior; {ckpt_path.name}'s "
                         f"is unconditional (leave the default 0)")
    steps = steps if steps is not None else paper_steps(prior.config.conditional)
    started = time.perf_counter()
    specs = graph_specs(movq, prior)
    memory = GraphMemory.measure(specs, memory_budget)
    log(f"memory per image (peak / every tensor): " + ", ".join(
        f"{name} {format_bytes(cost['peak'])} / {format_bytes(cost['allocated'])}"
        for name, cost in memory.per_image.items()) + f"; budget {memory.budget}")
    for name in specs:  # a budget below one image is refused now, not after minutes of exporting
        memory.rows(name, "exporting", every_tensor=int8)
    work = make_work_dir(out)
    try:
        precisions = ["fp32"] + ["fp16"] * fp16 + ["int8"] * int8
        # Training crops and held-out crops: the int8 calibration and every agreement on held-out data (int8, and
        # bf16 where it can be validated here)
        needs_images = int8 or openvino_graphs.bf16_unavailable() is None
        images = load_image_sets(movq.config.image_size, ImageQuantConfig.calibration_images, calibration_data,
                                 ckpt.get("record")) if needs_images else None
        graphs, validation = write_graphs(specs, work, precisions, log, memory, images)
        defaults = SamplingDefaults(steps=steps, guidance_scale=guidance_scale)
        engine_dir = build_engine_dir(work, movq, prior, ckpt, ckpt_path, defaults, graphs, validation,
                                      seconds=time.perf_counter() - started)
        engine_dir.engines = carry_over_engines(out, work, graphs)
        if engine_dir.engines:
            kept = sum(map(len, engine_dir.engines.values()))
            log(f"kept {kept} TensorRT engine(s) whose ONNX graph did not change")
        engine_dir.write()
        _replace_dir(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(format_table(validation))
    log(f"wrote {out}/ in {time.perf_counter() - started:.1f} s")
    return engine_dir.moved_to(out)


def build_engine_dir(path: Path, movq, prior, ckpt: dict, ckpt_path: Path, sampling: SamplingDefaults,
                     graphs: dict, validation: dict, seconds: float) -> EngineDir:
    """The engine directory's manifest, at `path`: the model, its grid, the sampling defaults, the graphs, the
    validation figures and where it came from."""
    return EngineDir(
        path=path, model={"tokenizer": movq.config.to_dict(), "prior": prior.config.to_dict()},
        grid=Grid(*movq.config.grid), codebook_size=movq.config.codebook_size, image_size=movq.config.image_size,
        num_classes=prior.config.num_classes, class_names=list(ckpt.get("class_names", [])),
        sampling=sampling, graphs=graphs,
        validation={"batch_sizes": list(VALIDATION_BATCHES), "tolerance": dict(TOLERANCE), **validation},
        export={"checkpoint": ckpt_path.name, "checkpoint_sha256": mf.sha256_file(ckpt_path),
                "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                "seconds": round(seconds, 2)},
    )
