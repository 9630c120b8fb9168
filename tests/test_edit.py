"""Generator.edit (inpainting / outpainting) on ONNX Runtime CPU, against the PyTorch reference."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from movq_deploy import sampling
from movq_deploy.images import extend_canvas, paste_outside_mask, to_bool_masks


def _images(count, size, seed=0):
    # Smooth images (a gradient plus a little noise): closer to what the tokenizer sees than uniform noise.
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 200, size)
    base = ramp[None, :, None, None] + ramp[None, None, :, None] * rng.random((count, 1, 1, 3))
    return np.clip(base + rng.normal(0, 10, (count, size, size, 3)), 0, 255).astype(np.uint8)


def _box_masks(count, size, box):
    top, left, bottom, right = box
    masks = np.zeros((count, size, size), dtype=bool)
    masks[:, top:bottom, left:right] = True
    return masks


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


def test_slots_outside_the_mask_never_change(tiny_generator):
    size = tiny_generator.image_size
    images = _images(6, size)
    masks = _box_masks(6, size, (8, 8, 40, 24))
    edited = tiny_generator.edit_tokens(images, masks, steps=4, seed=0)
    original = tiny_generator.encode(images).reshape(6, -1)
    slot_mask = sampling.slot_mask_from_pixels(masks, tiny_generator.grid)
    assert np.array_equal(edited[~slot_mask], original[~slot_mask])
    assert (edited[slot_mask] != original[slot_mask]).mean() > 0.5  # the masked slots were regenerated
    assert edited.max() < tiny_generator.codebook_size


def test_all_masked_edit_equals_sample(tiny_generator):
    size = tiny_generator.image_size
    images = _images(4, size)
    masks = np.ones((4, size, size), dtype=bool)
    edited = tiny_generator.edit(images, masks, steps=4, seed=5, class_labels=1, output_type="np")
    sampled = tiny_generator.sample(n=4, steps=4, seed=5, class_labels=1, output_type="np")
    assert np.array_equal(edited, sampled)


def test_empty_mask_returns_the_reconstruction(tiny_generator):
    size = tiny_generator.image_size
    images = _images(3, size)
    edited = tiny_generator.edit(images, np.zeros((3, size, size), dtype=bool), seed=0, output_type="np")
    assert np.array_equal(edited, tiny_generator.reconstruct(images, output_type="np"))


def test_edit_matches_the_pytorch_reference(tiny_generator, tiny_reference, one_torch_thread):
    size = tiny_generator.image_size
    images = _images(32, size, seed=1)
    masks = _box_masks(32, size, (16, 0, 48, 40))
    ours = tiny_generator.edit_tokens(images, masks, seed=2)
    tokens = tiny_reference.encode(images).reshape(32, -1)
    slot_mask = sampling.slot_mask_from_pixels(masks, tiny_reference.grid)
    reference = tiny_reference.edit_tokens(tokens, slot_mask, steps=8, seed=2)
    identical = (ours == reference).all(axis=1)
    print(f"edit: {identical.mean():.1%} of 32 token grids identical to the reference")
    assert identical.mean() >= 0.95
    # Where the tokens agree, the edited images agree within 1 per pixel (Generator.edit = decode(edit_tokens)).
    edited = tiny_generator.edit(images[:4], masks[:4], seed=2, output_type="np")
    assert np.array_equal(edited, tiny_generator.decode(ours[:4], output_type="np"))
    difference = np.abs(tiny_generator.decode(ours, output_type="np").astype(int)
                        - tiny_reference.decode(reference).astype(int))[identical]
    assert difference.max() <= 1


def test_pil_masks_equal_bool_masks(tiny_generator):
    size = tiny_generator.image_size
    images = _images(2, size)
    masks = _box_masks(2, size, (0, 0, 20, 64))
    as_l = [Image.fromarray(mask.astype(np.uint8) * 255, "L") for mask in masks]
    as_1 = [image.convert("1") for image in as_l]
    expected = tiny_generator.edit_tokens(images, masks, steps=2, seed=0)
    assert np.array_equal(tiny_generator.edit_tokens(images, as_l, steps=2, seed=0), expected)
    assert np.array_equal(tiny_generator.edit_tokens([Image.fromarray(i) for i in images], as_1, steps=2, seed=0),
                          expected)


def test_paste_original_keeps_pixels_outside_the_mask(tiny_generator):
    size = tiny_generator.image_size
    images = _images(2, size)
    masks = _box_masks(2, size, (16, 16, 48, 48))
    plain = tiny_generator.edit(images, masks, steps=4, seed=0, output_type="np")
    pasted = tiny_generator.edit(images, masks, steps=4, seed=0, output_type="np", paste_original=True, feather=2)
    assert np.array_equal(pasted[masks], plain[masks])  # inside: generated
    far = ~_box_masks(2, size, (12, 12, 52, 52))  # more than 2*feather pixels from the mask
    assert np.array_equal(pasted[far], images[far])  # outside: the original
    seam = ~masks & ~far
    between = (pasted[seam].astype(int) - images[seam]) * (pasted[seam].astype(int) - plain[seam])
    assert (between <= 0).all()  # the seam blends the two


def test_paste_outside_mask_without_feather_is_a_hard_cut():
    original = np.zeros((1, 8, 8, 3), np.uint8)
    generated = np.full((1, 8, 8, 3), 200, np.uint8)
    mask = np.zeros((1, 8, 8), bool)
    mask[0, 2:4, 2:4] = True
    out = paste_outside_mask(original, generated, mask, feather=0)
    assert np.array_equal(out[0, ..., 0] == 200, mask[0])


@pytest.mark.parametrize("masks, words", [
    (np.ones((2, 32, 32), bool), "pixels"),  # wrong size
    (np.ones((2, 64, 64), np.float32), "must be a bool array"),  # wrong dtype
    ([Image.new("RGB", (64, 64))] * 2, "PIL mode 'RGB'"),  # wrong PIL mode
    (np.ones((3, 64, 64), bool), "3 masks for 2 images"),  # count mismatch
    (Image.new("L", (64, 64)), "1 masks for 2 images"),
    ("mask.png", "must be PIL"),
])
def test_bad_masks_get_one_line(tiny_generator, masks, words):
    with pytest.raises((ValueError, TypeError)) as excinfo:
        tiny_generator.edit(_images(2, 64), masks, steps=2, seed=0)
    assert words in _one_line_error(excinfo)


def test_extend_canvas_for_outpainting(tiny_generator):
    image = Image.fromarray(_images(1, 48)[0])
    canvas, mask = extend_canvas(image, left=0, top=8, right=16, bottom=8)
    assert canvas.size == (64, 64) and mask.mode == "L"
    array = np.asarray(mask) > 0
    assert array[:8].all() and array[:, 48:].all() and not array[8:56, :48].any()
    assert np.array_equal(np.asarray(canvas)[8:56, :48], np.asarray(image))
    resized, resized_mask = extend_canvas(image, right=48, size=64)
    assert resized.size == (64, 64) and set(np.unique(np.asarray(resized_mask))) == {0, 255}
    out = tiny_generator.edit(canvas, mask, steps=2, seed=0, paste_original=True, output_type="np")
    assert out.shape == (1, 64, 64, 3)
    assert np.array_equal(out[0, 16:48, 0:40], np.asarray(canvas)[16:48, 0:40])  # far from the border: untouched
    with pytest.raises(ValueError) as excinfo:
        extend_canvas(image, left=-1)
    assert "left" in _one_line_error(excinfo)


def test_to_bool_masks_thresholds_l_images():
    mask = Image.fromarray(np.array([[0, 127], [128, 255]], np.uint8), "L")
    assert to_bool_masks(mask, 1, 2).tolist() == [[[False, False], [True, True]]]


def test_edit_tokens_is_edit_with_output_type_tokens(tiny_generator):
    images = _images(2, tiny_generator.image_size, seed=3)
    masks = _box_masks(2, tiny_generator.image_size, (0, 0, 8, 8))
    tokens = tiny_generator.edit(images, masks, steps=2, seed=1, output_type="tokens")
    assert tokens.shape == (2, tiny_generator.num_slots) and tokens.dtype == np.int32
    assert np.array_equal(tokens, tiny_generator.edit_tokens(images, masks, steps=2, seed=1))
    with pytest.raises(ValueError) as excinfo:
        tiny_generator.edit(images, masks, output_type="tokens", paste_original=True)
    assert "paste_original" in _one_line_error(excinfo)
