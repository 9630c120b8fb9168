"""Shared fixtures: one tiny random-weight model, saved as ckpt.pt and exported once per test session.

`tiny_engines` is what every runtime test (Generator, CLI, editing, backends) runs against; torch is imported only
when a test asks for it, so runtime-only test files stay torch-free at import time.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

NUM_CLASSES = 3
CLASS_NAMES = ["red", "green", "blue"]


@dataclass(frozen=True)
class TinyEngines:
    ckpt: Path  # ckpt.pt of a tiny MoVQ + prior with random weights (seeded)
    engine_dir: Path  # its export: fp32 encoder/decoder/prior (+ int8 graphs), manifest.json
    num_classes: int
    class_names: "list[str]"


def _export_tiny(root: Path, num_classes: int, class_names: "list[str]", seed: int, int8: bool) -> TinyEngines:
    import torch

    from movq_deploy.export.pipeline import export_engine_dir
    from movq_deploy.models.checkpoint import save_checkpoint
    from movq_deploy.models.movq import MoVQ, MoVQConfig
    from movq_deploy.models.prior import MaskGITPrior, PriorConfig

    torch.manual_seed(seed)
    movq_config = MoVQConfig.preset("tiny")
    prior_config = PriorConfig.preset("tiny", movq_config, num_classes=num_classes)
    movq, prior = MoVQ(movq_config), MaskGITPrior(prior_config)
    ckpt = save_checkpoint(root / "ckpt.pt", tokenizer_config=movq_config.to_dict(), tokenizer=movq.state_dict(),
                           prior_config=prior_config.to_dict(), prior=prior.state_dict(), class_names=class_names)
    engine_dir = root / "engines"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny graphs: one thread is as fast, and immune to a busy machine (see one_torch_thread)
    try:
        export_engine_dir(ckpt, engine_dir, steps=8, int8=int8, log=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    return TinyEngines(ckpt, engine_dir, num_classes, class_names)


def _minimal_engine_dir(path: Path, **fields):
    from movq_deploy.manifest import EngineDir, Grid

    path.mkdir(parents=True, exist_ok=True)
    defaults = dict(model={"tokenizer": {}, "prior": {}}, grid=Grid(2, 2, 1), codebook_size=16, image_size=8)
    return EngineDir(path, **{**defaults, **fields})


@pytest.fixture
def make_engine_dir():
    """make_engine_dir(path, **fields) -> an EngineDir (not yet written) of a made-up small model, for tests that
    need a manifest but not real graphs; fields override (graphs=..., engines=...)."""
    return _minimal_engine_dir


@pytest.fixture(scope="session")
def tiny_engines(tmp_path_factory) -> TinyEngines:
    """A tiny class-conditional model (3 classes), exported with fp32 graphs and the int8 ones."""
    return _export_tiny(tmp_path_factory.mktemp("tiny"), NUM_CLASSES, CLASS_NAMES, seed=0, int8=True)


@pytest.fixture(scope="session")
def tiny_unconditional_engines(tmp_path_factory) -> TinyEngines:
    """A tiny unconditional model (its prior graph has no class_labels input), fp32 graphs only."""
    return _export_tiny(tmp_path_factory.mktemp("tiny-unconditional"), 0, [], seed=1, int8=False)


@pytest.fixture(scope="session")
def tiny_reference(tiny_engines):
    """The PyTorch ReferenceSampler of the same weights (movq_deploy.models.reference)."""
    from movq_deploy.models.checkpoint import load_models
    from movq_deploy.models.reference import ReferenceSampler

    movq, prior, _ = load_models(tiny_engines.ckpt)
    return ReferenceSampler(movq, prior)


@pytest.fixture
def one_torch_thread():
    """torch on one thread for one test (restored after): the tiny reference runs faster so, and a busy machine
    does not slow it down several-fold the way it does torch's spinning OpenMP workers."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_generator(tiny_engines):
    """A Generator on ONNX Runtime CPU, fp32 (the embedded default), shared by the tests that only read from it."""
    from movq_deploy.generator import Generator

    return Generator(tiny_engines.engine_dir, backend="onnxruntime-cpu")
