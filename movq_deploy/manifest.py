"""manifest.json: what an engine directory holds, and the checks that make a stale or altered file fail loudly.

Written by export/to_onnx.py (model, sampling defaults, "graphs", "validation") and export/build_trt.py
("engines"); read by the runtime. numpy-free and torch-free: json + hashlib only. Layout (see CONTRACTS.md):

    {"format": "movq-deploy-engines", "format_version": 1,
     "model": {"tokenizer": {...}, "prior": {...}}, "grid": {"h", "w", "c"}, "codebook_size": K, "mask_id": K,
     "image_size": H, "num_classes": n, "class_names": [...],
     "sampling": {"steps", "remask_counts", "temperature", "choice_temperature"},
     "graphs": {precision: {graph name: {"file", "sha256", "opset", "precision", "exporter", "inputs", "outputs"}}},
     "validation": {"batch_sizes", "tolerance", precision: {graph name: {figure: value}}},
     "export": {"checkpoint", "checkpoint_sha256", "torch", "onnx", "onnxruntime", "seconds"},
     "engines": {precision: {graph name: {"file", "sha256", "onnx_sha256", ...}}}}   # export/build_trt.py

precision is "fp32" | "fp16" | "int8" (int8: "prior" only, an ONNX Runtime CPU graph; use the fp32 encoder and
decoder with it). A graph's "inputs"/"outputs" are lists of {"name", "dtype" (numpy dtype name), "shape" (ints,
"batch" for the dynamic axis)}. "validation" holds the errors measured at export: fp32 against PyTorch, fp16 and
int8 against the fp32 graph (e.g. "top_token_agreement" of the prior).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from movq_deploy.files import atomic_write_text, sha256_file

FORMAT = "movq-deploy-engines"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
GRAPH_NAMES = ("encoder", "decoder", "prior")


def load_manifest(engine_dir: "str | os.PathLike[str]") -> dict:
    """Reads and checks engine_dir/manifest.json; raises FileNotFoundError / ValueError with a one-line message."""
    engine_dir = Path(engine_dir)
    if not engine_dir.is_dir():
        raise FileNotFoundError(f"engine directory {engine_dir} does not exist (run export/to_onnx.py first)")
    path = engine_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: {engine_dir} is not an engine directory")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} is not a {FORMAT} manifest (format {found!r})")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {version!r}; this movq-deploy reads version {FORMAT_VERSION} "
            f"(re-export the engine directory)"
        )
    return manifest


def verify_file(engine_dir: "str | os.PathLike[str]", entry: dict) -> Path:
    """Checks that the file named by a manifest entry ({"file", "sha256", ...}) exists and is unaltered.

    Returns its path. Raises FileNotFoundError (missing) or ValueError (sha256 mismatch), naming the file.
    """
    path = Path(engine_dir) / entry["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path} listed in {MANIFEST_NAME} is missing")
    actual = sha256_file(path)
    if actual != entry["sha256"]:
        raise ValueError(
            f"{path} does not match {MANIFEST_NAME} (sha256 {actual[:12]}…, expected {entry['sha256'][:12]}…): "
            f"the file was altered or replaced; re-export the engine directory"
        )
    return path


def file_entry(engine_dir: "str | os.PathLike[str]", file: str, **fields: Any) -> dict:
    """A manifest entry for engine_dir/file: {"file", "sha256", **fields} (the hash is taken now)."""
    return {"file": file, "sha256": sha256_file(Path(engine_dir) / file), **fields}


def write_manifest(engine_dir: "str | os.PathLike[str]", manifest: dict) -> Path:
    """Writes engine_dir/manifest.json atomically (format and version stamped); returns its path."""
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    if manifest["format"] != FORMAT or manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(f"refusing to write a manifest of format {manifest['format']!r} v{manifest['format_version']}")
    path = Path(engine_dir) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=2, allow_nan=False) + "\n")
    return path
