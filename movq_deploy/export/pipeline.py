"""export_engine_dir: a checkpoint to a validated engine directory (every graph exported, checked and validated; fp16
and int8 variants; the manifest), written beside the output and swapped in at the end."""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import onnx
import onnxruntime as ort
import torch

from movq_deploy import manifest as mf
from movq_deploy.manifest import EngineDir, Grid
from movq_deploy.export.directory import _check_out, _replace_dir, carry_over_engines
from movq_deploy.export.onnx_graph import EXPORTERS, OPSETS, export_graph, finalize_graph, tensor_specs
from movq_deploy.export.precision import convert_fp16, quantize_int8
from movq_deploy.export.specs import graph_specs, io_shapes, one_line
from movq_deploy.export.validation import TOLERANCE, VALIDATION_BATCHES, compare_graphs, format_table, summary, validate_fp32
from movq_deploy.models.checkpoint import load_models
from movq_deploy.sampling import SamplingDefaults

def _graph_entry(engine_dir: Path, file: str, model: onnx.ModelProto, opset: int, exporter: str) -> dict:
    return mf.file_entry(engine_dir, file, opset=opset, exporter=exporter, inputs=tensor_specs(model.graph.input),
                         outputs=tensor_specs(model.graph.output))


def export_engine_dir(
    ckpt_path: "str | os.PathLike[str]",
    out: "str | os.PathLike[str]" = "engines",
    steps: int = SamplingDefaults.steps,
    fp16: bool = False,
    int8: bool = False,
    opset: int = 18,
    exporter: str = "auto",
    log: Callable[[str], None] = print,
) -> EngineDir:
    """Exports, checks and validates every graph of ckpt_path into `out`; returns the engine directory written."""
    if opset not in OPSETS:
        raise ValueError(f"opset must be one of {OPSETS} (TensorRT parses 17-18), got {opset}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if steps <= 0:
        raise ValueError(f"steps must be positive, got {steps}")
    out = Path(out)
    _check_out(out)
    ckpt_path = Path(ckpt_path)
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
    started = time.perf_counter()
    specs = graph_specs(movq, prior)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(work, 0o777 & ~umask)  # mkdtemp makes it private; the engine directory is an ordinary one
    try:
        graphs, validation, exporters = {"fp32": {}}, {"fp32": {}}, {}
        for name, spec in specs.items():
            tick = time.perf_counter()
            exporters[name] = export_graph(spec, work / f"{name}.onnx", opset, exporter, log)
            model = finalize_graph(spec, work / f"{name}.onnx", opset, io_shapes(spec))
            validation["fp32"][name] = validate_fp32(spec, work / f"{name}.onnx")
            graphs["fp32"][name] = _graph_entry(work, f"{name}.onnx", model, opset, exporters[name])
            log(f"{name:8s} fp32  {len(model.graph.node):5d} nodes  {time.perf_counter() - tick:6.1f} s  "
                f"({exporters[name]}, opset {opset}) validated: {summary(validation['fp32'][name])}")
        if fp16:
            graphs["fp16"], validation["fp16"] = {}, {}
            for name, spec in specs.items():
                tick = time.perf_counter()
                model = convert_fp16(spec, work / f"{name}.onnx", work / f"{name}.fp16.onnx", opset)
                validation["fp16"][name] = compare_graphs(spec, work / f"{name}.onnx", work / f"{name}.fp16.onnx")
                graphs["fp16"][name] = _graph_entry(work, f"{name}.fp16.onnx", model, opset, exporters[name])
                log(f"{name:8s} fp16  {len(model.graph.node):5d} nodes  {time.perf_counter() - tick:6.1f} s  "
                    f"vs fp32: {summary(validation['fp16'][name])}")
        if int8:
            tick = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.int8-") as scratch:
                fusions = quantize_int8(specs["prior"], work / "prior.onnx", work / "prior.int8.onnx", Path(scratch))
            agreement = compare_graphs(specs["prior"], work / "prior.onnx", work / "prior.int8.onnx")
            validation["int8"] = {"prior": {**agreement, "fusions": fusions}}
            model = onnx.load(str(work / "prior.int8.onnx"))
            graphs["int8"] = {"prior": _graph_entry(work, "prior.int8.onnx", model, opset, exporters["prior"])}
            log(f"{'prior':8s} int8  {len(model.graph.node):5d} nodes  {time.perf_counter() - tick:6.1f} s  "
                f"vs fp32: {summary(agreement)}")
            if agreement["top_token_agreement"] < 0.95:
                log(f"warning: the int8 prior's most likely token agrees with fp32 on only "
                    f"{agreement['top_token_agreement']:.1%} of slots (target 95%)")
        engine_dir = build_engine_dir(work, movq, prior, ckpt, ckpt_path, steps, graphs, validation,
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


def build_engine_dir(path: Path, movq, prior, ckpt: dict, ckpt_path: Path, steps: int, graphs: dict,
                     validation: dict, seconds: float) -> EngineDir:
    """The engine directory's manifest, at `path`: the model, its grid, the sampling defaults, the graphs, the
    validation figures and where it came from."""
    return EngineDir(
        path=path, model={"tokenizer": movq.config.to_dict(), "prior": prior.config.to_dict()},
        grid=Grid(*movq.config.grid), codebook_size=movq.config.codebook_size, image_size=movq.config.image_size,
        num_classes=prior.config.num_classes, class_names=list(ckpt.get("class_names", [])),
        sampling=SamplingDefaults(steps=steps), graphs=graphs,
        validation={"batch_sizes": list(VALIDATION_BATCHES), "tolerance": dict(TOLERANCE), **validation},
        export={"checkpoint": ckpt_path.name, "checkpoint_sha256": mf.sha256_file(ckpt_path),
                "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                "seconds": round(seconds, 2)},
    )
