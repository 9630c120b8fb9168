"""What the benchmarks measure: the engine directory and checkpoint they find, and the inputs of each engine call."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from benchmarks.subject import load_subject, resolve_ckpt, stage_feeds
from movq_deploy.manifest import EngineDir


def test_the_checkpoint_the_manifest_names_is_found_and_a_changed_one_is_refused(tiny_engines, tmp_path):
    engines = EngineDir.load(tiny_engines.engine_dir)
    assert resolve_ckpt(None, engines) == tiny_engines.ckpt
    loaded, ckpt, movq, prior = load_subject(None, str(tiny_engines.engine_dir), None, tmp_path)
    assert (loaded.path, ckpt) == (tiny_engines.engine_dir, tiny_engines.ckpt) and prior is not None
    changed = dataclasses.replace(engines, export={**engines.export, "checkpoint_sha256": "0" * 64})
    with pytest.raises(FileNotFoundError, match="pass --ckpt"):
        resolve_ckpt(None, changed)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_ckpt(str(tmp_path / "missing.pt"), engines)


def test_stage_feeds_match_the_graphs_inputs(tiny_engines):
    engines = EngineDir.load(tiny_engines.engine_dir)
    rng = np.random.default_rng(0)
    for stage, graph in (("prior_step", "prior"), ("decode", "decoder"), ("encode", "encoder")):
        feeds = stage_feeds(stage, 3, engines, rng)
        inputs = engines.graphs["fp32"][graph]["inputs"]
        assert sorted(feeds) == sorted(spec["name"] for spec in inputs), stage
        for spec in inputs:
            assert feeds[spec["name"]].dtype == np.dtype(spec["dtype"]), (stage, spec["name"])
            assert list(feeds[spec["name"]].shape) == [3 if d == "batch" else d for d in spec["shape"]], stage
    with pytest.raises(ValueError, match="unknown stage"):
        stage_feeds("train", 1, engines, rng)
