"""A built engine against ONNX Runtime, with Polygraphy's comparator: the `polygraphy run --trt --onnxrt` check,
run by export/build_trt.py after each engine, with tolerances that speak of images and tokens.

    errors = check_engine(tensorrt_runner(plan), fp32_onnx_path, graph_io, precision="fp16", graph="decoder", ...)
      = comparison_feeds(...) -> run_pair(...) (Polygraphy's Comparator.run) -> figures(...) -> failures(...)

The reference is always the fp32 ONNX graph on ONNX Runtime's CPU provider: fp32 engines must match it (TF32
allowed), fp16 engines must stay close to it. Polygraphy runs the runners (activation, feeding, copying out); the
figures are ours, because "tokens agree" and "PSNR of uint8 pixels" are what a user of this model checks.
numpy + polygraphy (+ tensorrt only inside `tensorrt_runner`), no torch.
"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

# The build fails outside these. fp32 engines (TF32 allowed) against the fp32 graph; fp16 engines against it too.
TOLERANCE = {
    "fp32": {"decoder_max_pixel_error": 2, "min_grid_agreement": 0.99},
    "fp16": {"decoder_min_psnr_db": 40.0, "min_top_token_agreement": 0.99},
}
IDENTICAL_PSNR_DB = 100.0  # what identical images score (JSON has no infinity)
COLD_TEMPERATURE = 1e-4  # makes the prior's draw its most likely token: the fp16 "top token" agreement


def comparison_feeds(inputs: Sequence[dict], codebook_size: int, num_classes: int, batches: Sequence[int],
                     seed: int = 0) -> List[Dict[str, np.ndarray]]:
    """Fixed inputs for one graph, one feed dict per batch size, from its I/O specs ({"name", "dtype", "shape"}).

    Images are smooth ramps plus noise, indices uniform codes, prior tokens 60% masked (the first feed fully
    masked, as at the first sampling step). A prior gets each feed twice more at a cold temperature, for the
    top-token agreement.
    """
    rng = np.random.default_rng(seed)
    feeds = []
    for index, batch in enumerate(batches):
        feed = {spec["name"]: comparison_input(spec, batch, rng, codebook_size, num_classes, first=index == 0)
                for spec in inputs}
        feeds.append(feed)
    if any(spec["name"] == "temperature" for spec in inputs):
        feeds += [{**feed, "temperature": np.full_like(feed["temperature"], COLD_TEMPERATURE)} for feed in feeds]
    return feeds


def comparison_input(spec: dict, batch: int, rng, codebook_size: int, num_classes: int,
                     first: bool = False) -> np.ndarray:
    """One graph input of `spec` at `batch`, as comparison_feeds describes (first: all prior tokens masked)."""
    shape = tuple(batch if dim == "batch" else int(dim) for dim in spec["shape"])
    name = spec["name"]
    if name == "image":  # (B, H, W, 3)
        ramp = np.linspace(0, 255, shape[1], dtype=np.float32)
        base = (ramp[None, :, None, None] + ramp[None, None, :, None]) / 2 * rng.random((batch, 1, 1, 3))
        value = np.clip(base + rng.normal(0, 24, shape), 0, 255)
    elif name == "indices":
        value = rng.integers(0, codebook_size, shape)
    elif name == "tokens":
        value = np.where(rng.random(shape) < 0.6, codebook_size, rng.integers(0, codebook_size, shape))
        if first:
            value[:] = codebook_size
    elif name == "class_labels":
        value = rng.integers(0, num_classes + 1, shape)
    elif name == "uniform":
        value = rng.random(shape)
    elif name == "gumbel":
        value = rng.gumbel(size=shape)
    elif name == "temperature":
        value = np.ones(shape)
    elif name == "choice_scale":
        value = np.full(shape, 2.0)
    elif name == "guidance_scale":  # the guided prior: unguided rows and guided ones
        value = rng.choice([0.0, 1.0, 3.0], shape)
    else:
        raise ValueError(f"no comparison input for graph input {name!r}")
    return value.astype(spec["dtype"])


def run_pair(candidate, reference, feeds: Sequence[Dict[str, np.ndarray]]):
    """Polygraphy's Comparator.run over both runners (each activated, fed every feed, deactivated): RunResults."""
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    G_LOGGER.colors = False  # plain text in build logs (and no warning that the `colored` module is missing)
    with G_LOGGER.verbosity(G_LOGGER.ERROR):  # our figures are the report; its per-run lines are noise here
        return Comparator.run([candidate, reference], data_loader=list(feeds))


