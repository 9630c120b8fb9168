"""movq_deploy.backends.base: the input checks every runner's run makes, padding up to a profile's minimum batch,
close() and `with`; then the same on real ONNX Runtime runners and through the Generator."""
from __future__ import annotations

import numpy as np
import pytest

from movq_deploy.backends.base import BaseRunner, TensorSpec, optional_import


class RowSums(BaseRunner):
    """A numpy 'graph': per row, the sum of x times the scale (rows independent, like every graph here)."""

    name = "row-sums"
    inputs = [TensorSpec("x", "float32", ("batch", 3)), TensorSpec("scale", "float32", (1,))]
    outputs = [TensorSpec("y", "float32", ("batch",)), TensorSpec("scale_out", "float32", (1,))]

    def __init__(self, min_batch=1, max_batch=None):
        self.min_batch, self.max_batch, self.batches, self.closed = min_batch, max_batch, [], False

    def run_impl(self, feeds):
        self.batches.append(len(feeds["x"]))
        return {"y": feeds["x"].sum(axis=1) * feeds["scale"], "scale_out": feeds["scale"]}

    def close(self):
        self.closed = True


def _feeds(batch):
    return {"x": np.arange(batch * 3, dtype=np.float32).reshape(batch, 3), "scale": np.array([2.0], np.float32)}


def test_a_short_batch_is_padded_to_the_minimum_and_trimmed_back():
    runner = RowSums(min_batch=4, max_batch=8)
    out = runner.run(_feeds(1))
    assert runner.batches == [4]  # the backend saw the profile's minimum
    np.testing.assert_array_equal(out["y"], [6.0])  # ... and the caller its one row
    np.testing.assert_array_equal(out["scale_out"], [2.0])  # unbatched outputs untouched
    np.testing.assert_array_equal(runner.run(_feeds(6))["y"], RowSums().run(_feeds(6))["y"])
    assert runner.batches[-1] == 6


@pytest.mark.parametrize("feeds, words", [
    ({"x": np.zeros((2, 3), np.float32)}, "expected inputs"),
    ({**_feeds(2), "x": np.zeros((2, 3), np.float64)}, "'x' must be float32, got float64"),
    ({**_feeds(2), "x": np.zeros((2, 4), np.float32)}, r"'x' must have shape \('batch', 3\)"),
    ({**_feeds(2), "x": [[0.0, 0.0, 0.0]]}, "'x' must be float32, got list"),
    ({**_feeds(9)}, r"batch 9 is outside the engine's profile \[1, 8\]"),
    ({**_feeds(0)}, "no rows"),
])
def test_bad_feeds_are_named_before_the_backend_runs(feeds, words):
    runner = RowSums(max_batch=8)
    with pytest.raises(ValueError, match=words):
        runner.run(feeds)
    assert runner.batches == []


def test_inputs_must_agree_on_the_batch():
    class TwoInputs(RowSums):
        inputs = [TensorSpec("x", "float32", ("batch", 3)), TensorSpec("scale", "float32", ("batch",))]

    with pytest.raises(ValueError, match=r"disagree on the batch size \(2 vs 3\)"):
        TwoInputs().run({"x": np.zeros((2, 3), np.float32), "scale": np.zeros(3, np.float32)})


def test_with_closes_the_runner():
    with RowSums() as runner:
        runner.run(_feeds(1))
    assert runner.closed


def test_optional_import_says_what_to_install():
    with pytest.raises(ImportError, match=r"^NoSuchLib is not installed \(.*\); install it with `pip install x`$"):
        optional_import("no_such_module_here", "NoSuchLib", "pip install x")


def test_onnxruntime_runner_padding_leaves_each_row_as_it_was(tiny_engines):
    """A real graph: the prior step of one row, run alone and padded to a minimum of 4, gives the same result."""
    from movq_deploy.backends.onnxruntime import OnnxRuntimeRunner
    from movq_deploy.manifest import EngineDir

    engine_dir = EngineDir.load(tiny_engines.engine_dir)
    path = engine_dir.verify(engine_dir.graph("fp32", "prior"))
    plain, padded = OnnxRuntimeRunner(path), OnnxRuntimeRunner(path)
    padded.min_batch = 4  # as a TensorRT profile with --min-batch 4 would be
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        n = engine_dir.grid.num_slots
        feeds = {spec.name: _prior_input(spec, batch, n, engine_dir, rng) for spec in plain.inputs}
        ours, theirs = padded.run(feeds), plain.run(feeds)
        assert ours["sampled"].shape == (batch, n)
        np.testing.assert_array_equal(ours["sampled"], theirs["sampled"])
        np.testing.assert_allclose(ours["confidence"], theirs["confidence"], rtol=1e-6)
    with padded:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        padded.run(feeds)


def _prior_input(spec, batch, n, engine_dir, rng):
    shape = tuple(batch if d == "batch" else d for d in spec.shape)
    if spec.name == "tokens":
        return np.where(rng.random(shape) < 0.5, engine_dir.mask_id, rng.integers(0, engine_dir.codebook_size, shape)).astype(np.int32)
    if spec.name == "class_labels":
        return rng.integers(0, engine_dir.num_classes + 1, shape).astype(np.int32)
    if spec.name == "gumbel":
        return rng.gumbel(size=shape).astype(np.float32)
    if spec.name == "uniform":
        return rng.random(shape, dtype=np.float32)
    return np.full(shape, 1.0 if spec.name == "temperature" else 2.0, np.float32)


def test_generator_results_do_not_depend_on_the_padding(tiny_engines, tiny_generator):
    """sample_tokens with every runner's minimum batch raised to 4: n=1 and a short last chunk pad, same tokens."""
    from movq_deploy.generator import Generator

    with Generator(tiny_engines.engine_dir, backend="onnxruntime-cpu", batch_size=4) as padded:
        for runner in padded.backend.runners.values():
            runner.min_batch = 4
        for n in (1, 6):  # 1: below the minimum; 6: a chunk of 4, then a chunk of 2 padded to 4
            np.testing.assert_array_equal(padded.sample_tokens(n=n, steps=3, seed=5),
                                          tiny_generator.sample_tokens(n=n, steps=3, seed=5))
        image = tiny_generator.decode(tiny_generator.sample_tokens(n=1, steps=2, seed=1), output_type="np")
        np.testing.assert_array_equal(padded.reconstruct(image, output_type="np"),
                                      tiny_generator.reconstruct(image, output_type="np"))
