"""Shared by the export tests: a tiny random-weight model, its checkpoint, and one full export of it."""
from __future__ import annotations

import pytest
import torch

from movq_deploy.export.pipeline import export_engine_dir
from movq_deploy.models.checkpoint import save_checkpoint
from movq_deploy.models.movq import MoVQ, MoVQConfig
from movq_deploy.models.prior import MaskGITPrior, PriorConfig

CLASS_NAMES = ["cat", "dog", "fox"]


def _tiny_models(num_classes: int):
    torch.manual_seed(0)
    movq_config = MoVQConfig(image_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_groups=4,
                             latent_channels=8, num_chunks=2, codebook_size=16, modulation="first",
                             modulated_levels=1)
    h, w, c = movq_config.grid
    prior_config = PriorConfig(h=h, w=w, c=c, codebook_size=16, num_classes=num_classes, width=32, depth=1, heads=2,
                               mlp_dim=64, dropout=0.0, class_dropout=0.0)
    return MoVQ(movq_config).eval(), MaskGITPrior(prior_config).eval()


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    movq, prior = _tiny_models(num_classes=len(CLASS_NAMES))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt.pt", tokenizer_config=movq.config.to_dict(),
                           tokenizer=movq.state_dict(), prior_config=prior.config.to_dict(), prior=prior.state_dict(),
                           class_names=CLASS_NAMES)


@pytest.fixture(scope="session")
def exported(ckpt):
    """One full export (fp32 + fp16 + int8, guidance 1.5 by default) of the conditional tiny model; (engine_dir,
    manifest, log lines)."""
    lines = []
    out = ckpt.parent / "engines"
    engine_dir = export_engine_dir(ckpt, out, steps=6, fp16=True, int8=True, log=lines.append, guidance_scale=1.5)
    assert engine_dir.path == out
    return out, engine_dir.to_dict(), lines


@pytest.fixture
def tiny_models():
    """(num_classes) -> (MoVQ, MaskGITPrior): the tiny model, seeded, in eval mode."""
    return _tiny_models


@pytest.fixture
def class_names():
    return list(CLASS_NAMES)
