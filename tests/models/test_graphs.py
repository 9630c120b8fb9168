"""The exported graphs' semantics: PriorStepGraph (one MaskGIT step), EncoderGraph and DecoderGraph."""
import numpy as np
import pytest
import torch

from movq_deploy import contract
from movq_deploy.models.graphs import (
    DecoderGraph, EncoderGraph, GuidedPriorStepGraph, PriorStepGraph, inverse_cdf_draw,
)
from movq_deploy.models.movq import MoVQ, MoVQConfig
from movq_deploy.models.prior import MaskGITPrior, PriorConfig


def small_prior(num_classes=0):
    torch.manual_seed(0)
    config = PriorConfig(h=2, w=2, c=4, codebook_size=9, num_classes=num_classes, width=32, depth=1, heads=2,
                         mlp_dim=64, dropout=0.0)
    return MaskGITPrior(config).eval()


def small_movq():
    torch.manual_seed(0)
    config = MoVQConfig(image_size=16, block_out_channels=(8, 16, 16), norm_groups=4, latent_channels=16,
                        num_chunks=4, codebook_size=32)
    return MoVQ(config).eval()


def step_inputs(config, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.mask_id + 1, size=(batch, config.num_slots)).astype(np.int32)
    tokens[0] = config.mask_id
    uniform = rng.random((batch, config.num_slots), dtype=np.float32)
    gumbel = rng.gumbel(size=(batch, config.num_slots)).astype(np.float32)
    return tokens, uniform, gumbel


