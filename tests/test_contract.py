"""movq_deploy.contract: the graphs' I/O, the prior-step feeds and the runner adapter (numpy only)."""
import numpy as np
import pytest

from movq_deploy import contract
from movq_deploy.contract import TensorSpec


def test_graph_io_names_dtypes_and_shapes():
    encoder = contract.graph_io("encoder", 16, (8, 8, 2), conditional=True)
    assert encoder.inputs == (TensorSpec("image", "uint8", ("batch", 16, 16, 3)),)
    assert encoder.outputs == (TensorSpec("indices", "int32", ("batch", 8, 8, 2)),)
    prior = contract.graph_io("prior", 16, (8, 8, 2), conditional=True)
    assert prior.input_names == ["tokens", "class_labels", "uniform", "gumbel", "temperature", "choice_scale"]
    assert prior.inputs[-1] == TensorSpec("choice_scale", "float32", ("batch",))
    assert prior.outputs[1] == TensorSpec("confidence", "float32", ("batch", 128))
    assert contract.prior_input_names(conditional=False) == ["tokens", "uniform", "gumbel", "temperature",
                                                             "choice_scale"]
    with pytest.raises(ValueError, match="graph must be one of"):
        contract.graph_io("vae", 16, (8, 8, 2), conditional=False)


def test_prior_step_feeds_types_and_per_image_values():
    tokens, uniform = np.zeros((3, 4), np.int64), np.full((3, 4), 0.5)
    feeds = contract.prior_step_feeds(tokens, np.array([0, 1, 2]), uniform, uniform, 0.9, [1.0, 0.5, 0.0])
    assert list(feeds) == contract.prior_input_names(conditional=True)
    assert {name: value.dtype.name for name, value in feeds.items()} == {
        "tokens": "int32", "class_labels": "int32", "uniform": "float32", "gumbel": "float32",
        "temperature": "float32", "choice_scale": "float32"}
    assert feeds["temperature"].tolist() == [np.float32(0.9)] * 3 and feeds["choice_scale"].tolist() == [1, 0.5, 0]
    assert "class_labels" not in contract.prior_step_feeds(tokens, None, uniform, uniform, 1.0, 1.0)
    with pytest.raises(ValueError, match=r"choice_scale must be one number or one per image \(3\)"):
        contract.prior_step_feeds(tokens, None, uniform, uniform, 1.0, [1.0, 2.0])


class _Runner:
    def __init__(self, inputs, outputs):
        self.inputs, self.outputs, self.feeds = list(inputs), list(outputs), []

    def run(self, feeds):
        self.feeds.append(feeds)
        return {"sampled": feeds["tokens"], "confidence": feeds["uniform"]}


def test_check_runner_names_the_difference_in_one_line():
    expected = contract.graph_io("prior", 16, (8, 8, 2), conditional=True)
    contract.check_runner(_Runner(expected.inputs, expected.outputs), expected, "engines")
    old = [spec if spec.name != "temperature" else TensorSpec("temperature", "float32", (1,))
           for spec in expected.inputs]
    with pytest.raises(ValueError) as info:
        contract.check_runner(_Runner(old, expected.outputs), expected, "engines")
    assert "temperature:float32[1]" in str(info.value) and "re-export" in str(info.value)
    assert "\n" not in str(info.value)


def test_runner_step_fn_feeds_the_runner_and_ticks():
    runner, ticks = _Runner((), ()), []
    step = contract.runner_step_fn(runner, after_call=lambda: ticks.append(1))
    tokens, noise = np.arange(6).reshape(2, 3), np.full((2, 3), 0.25)
    sampled, confidence = step(tokens, None, noise, noise, np.array([1.0, 2.0]), np.array([0.5, 0.0]))
    assert np.array_equal(sampled, tokens) and confidence.dtype == np.float32 and ticks == [1]
    assert runner.feeds[0]["temperature"].tolist() == [1.0, 2.0]


def test_guided_prior_graph_io_adds_guidance_scale_and_is_conditional_only():
    guided = contract.graph_io("prior_guided", 16, (8, 8, 2), conditional=True)
    plain = contract.graph_io("prior", 16, (8, 8, 2), conditional=True)
    assert guided.inputs == plain.inputs + (TensorSpec("guidance_scale", "float32", ("batch",)),)
    assert guided.outputs == plain.outputs
    assert contract.prior_input_names(conditional=True, guided=True) == guided.input_names
    with pytest.raises(ValueError, match="class-conditional priors only"):
        contract.graph_io("prior_guided", 16, (8, 8, 2), conditional=False)
    tokens, uniform = np.zeros((2, 4), np.int32), np.full((2, 4), 0.5)
    feeds = contract.prior_step_feeds(tokens, np.array([0, 1]), uniform, uniform, 1.0, 1.0, guidance_scale=[0, 3])
    assert list(feeds) == guided.input_names and feeds["guidance_scale"].dtype == np.float32
    assert "guidance_scale" not in contract.prior_step_feeds(tokens, None, uniform, uniform, 1.0, 1.0)


def test_runner_step_fn_sends_guided_rows_to_the_guided_runner_and_merges_by_row():
    plain, guided, ticks = _Runner((), ()), _Runner((), ()), []
    step = contract.runner_step_fn(plain, after_call=lambda: ticks.append(1), guided_runner=guided)
    tokens, noise = np.arange(12).reshape(4, 3), np.arange(12, dtype=np.float32).reshape(4, 3)
    labels = np.array([0, 1, 2, 0])
    sampled, confidence = step(tokens, labels, noise, noise, 1.0, 0.5, np.array([0.0, 3.0, 0.0, 1.5]))
    assert np.array_equal(sampled, tokens) and np.array_equal(confidence, noise) and ticks == [1]
    assert plain.feeds[0]["tokens"].tolist() == tokens[[0, 2]].tolist() and "guidance_scale" not in plain.feeds[0]
    assert guided.feeds[0]["class_labels"].tolist() == [1, 0]
    assert guided.feeds[0]["guidance_scale"].tolist() == [3.0, 1.5]
    step(tokens, labels, noise, noise, 1.0, 0.5, 0.0)  # w = 0 everywhere: the plain runner only
    assert len(plain.feeds) == 2 and len(guided.feeds) == 1
    with pytest.raises(ValueError, match="prior_guided"):
        contract.runner_step_fn(plain)(tokens, labels, noise, noise, 1.0, 0.5, np.array([0.0, 1.0, 0.0, 0.0]))
