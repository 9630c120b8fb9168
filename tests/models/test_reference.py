"""ReferenceSampler: the PyTorch ground truth, on tiny random-weight models."""
import numpy as np
import pytest
import torch

from movq_deploy import sampling
from movq_deploy.models.movq import MoVQ, MoVQConfig
from movq_deploy.models.prior import MaskGITPrior, PriorConfig
from movq_deploy.models.reference import ReferenceSampler

STEPS = 4


def make_sampler(num_classes=0):
    torch.manual_seed(0)
    movq = MoVQ(MoVQConfig(image_size=16, block_out_channels=(8, 16, 16), norm_groups=4, latent_channels=16,
                           num_chunks=4, codebook_size=32))
    h, w, c = movq.config.grid
    prior = MaskGITPrior(PriorConfig(h=h, w=w, c=c, codebook_size=32, num_classes=num_classes, width=32, depth=1,
                                     heads=2, mlp_dim=64, dropout=0.0))
    for p in prior.parameters():  # random weights far from init, so that the tokens depend on the context
        torch.nn.init.normal_(p, std=0.5)
    return ReferenceSampler(movq, prior)


@pytest.fixture(scope="module")
def sampler():
    return make_sampler()


def test_same_seed_same_images_and_batch_independence(sampler):
    images = sampler.sample(6, steps=STEPS, seed=7, batch_size=4)
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(images, sampler.sample(6, steps=STEPS, seed=7, batch_size=4))
    np.testing.assert_array_equal(images[:3], sampler.sample(3, steps=STEPS, seed=7))
    tokens = sampler.sample_tokens(6, steps=STEPS, seed=7, batch_size=6)
    next_three = sampling.sample_tokens(sampler.step_fn, 3, tokens.shape[1], sampler.mask_id, STEPS, seed=7,
                                        first_index=3)
    np.testing.assert_array_equal(tokens[3:], next_three)
    np.testing.assert_array_equal(images, sampler.decode(tokens))
    assert not np.array_equal(tokens, sampler.sample_tokens(6, steps=STEPS, seed=8))


def test_class_labels_change_the_output():
    sampler = make_sampler(num_classes=3)
    a = sampler.sample_tokens(4, steps=STEPS, seed=0, class_labels=[0, 0, 0, 0])
    b = sampler.sample_tokens(4, steps=STEPS, seed=0, class_labels=2)
    assert not np.array_equal(a, b)
    unlabelled = sampler.sample_tokens(4, steps=STEPS, seed=0)
    np.testing.assert_array_equal(unlabelled, sampler.sample_tokens(4, steps=STEPS, seed=0, class_labels=3))


def test_edit(sampler):
    images = sampler.sample(3, steps=STEPS, seed=1)
    tokens = sampler.encode(images).reshape(3, -1)
    masks = np.zeros((3, 16, 16), bool)
    masks[0, 4:9, 0:3] = True  # touches the cells of positions (1, 0) and (2, 0)
    masks[1] = True
    edited = sampler.edit(images, masks, steps=STEPS, seed=5)
    assert edited.dtype == np.uint8 and edited.shape == images.shape
    slot_mask = sampling.slot_mask_from_pixels(masks, sampler.grid)
    edited_tokens = sampler.edit_tokens(tokens, slot_mask, steps=STEPS, seed=5)
    np.testing.assert_array_equal(edited, sampler.decode(edited_tokens))
    np.testing.assert_array_equal(edited_tokens[~slot_mask], tokens[~slot_mask])  # outside the mask: unchanged
    assert not np.array_equal(edited_tokens[0], tokens[0])
    # An all-masked image is sampled from scratch with its own stream (seed, 1).
    np.testing.assert_array_equal(edited_tokens[1], sampler.sample_tokens(2, steps=STEPS, seed=5)[1])
    # An empty mask returns the reconstruction.
    np.testing.assert_array_equal(edited[2], sampler.decode(sampler.encode(images[2:3]))[0])
    with pytest.raises(ValueError, match="masks"):
        sampler.edit(images, masks[:2])


def test_encode_rejects_bad_images(sampler):
    with pytest.raises(ValueError, match="uint8"):
        sampler.encode(np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        sampler.encode(np.zeros((1, 8, 8, 3), np.uint8))


def test_guidance_scale_guides_conditional_priors_only(sampler):
    conditional = make_sampler(num_classes=3)
    labels = [0, 1, 2, 1]
    plain = conditional.sample_tokens(4, steps=STEPS, seed=1, class_labels=labels)
    assert np.array_equal(conditional.sample_tokens(4, steps=STEPS, seed=1, class_labels=labels, guidance_scale=0.0),
                          plain)
    guided = conditional.sample_tokens(4, steps=STEPS, seed=1, class_labels=labels, guidance_scale=[0.0, 0.0, 4, 4])
    assert np.array_equal(guided[:2], plain[:2]) and not np.array_equal(guided[2:], plain[2:])
    with pytest.raises(ValueError, match="class-conditional"):
        sampler.sample_tokens(2, steps=STEPS, seed=1, guidance_scale=1.0)