def example_args(config, batch, seed=0) -> tuple:
    """Valid prior-step inputs (half the slots masked), as torch tensors in the graph's argument order."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, config.codebook_size, (batch, config.num_slots))
    tokens[rng.random(tokens.shape) < 0.5] = config.mask_id
    labels = np.zeros(batch) if config.conditional else None
    feeds = contract.prior_step_feeds(tokens, labels, rng.random(tokens.shape), rng.gumbel(size=tokens.shape),
                                      temperature=1.0, choice_scale=2.0)
    return tuple(torch.from_numpy(feeds[name]) if name in feeds else None
                 for name in contract.prior_input_names(conditional=True))


@pytest.mark.parametrize("temperature,scale", [(1.0, 2.0), (0.5, 0.0)])
def test_prior_step_semantics(temperature, scale):
    prior = small_prior()
    config = prior.config
    tokens, uniform, gumbel = step_inputs(config)
    with torch.no_grad():
        sampled, confidence = PriorStepGraph(prior)(
            torch.from_numpy(tokens), None, torch.from_numpy(uniform), torch.from_numpy(gumbel),
            torch.full((3,), temperature), torch.full((3,), scale))
        logits = prior(torch.from_numpy(tokens)).double().numpy() / temperature
    assert sampled.dtype == torch.int32 and confidence.dtype == torch.float32
    sampled, confidence = sampled.numpy(), confidence.numpy()
    known = tokens != config.mask_id
    np.testing.assert_array_equal(sampled[known], tokens[known])  # known slots keep their token ...
    assert np.isposinf(confidence[known]).all()  # ... with +inf confidence
    # Masked slots: the inverse CDF of softmax(logits / T) at the host uniform.
    log_probs = logits - logits.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    cdf = np.cumsum(np.exp(log_probs), -1)
    expected = np.minimum((cdf < uniform[..., None] * cdf[..., -1:]).sum(-1), config.codebook_size - 1)
    np.testing.assert_array_equal(sampled[~known], expected[~known])
    expected_conf = np.take_along_axis(log_probs, expected[..., None], -1)[..., 0] + scale * gumbel
    np.testing.assert_allclose(confidence[~known], expected_conf[~known], rtol=1e-5, atol=1e-5)


def test_prior_step_extreme_uniforms_pick_first_and_last_code():
    prior = small_prior()
    config = prior.config
    tokens = np.full((1, config.num_slots), config.mask_id, np.int32)
    step = PriorStepGraph(prior)
    with torch.no_grad():
        lo, _ = step(torch.from_numpy(tokens), None, torch.zeros(1, config.num_slots),
                     torch.zeros(1, config.num_slots), torch.tensor([1.0]), torch.tensor([1.0]))
        hi, _ = step(torch.from_numpy(tokens), None, torch.full((1, config.num_slots), 1.0 - 2 ** -24),
                     torch.zeros(1, config.num_slots), torch.tensor([1.0]), torch.tensor([1.0]))
    assert (lo == 0).all() and (hi == config.codebook_size - 1).all()


def test_prior_step_io_names_and_class_labels():
    assert PriorStepGraph(small_prior()).input_names == ["tokens", "uniform", "gumbel", "temperature",
                                                          "choice_scale"]
    step = PriorStepGraph(small_prior(num_classes=2))
    assert step.input_names[1] == "class_labels" and step.output_names == ["sampled", "confidence"]
    tokens, labels, uniform, gumbel, temperature, scale = example_args(step.prior.config, batch=2)
    assert labels.dtype == torch.int32
    tokens = torch.full_like(tokens, step.prior.config.mask_id)
    with torch.no_grad():
        _, a = step(tokens, torch.tensor([0, 0], dtype=torch.int32), uniform, gumbel, temperature, scale)
        _, b = step(tokens, torch.tensor([1, 1], dtype=torch.int32), uniform, gumbel, temperature, scale)
    assert not torch.allclose(a, b)  # the label reaches the log-probabilities


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("dynamo", [False, True])
def test_prior_step_exports_to_onnx_and_matches_in_onnxruntime(tmp_path, dynamo):
    ort = pytest.importorskip("onnxruntime")
    step = PriorStepGraph(small_prior(num_classes=2)).eval()
    path = tmp_path / "prior.onnx"
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=1024)
        dynamic = {"dynamic_shapes": tuple({0: batch} for _ in step.input_names)}
    else:
        dynamic = {"dynamic_axes": {name: {0: "batch"} for name in step.input_names + step.output_names}}
    torch.onnx.export(step, example_args(step.prior.config, batch=2), str(path), input_names=step.input_names,
                      output_names=step.output_names, opset_version=18, dynamo=dynamo, **dynamic)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ops = {node.op_type for node in __import__("onnx").load(str(path)).graph.node}
    assert not ops & {"Multinomial", "RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike"}
    inputs = example_args(step.prior.config, batch=5, seed=1)  # another batch size than the export's
    with torch.no_grad():
        sampled, confidence = step(*inputs)
    feeds = {name: value.numpy() for name, value in zip(step.input_names, inputs)}
    ort_sampled, ort_confidence = session.run(None, feeds)
    np.testing.assert_array_equal(ort_sampled, sampled.numpy())
    np.testing.assert_allclose(ort_confidence, confidence.numpy(), rtol=1e-5, atol=1e-5)


def test_encoder_and_decoder_graphs_are_uint8_int32_boundaries():
    movq = small_movq()
    images = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    with torch.no_grad():
        indices = EncoderGraph(movq)(torch.from_numpy(images))
        expected = movq.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
        decoded = DecoderGraph(movq)(indices)
        reference = movq.decode(indices.long()).clamp(-1, 1)
    assert indices.dtype == torch.int32 and tuple(indices.shape) == (2, 4, 4, 4)
    assert torch.equal(indices.long(), expected)
    assert decoded.dtype == torch.uint8 and tuple(decoded.shape) == (2, 16, 16, 3)
    expected_image = ((reference + 1) * 127.5).round().permute(0, 2, 3, 1)
    assert torch.equal(decoded.float(), expected_image)


@pytest.mark.parametrize("num_codes", [512, 100, 97, 20])
def test_inverse_cdf_draw_picks_the_first_code_whose_cumulative_mass_reaches_the_uniform(num_codes):
    generator = torch.Generator().manual_seed(num_codes)
    probs = (torch.randn(3, 64, num_codes, generator=generator) * 2).softmax(-1)
    uniform = torch.rand(3, 64, generator=generator)
    drawn = inverse_cdf_draw(probs, uniform).numpy()
    cdf = probs.double().cumsum(-1).numpy()
    target = uniform.double().numpy() * cdf[..., -1]
    expected = (cdf < target[..., None]).sum(-1)
    # Away from a cdf boundary (float32 rounding) the two-level draw is the flat inverse CDF exactly.
    gap = np.abs(cdf - target[..., None]).min(-1)
    clear = gap > 1e-5
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(drawn[clear], expected[clear])
    assert drawn.min() >= 0 and drawn.max() < num_codes


def test_prior_step_takes_one_temperature_and_choice_scale_per_image():
    step = PriorStepGraph(small_prior(num_classes=2)).eval()
    tokens, labels, uniform, gumbel, _, _ = example_args(step.prior.config, batch=3, seed=2)
    temperatures, scales = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([2.0, 0.0, 1.25])
    with torch.no_grad():
        mixed = step(tokens, labels, uniform, gumbel, temperatures, scales)
        for i in range(3):
            same = step(tokens, labels, uniform, gumbel, temperatures[i].expand(3), scales[i].expand(3))
            assert torch.equal(mixed[0][i], same[0][i]) and torch.equal(mixed[1][i], same[1][i])


def test_guided_prior_step_mixes_cond_and_null_class_logits_as_muse_writes_it():
    prior = small_prior(num_classes=2)
    guided = GuidedPriorStepGraph(prior).eval()
    assert guided.input_names == contract.prior_input_names(conditional=True) + ["guidance_scale"]
    tokens, labels, uniform, gumbel, temperature, scale = example_args(prior.config, batch=3, seed=3)
    labels = torch.tensor([0, 1, 2], dtype=torch.int32)  # the null class too
    w = torch.tensor([0.0, 1.0, 3.0])
    with torch.no_grad():
        cond, uncond = prior(tokens, labels).float(), prior(tokens, torch.full_like(labels, 2)).float()
        expected = PriorStepGraph(prior).draw(cond + w[:, None, None] * (cond - uncond), tokens, uniform, gumbel,
                                              temperature, scale)
        sampled, confidence = guided(tokens, labels, uniform, gumbel, temperature, scale, w)
        plain = PriorStepGraph(prior)(tokens, labels, uniform, gumbel, temperature, scale)
    assert torch.equal(sampled, expected[0])
    torch.testing.assert_close(confidence, expected[1], rtol=1e-5, atol=1e-5)
    # w = 0 is the conditional prior: the plain step's tokens.
    assert torch.equal(sampled[0], plain[0][0])
    with pytest.raises(ValueError, match="class-conditional"):
        GuidedPriorStepGraph(small_prior(num_classes=0))


def test_guided_prior_step_changes_tokens_with_w():
    prior = small_prior(num_classes=2)
    guided = GuidedPriorStepGraph(prior).eval()
    tokens, labels, uniform, gumbel, temperature, scale = example_args(prior.config, batch=4, seed=4)
    tokens = torch.full_like(tokens, prior.config.mask_id)
    with torch.no_grad():
        unguided = guided(tokens, labels, uniform, gumbel, temperature, scale, torch.zeros(4))[0]
        strong = guided(tokens, labels, uniform, gumbel, temperature, scale, torch.full((4,), 8.0))[0]
    assert (unguided != strong).any()