def figures(graph: str, results) -> dict:
    """Error figures of the first runner of `results` against the second, over every feed."""
    (_, candidate), (_, reference) = list(results.items())
    if graph == "decoder":
        ours = np.concatenate([out["image"] for out in candidate]).astype(np.float64)
        theirs = np.concatenate([out["image"] for out in reference]).astype(np.float64)
        mse = float(np.mean((ours - theirs) ** 2))
        psnr = IDENTICAL_PSNR_DB if mse == 0 else min(IDENTICAL_PSNR_DB, float(10 * np.log10(255.0 ** 2 / mse)))
        return {"max_pixel_error": int(np.abs(ours - theirs).max()), "psnr_db": psnr}
    key = "indices" if graph == "encoder" else "sampled"
    warm = len(candidate) if graph == "encoder" else len(candidate) // 2  # the prior's cold feeds come last
    ours = np.concatenate([out[key].reshape(len(out[key]), -1) for out in candidate[:warm]])
    theirs = np.concatenate([out[key].reshape(len(out[key]), -1) for out in reference[:warm]])
    result = {"grid_agreement": float((ours == theirs).all(axis=1).mean()),
              "token_agreement": float((ours == theirs).mean())}
    if graph == "encoder":
        result["top_token_agreement"] = result["token_agreement"]  # the nearest code is the encoder's top token
    else:
        cold_ours = np.concatenate([out[key] for out in candidate[warm:]])
        cold_theirs = np.concatenate([out[key] for out in reference[warm:]])
        masked = np.concatenate([out["confidence"] for out in reference[warm:]]) != np.inf  # known slots: +inf
        result["top_token_agreement"] = float((cold_ours[masked] == cold_theirs[masked]).mean())
    return result


def failures(precision: str, graph: str, errors: dict) -> List[str]:
    """What in `errors` is outside TOLERANCE[precision], one phrase each ([] when the engine is good)."""
    limits = TOLERANCE[precision]
    checks = []  # (figure, limit, passes)
    if precision == "fp32":
        if graph == "decoder":
            checks.append(("max_pixel_error", limits["decoder_max_pixel_error"], lambda v, t: v <= t))
        else:
            checks.append(("grid_agreement", limits["min_grid_agreement"], lambda v, t: v >= t))
    elif graph == "decoder":
        checks.append(("psnr_db", limits["decoder_min_psnr_db"], lambda v, t: v >= t))
    else:
        checks.append(("top_token_agreement", limits["min_top_token_agreement"], lambda v, t: v >= t))
    return [f"{graph} {figure} {errors[figure]:.4g} (limit {limit:g})"
            for figure, limit, passes in checks if not passes(errors[figure], limit)]


class EngineMismatch(ValueError):
    """A built engine disagrees with ONNX Runtime beyond TOLERANCE."""


def check_engine(candidate, fp32_onnx_path, graph_io: Sequence[dict], *, precision: str, graph: str,
                 codebook_size: int, num_classes: int, batches: Sequence[int]) -> dict:
    """Runs `candidate` (a Polygraphy runner: the engine) and the fp32 ONNX graph on ONNX Runtime on fixed inputs at
    `batches`; returns the error figures, or raises EngineMismatch (one line) outside TOLERANCE[precision]."""
    feeds = comparison_feeds(graph_io, codebook_size, num_classes, batches)
    errors = figures(graph, run_pair(candidate, onnxruntime_runner(fp32_onnx_path), feeds))
    problems = failures(precision, graph, errors)
    if problems:
        raise EngineMismatch(f"the {precision} {graph} engine disagrees with ONNX Runtime: {'; '.join(problems)}")
    return errors


def onnxruntime_runner(onnx_path, name: str = "onnxruntime-cpu"):
    """Polygraphy's ONNX Runtime runner on the CPU provider: the reference side."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    return OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["cpu"]), name=name)


def tensorrt_runner(plan: bytes, name: str = "tensorrt"):
    """Polygraphy's TensorRT runner on a serialized engine (a debugging runner, fine for a one-off check)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    return TrtRunner(EngineFromBytes(plan), name=name)
