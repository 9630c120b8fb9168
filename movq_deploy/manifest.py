"""An engine directory, typed: its manifest.json and the checks that make a stale or altered file fail loudly.

Written by the exporter (export/to_onnx.py: model, grid, sampling defaults, "graphs", "validation", "export") and
by export/build_trt.py ("engines"); read by the runtime. torch-free. Layout
(docs/DESIGN.md, "The engine directory"):

    {"format": "movq-deploy-engines", "format_version": 2,
     "model": {"tokenizer": {...}, "prior": {...}}, "grid": {"h", "w", "c"}, "codebook_size": K, "mask_id": K,
     "image_size": H, "num_classes": n, "class_names": [...],
     "sampling": {"steps", "temperature", "choice_temperature", "guidance_scale" (optional, 0 when absent)},
     "graphs": {precision: {graph name: {"file", "sha256", "opset", "exporter", "inputs", "outputs"}}},
     "validation": {"batch_sizes", "tolerance", precision: {graph name: {figure: value}}},
     "export": {"checkpoint", "checkpoint_sha256", "torch", "onnx", "onnxruntime", "seconds"},
     "engines": {precision: {graph name: {"file", "sha256", "onnx_sha256", ...}}}}   # export/build_trt.py

A class-conditional export also lists the "prior_guided" graph (classifier-free guidance) at every precision, and
its engines; directories exported before it lack it (EngineDir.graph_names says which graphs a directory has).
precision is "fp32" | "fp16" | "int8" | "int8-openvino" (int8: ONNX Runtime CPU graphs with activation scales fixed
at export: the prior-step graphs, encoder and decoder; directories exported before those list the prior only, and
use the fp32 encoder and decoder; int8-openvino: NNCF's int8 graphs for OpenVINO, OpenVINO IR whose entry holds a
"weights" entry for the .bin). The fp32 entries carry "flops_per_image"; "validation" also holds "bf16" (OpenVINO's
bf16 of the fp32 graphs, which has no file of its own), read by movq_deploy.backends.cpu_choice.
A graph's "inputs"/"outputs" are lists of {"name", "dtype" (numpy dtype name), "shape" (ints, "batch"
for the dynamic axis)}, as movq_deploy.contract names them. "validation" holds the errors measured at export (fp32
against PyTorch, fp16 and int8 against the fp32 graph; the int8 encoder's "index_agreement" and decoder's
"psnr_db" on held-out data) and "export" the provenance (the checkpoint the engines came
from and the tool versions), for people and for benchmarks/latency.py, which finds the checkpoint by it.
Version 2 made the prior step's temperature and choice_scale per-image inputs [B]; version 1 took one value [1].
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional

from movq_deploy.contract import GRAPH_NAMES, GUIDED_PRIOR, OPTIONAL_GRAPHS
from movq_deploy.files import atomic_write_text, sha256_file
from movq_deploy.sampling import SamplingDefaults

FORMAT = "movq-deploy-engines"
FORMAT_VERSION = 2
MANIFEST_NAME = "manifest.json"
REEXPORT = "re-export with export/to_onnx.py"


@dataclass(frozen=True)
class Grid:
    """The latent token grid: h x w positions, c tokens (channel chunks) per position."""

    h: int
    w: int
    c: int

    @property
    def shape(self) -> "tuple[int, int, int]":
        return self.h, self.w, self.c

    @property
    def num_slots(self) -> int:  # N, the prior's sequence length
        return self.h * self.w * self.c


@dataclass
class EngineDir:
    """An engine directory: where it lies, what its manifest says, and the files it lists (verified on use)."""

    path: Path
    model: Dict[str, dict]  # {"tokenizer": MoVQConfig dict, "prior": PriorConfig dict}
    grid: Grid
    codebook_size: int  # K; the mask token is K
    image_size: int
    num_classes: int = 0  # 0: unconditional prior (no class_labels input); else class ids 0..n-1, n = no class
    class_names: List[str] = field(default_factory=list)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    graphs: Dict[str, Dict[str, dict]] = field(default_factory=dict)  # precision -> graph -> ONNX file entry
    engines: Dict[str, Dict[str, dict]] = field(default_factory=dict)  # precision -> graph -> TensorRT plan entry
    validation: Dict[str, Any] = field(default_factory=dict)
    export: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.path = Path(self.path)

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST_NAME

    # ---- reading and writing -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: "str | os.PathLike[str]") -> "EngineDir":
        """Reads and checks path/manifest.json; raises FileNotFoundError / ValueError with a one-line message."""
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"engine directory {path} does not exist (run export/to_onnx.py first)")
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} is missing: {path} is not an engine directory")
        try:
            data = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{manifest_path} is not valid JSON ({error})") from None
        return cls.from_dict(path, data)

    @classmethod
    def from_dict(cls, path: "str | os.PathLike[str]", data: Any) -> "EngineDir":
        """The EngineDir of a parsed manifest; ValueError (one line, naming the key) for anything missing."""
        where = Path(path) / MANIFEST_NAME
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"{where} is not a {FORMAT} manifest (format {found!r})")
        version = data.get("format_version")
        if version == 1:
            raise ValueError(f"{where} has format version 1, whose prior graph takes one temperature per call; "
                             f"this movq-deploy reads version {FORMAT_VERSION}: {REEXPORT}")
        if version != FORMAT_VERSION:
            raise ValueError(f"{where} has format version {version!r}; this movq-deploy reads version "
                             f"{FORMAT_VERSION}: {REEXPORT}")
        read = _Reader(data, where)
        guidance_scale = read.float("sampling.guidance_scale", optional=True)
        sampling = SamplingDefaults(read.int("sampling.steps"), read.float("sampling.temperature"),
                                    read.float("sampling.choice_temperature"),
                                    0.0 if guidance_scale is None else guidance_scale)
        engine_dir = cls(
            path=Path(path), model=read.dict("model"),
            grid=Grid(read.int("grid.h"), read.int("grid.w"), read.int("grid.c")),
            codebook_size=read.int("codebook_size"), image_size=read.int("image_size"),
            num_classes=read.int("num_classes"), class_names=read.list("class_names"), sampling=sampling,
            graphs=read.dict("graphs"), engines=read.dict("engines", optional=True),
            validation=read.dict("validation", optional=True), export=read.dict("export", optional=True),
        )
        if read.int("mask_id") != engine_dir.codebook_size:
            raise ValueError(f"{where}: mask_id {data['mask_id']} must equal codebook_size "
                             f"{engine_dir.codebook_size}; {REEXPORT}")
        if engine_dir.class_names and len(engine_dir.class_names) != engine_dir.num_classes:
            raise ValueError(f"{where}: {len(engine_dir.class_names)} class_names for num_classes "
                             f"{engine_dir.num_classes}; {REEXPORT}")
        return engine_dir

    def to_dict(self) -> dict:
        """The manifest as JSON data, format and version stamped."""
        data = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "model": self.model,
            "grid": {"h": self.grid.h, "w": self.grid.w, "c": self.grid.c},
            "codebook_size": self.codebook_size, "mask_id": self.mask_id, "image_size": self.image_size,
            "num_classes": self.num_classes, "class_names": list(self.class_names),
            "sampling": {"steps": self.sampling.steps, "temperature": self.sampling.temperature,
                         "choice_temperature": self.sampling.choice_temperature,
                         "guidance_scale": self.sampling.guidance_scale},
            "graphs": self.graphs, "validation": self.validation, "export": self.export,
        }
        if self.engines:
            data["engines"] = self.engines
        return data

    def write(self) -> Path:
        """Writes path/manifest.json atomically (a temporary name, then a rename); returns its path."""
        atomic_write_text(self.manifest_path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return self.manifest_path

    def moved_to(self, path: "str | os.PathLike[str]") -> "EngineDir":
        """The same manifest for a directory renamed to `path`."""
        return replace(self, path=Path(path))

    # ---- graphs and engines ------------------------------------------------------------------------------------
    @property
    def graph_names(self) -> "tuple[str, ...]":
        """The graphs this directory has: encoder, decoder, prior, and prior_guided when its fp32 graphs list it
        (class-conditional exports since guidance; each precision of it then has it too)."""
        return GRAPH_NAMES + tuple(name for name in OPTIONAL_GRAPHS if self.graph("fp32", name) is not None)

    @property
    def guided(self) -> bool:
        """Whether this directory can sample with classifier-free guidance (it has the prior_guided graph)."""
        return GUIDED_PRIOR in self.graph_names

    def graph(self, precision: str, name: str) -> Optional[dict]:
        """The ONNX file entry of graph `name` at `precision`, or None."""
        return self.graphs.get(precision, {}).get(name)

    def graph_entries(self, precision: str) -> Dict[str, dict]:
        """{graph name: ONNX file entry} of the directory's graphs (`graph_names`) at `precision`; FileNotFoundError
        naming a missing one.

        "int8": the int8 prior, encoder and decoder; a directory exported before the encoder and decoder were
        quantized lists the int8 prior only, and its fp32 encoder and decoder are used.
        """
        entries = {}
        for name in self.graph_names:
            fallback = precision == "int8" and name in ("encoder", "decoder") and self.graph("int8", name) is None
            graph_precision = "fp32" if fallback else precision
            entry = self.graph(graph_precision, name)
            if entry is None:
                hint = {"int8": " (export with --int8)", "fp16": " (export with --fp16)"}.get(graph_precision, "")
                raise FileNotFoundError(f"{self.manifest_path} lists no {graph_precision} {name} graph{hint}")
            entries[name] = entry
        return entries

    def engine(self, precision: str, name: str) -> Optional[dict]:
        """The TensorRT plan entry of graph `name` at `precision`, or None."""
        return self.engines.get(precision, {}).get(name)

    def set_engine(self, precision: str, name: str, entry: dict) -> None:
        self.engines.setdefault(precision, {})[name] = entry

    def verify(self, entry: dict) -> Path:
        """The path of the file an entry ({"file", "sha256", ...}) names, checked to exist and be unaltered."""
        return verify_file(self.path, entry)

    def file_entry(self, file: str, **fields: Any) -> dict:
        """A manifest entry for path/file: {"file", "sha256", **fields} (the hash is taken now)."""
        return file_entry(self.path, file, **fields)


def verify_file(directory: "str | os.PathLike[str]", entry: dict) -> Path:
    """Checks that the file named by a manifest entry ({"file", "sha256", ...}) exists and is unaltered, and so is
    the entry's "weights" file where it has one (OpenVINO IR: the .xml's .bin).

    Returns its path. Raises FileNotFoundError (missing) or ValueError (sha256 mismatch), naming the file.
    """
    if "weights" in entry:
        verify_file(directory, entry["weights"])
    path = Path(directory) / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} listed in {MANIFEST_NAME} is missing")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise ValueError(
            f"{path} does not match {MANIFEST_NAME} (sha256 {actual[:12]}…, expected {entry['sha256'][:12]}…): "
            f"the file was altered or replaced; re-export the engine directory"
        )
    return path


def file_entry(directory: "str | os.PathLike[str]", file: str, **fields: Any) -> dict:
    """A manifest entry for directory/file: {"file", "sha256", **fields} (the hash is taken now)."""
    return {"file": file, "sha256": sha256_file(Path(directory) / file), **fields}


class _Reader:
    """Typed reads of dotted keys ("grid.h") from manifest data, each failing in one line that names the key."""

    def __init__(self, data: dict, where: Path):
        self.data, self.where = data, where

    def _get(self, key: str, optional: bool = False):
        value: Any = self.data
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                if optional:
                    return None
                raise ValueError(f"{self.where}: key {key!r} is missing; {REEXPORT}")
            value = value[part]
        return value

    def _typed(self, key: str, kinds, what: str, optional: bool = False):
        value = self._get(key, optional)
        if value is None and optional:
            return None
        if not isinstance(value, kinds) or isinstance(value, bool):
            raise ValueError(f"{self.where}: key {key!r} must be {what}, got {value!r}; {REEXPORT}")
        return value

    def int(self, key: str) -> int:
        return self._typed(key, int, "an int")

    def float(self, key: str, optional: bool = False) -> Optional[float]:
        value = self._typed(key, (int, float), "a number", optional)
        return None if value is None else float(value)

    def list(self, key: str) -> list:
        return list(self._typed(key, list, "a list"))

    def dict(self, key: str, optional: bool = False) -> dict:
        value = self._typed(key, dict, "an object", optional)
        return {} if value is None else value
