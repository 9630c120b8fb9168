"""What a benchmark measures: the engine directory and the checkpoint of its PyTorch peers (found where make demo
and export/to_onnx.py put them, or freshly initialized models of a preset size exported to a temporary folder), and
the inputs of each engine call. Shared by latency.py and ort_settings.py."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from movq_deploy import contract, sampling
from movq_deploy.files import sha256_file
from movq_deploy.manifest import EngineDir
from movq_deploy.models.checkpoint import load_models, save_checkpoint

CONFIGS = {"tiny": ("tiny", "tiny"), "paper": ("paper-f16", "paper")}  # --config -> (MoVQ preset, prior preset)
DEFAULT_ENGINE_DIRS = ("engines", "runs/demo/engines")  # export/to_onnx.py's default --out, then what make demo writes


def export_fresh_models(config: str, workdir: Path) -> "tuple[Path, Path]":
    """Freshly initialized models of `config` size (speed does not depend on the weights) saved as a checkpoint
    and exported with export/to_onnx.py (fp32 + int8; fp16 too where a GPU backend can run ONNX graphs). A
    `workdir` that already holds them (a finished export of this config) is reused: the paper-size export takes
    tens of minutes."""
    import importlib.util

    from movq_deploy.export.pipeline import export_engine_dir
    from movq_deploy.backends.onnxruntime import cuda_available
    from movq_deploy.models.movq import MoVQ, MoVQConfig
    from movq_deploy.models.prior import MaskGITPrior, PriorConfig

    engine_dir, ckpt_path = workdir / "engines", workdir / "ckpt.pt"
    if (engine_dir / "manifest.json").is_file() and ckpt_path.is_file():
        return engine_dir, ckpt_path
    tokenizer_preset, prior_preset = CONFIGS[config]
    torch.manual_seed(0)
    tokenizer_config = MoVQConfig.preset(tokenizer_preset)
    prior_config = PriorConfig.preset(prior_preset, tokenizer_config)
    movq, prior = MoVQ(tokenizer_config), MaskGITPrior(prior_config)
    ckpt = save_checkpoint(workdir / "ckpt.pt", tokenizer_config=tokenizer_config.to_dict(),
                           tokenizer=movq.state_dict(), prior_config=prior_config.to_dict(), prior=prior.state_dict(),
                           record={"note": f"random weights for benchmarks/latency.py --config {config}"})
    fp16 = cuda_available() or importlib.util.find_spec("tensorrt") is not None
    export_engine_dir(ckpt, engine_dir, fp16=fp16, int8=True, log=lambda line: print(f"  export: {line}", flush=True))
    return engine_dir, ckpt


def default_engine_dir() -> Path:
    for name in DEFAULT_ENGINE_DIRS:
        if (Path(name) / "manifest.json").is_file():
            return Path(name)
    raise FileNotFoundError(f"no engine directory at {' or '.join(DEFAULT_ENGINE_DIRS)}: run `make demo`, pass "
                            f"--engine-dir, or time fresh models with --config tiny")


def resolve_ckpt(ckpt: Optional[str], engines: EngineDir) -> Path:
    """`ckpt` (--ckpt), else the checkpoint the engines were exported from (it records the file name and sha256):
    looked for beside the engine directory, inside it, then in the working directory."""
    if ckpt:
        path = Path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return path
    source, engine_dir = engines.export, engines.path
    name, digest = source.get("checkpoint"), source.get("checkpoint_sha256")
    if not name:
        raise ValueError(f"{engine_dir}/manifest.json names no source checkpoint: pass --ckpt")
    for folder in (engine_dir.parent, engine_dir, Path.cwd()):
        path = folder / name
        if path.is_file() and (digest is None or sha256_file(path) == digest):
            return path
    raise FileNotFoundError(f"the checkpoint {name} the engines were exported from is not beside {engine_dir} "
                            f"(or was changed since): pass --ckpt")


def stage_feeds(stage: str, batch: int, engines: EngineDir, rng: np.random.Generator) -> dict:
    """Inputs of one engine call: the prior's first step (all slots masked; the cost is the same at every step),
    random code indices for decode, random pixels for encode."""
    h, w, c = engines.grid.shape
    if stage == "prior_step":
        n, defaults = engines.grid.num_slots, engines.sampling
        labels = sampling.resolve_class_labels(None, batch, engines.num_classes)  # the null class
        return contract.prior_step_feeds(
            np.full((batch, n), engines.mask_id, np.int32), labels, rng.random((batch, n), dtype=np.float32),
            rng.gumbel(size=(batch, n)), defaults.temperature,
            sampling.choice_scale(0, defaults.steps, defaults.choice_temperature))
    if stage == "decode":
        return {"indices": rng.integers(0, engines.codebook_size, (batch, h, w, c), dtype=np.int32)}
    if stage == "encode":
        size = engines.image_size
        return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)}
    raise ValueError(f"unknown stage {stage!r}")


def agreement_feeds(engines: EngineDir, tokens: np.ndarray) -> "tuple[dict, np.ndarray]":
    """Prior-step feeds whose draw is an argmax (temperature 1e-4), and the bool mask of their masked slots: the
    token grids `tokens` [B, N] half masked at random, then all masked (the first step): 2B states."""
    rng = np.random.default_rng(0)
    mask_id = engines.mask_id
    half = np.where(rng.random(tokens.shape) < 0.5, mask_id, tokens).astype(np.int32)
    states = np.concatenate([half, np.full_like(half, mask_id)])  # (2B, N)
    labels = sampling.resolve_class_labels(None, len(states), engines.num_classes)
    feeds = contract.prior_step_feeds(states, labels, np.full(states.shape, 0.5), np.zeros(states.shape), 1e-4, 0.0)
    return feeds, states == mask_id


def graph_of(stage: str) -> str:
    """The graph an engine-call stage runs."""
    return {"prior_step": "prior", "decode": "decoder", "encode": "encoder"}[stage]


def load_subject(config: Optional[str], engine_dir: Optional[str], ckpt: Optional[str], workdir: Path):
    """(engines, ckpt path, movq, prior): fresh models of `config` exported into `workdir`, else `engine_dir`
    (default: default_engine_dir()) and `ckpt` (default: the checkpoint its manifest names)."""
    if config:
        path, ckpt = export_fresh_models(config, workdir)
        engines = EngineDir.load(path)
    else:
        engines = EngineDir.load(default_engine_dir() if engine_dir is None else Path(engine_dir))
        ckpt = resolve_ckpt(ckpt, engines)
    movq, prior, _ = load_models(ckpt)
    if prior is None:
        raise ValueError(f"{ckpt} holds no prior (stage 1 only): train the prior first")
    return engines, ckpt, movq, prior
