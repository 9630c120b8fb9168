"""The graph contract: the inputs and outputs of the exported graphs, and how the sampling loop feeds them.

This module is the deployment boundary written once. The exporter names the ONNX inputs and outputs from it, the
runtime checks every runner against it, and the runtime, the PyTorch reference and the benchmarks build the
prior-step feeds with `prior_step_feeds` and plug a runner into the loop with `runner_step_fn`.

    encoder  image uint8 [B,H,W,3]                                     -> indices int32 [B,h,w,c]
    decoder  indices int32 [B,h,w,c]                                   -> image uint8 [B,H,W,3]
    prior    tokens int32 [B,N], class_labels int32 [B] (conditional),  -> sampled int32 [B,N],
             uniform f32 [B,N], gumbel f32 [B,N],                          confidence f32 [B,N]
             temperature f32 [B], choice_scale f32 [B]
    prior_guided  the conditional prior's inputs + guidance_scale f32 [B]  -> sampled, confidence (as prior)
             (class-conditional priors only: classifier-free guidance, logits = cond + w * (cond - uncond))

B is the dynamic batch axis, named "batch" in every graph; N = h*w*c. temperature, choice_scale and guidance_scale
are per image, so images of different requests, at different steps, can share one prior call. Every engine
directory has the three graphs of GRAPH_NAMES; a class-conditional export also has prior_guided (OPTIONAL_GRAPHS;
directories exported before it lack it and refuse guidance). numpy only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union

import numpy as np

GRAPH_NAMES = ("encoder", "decoder", "prior")  # every engine directory has these
GUIDED_PRIOR = "prior_guided"
OPTIONAL_GRAPHS = (GUIDED_PRIOR,)  # class-conditional exports only
PRIOR_GRAPHS = ("prior", GUIDED_PRIOR)  # the prior-step graphs: same outputs, same sampling tail
BATCH = "batch"  # the name of the dynamic batch axis
PRIOR_OUTPUTS = ("sampled", "confidence")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "uint8", "int32", "float32", ...
    shape: Tuple[Union[int, str], ...]  # "batch" for the dynamic axis


@dataclass(frozen=True)
class GraphIO:
    """The inputs and outputs of one graph, in order."""

    name: str
    inputs: Tuple[TensorSpec, ...]
    outputs: Tuple[TensorSpec, ...]

    @property
    def input_names(self) -> List[str]:
        return [spec.name for spec in self.inputs]

    @property
    def output_names(self) -> List[str]:
        return [spec.name for spec in self.outputs]


class PriorRunner(Protocol):
    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]: ...


def graph_io(name: str, image_size: int, grid: Sequence[int], conditional: bool) -> GraphIO:
    """The contract of graph `name` ("encoder", "decoder", "prior" or "prior_guided") for a model of this size."""
    h, w, c = grid
    image = TensorSpec("image", "uint8", (BATCH, image_size, image_size, 3))
    indices = TensorSpec("indices", "int32", (BATCH, h, w, c))
    if name == "encoder":
        return GraphIO(name, (image,), (indices,))
    if name == "decoder":
        return GraphIO(name, (indices,), (image,))
    if name not in PRIOR_GRAPHS:
        raise ValueError(f"graph must be one of {', '.join(GRAPH_NAMES + OPTIONAL_GRAPHS)}, got {name!r}")
    if name == GUIDED_PRIOR and not conditional:
        raise ValueError("the prior_guided graph exists for class-conditional priors only")
    slots = (BATCH, h * w * c)
    labels = (TensorSpec("class_labels", "int32", (BATCH,)),) if conditional else ()
    guidance = (TensorSpec("guidance_scale", "float32", (BATCH,)),) if name == GUIDED_PRIOR else ()
    inputs = (TensorSpec("tokens", "int32", slots), *labels, TensorSpec("uniform", "float32", slots),
              TensorSpec("gumbel", "float32", slots), TensorSpec("temperature", "float32", (BATCH,)),
              TensorSpec("choice_scale", "float32", (BATCH,)), *guidance)
    outputs = (TensorSpec("sampled", "int32", slots), TensorSpec("confidence", "float32", slots))
    return GraphIO(name, inputs, outputs)


def prior_input_names(conditional: bool, guided: bool = False) -> List[str]:
    """The prior step's input names, in graph order (without class_labels for an unconditional prior; with
    guidance_scale last for the guided graph)."""
    return graph_io(GUIDED_PRIOR if guided else "prior", 1, (1, 1, 1), conditional).input_names


def check_runner(runner, expected: GraphIO, where: str) -> None:
    """Raises ValueError (one line) unless the runner's inputs and outputs are the contract's: names, dtypes and
    shapes. `where` names the engine directory in the message."""
    for kind in ("inputs", "outputs"):
        want = sorted(_describe(spec) for spec in getattr(expected, kind))
        got = sorted(_describe(spec) for spec in getattr(runner, kind))
        if got != want:
            raise ValueError(f"{where}: the {expected.name} graph's {kind} {', '.join(got)} differ from what this "
                             f"movq-deploy feeds ({', '.join(want)}); re-export with export/to_onnx.py")


def _describe(spec: TensorSpec) -> str:
    return f"{spec.name}:{spec.dtype}[{','.join(map(str, spec.shape))}]"


def prior_step_feeds(
    tokens: np.ndarray,
    class_labels: Optional[np.ndarray],
    uniform: np.ndarray,
    gumbel: np.ndarray,
    temperature: "float | np.ndarray",
    choice_scale: "float | np.ndarray",
    guidance_scale: "float | np.ndarray | None" = None,
) -> Dict[str, np.ndarray]:
    """The prior step's feeds, named and typed as the graph takes them.

    tokens [B,N] (the mask id where unknown), class_labels [B] or None (unconditional), uniform and gumbel [B,N];
    temperature and choice_scale one number for every image or one per image [B] (cast to float32 here, once);
    guidance_scale likewise for the guided graph, None for the plain one.
    """
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    batch = len(tokens)
    feeds = {"tokens": tokens}
    if class_labels is not None:
        feeds["class_labels"] = np.ascontiguousarray(class_labels, dtype=np.int32)
    feeds["uniform"] = np.ascontiguousarray(uniform, dtype=np.float32)
    feeds["gumbel"] = np.ascontiguousarray(gumbel, dtype=np.float32)
    feeds["temperature"] = _per_image(temperature, batch, "temperature")
    feeds["choice_scale"] = _per_image(choice_scale, batch, "choice_scale")
    if guidance_scale is not None:
        feeds["guidance_scale"] = _per_image(guidance_scale, batch, "guidance_scale")
    return feeds


def _per_image(value, batch: int, name: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32)
    if array.ndim == 0:
        return np.full(batch, array, dtype=np.float32)
    if array.shape != (batch,):
        raise ValueError(f"{name} must be one number or one per image ({batch}), got shape {array.shape}")
    return np.ascontiguousarray(array)


def runner_step_fn(runner: PriorRunner, after_call: Optional[Callable[[], None]] = None,
                   guided_runner: Optional[PriorRunner] = None):
    """A movq_deploy.sampling.StepFn over the prior-step runners (anything with `run(feeds) -> outputs`).

    Rows with guidance_scale 0 run on `runner` (the plain prior graph), the others on `guided_runner` (the
    prior_guided graph), in the same step: at most two calls, results merged by row. A row's result depends on its
    own inputs only, so it does not matter which rows share a call. `after_call` is called once per step (a
    progress tick).
    """

    def step(tokens, class_labels, uniform, gumbel, temperature, choice_scale, guidance_scale=0.0):
        tokens = np.ascontiguousarray(tokens, dtype=np.int32)
        guidance = np.empty(len(tokens), dtype=np.float32)
        guidance[:] = guidance_scale  # (B,), one number or one per image
        guided = guidance != 0
        if guided.any() and guided_runner is None:
            raise ValueError("guidance_scale != 0 needs the prior_guided graph, which these runners lack")
        sampled = np.empty(tokens.shape, dtype=np.int32)
        confidence = np.empty(tokens.shape, dtype=np.float32)
        for rows, graph_runner, scale in ((~guided, runner, None), (guided, guided_runner, guidance)):
            if not rows.any():
                continue
            everything = bool(rows.all())  # no copies when one graph takes every row

            def pick(array):  # the rows of a per-row input; None and one number for all rows stay as they are
                return array if array is None or everything or np.ndim(array) == 0 else np.asarray(array)[rows]

            outputs = graph_runner.run(prior_step_feeds(
                pick(tokens), pick(class_labels), pick(uniform), pick(gumbel), pick(temperature),
                pick(choice_scale), pick(scale)))
            sampled[rows], confidence[rows] = outputs["sampled"], outputs["confidence"]
        if after_call is not None:
            after_call()
        return sampled, confidence

    return step
