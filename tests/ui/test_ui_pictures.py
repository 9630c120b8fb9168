"""Uploads fitted to the model's size, brush layers turned into masks, token pictures (numpy + pillow only)."""
import numpy as np
import pytest
from PIL import Image

from movq_deploy.ui.pictures import code_palette, fit_image, mask_from_layers, open_upload, token_picture


def test_fit_image_says_what_it_did():
    wide = Image.fromarray(np.arange(40 * 80 * 3, dtype=np.uint32).reshape(40, 80, 3).astype(np.uint8))
    cropped, note = fit_image(wide, 16, "crop")
    assert cropped.shape == (16, 16, 3) and note == "centre-cropped 80x40 to 40x40, then resized to 16x16"
    stretched, note = fit_image(wide, 16, "resize")
    assert stretched.shape == (16, 16, 3) and note == "resized 80x40 to 16x16"
    assert not np.array_equal(cropped, stretched)
    exact = Image.fromarray(np.zeros((16, 16, 3), np.uint8) + 9)
    same, note = fit_image(exact, 16, "exact")
    assert np.array_equal(same, np.asarray(exact)) and note == "16x16: used as it is"


def test_fit_image_exact_refuses_another_size():
    with pytest.raises(ValueError, match="the image is 80x40 pixels; the model takes 16x16"):
        fit_image(Image.new("RGB", (80, 40)), 16, "exact")


def test_open_upload_names_a_file_that_is_not_an_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not pixels")
    with pytest.raises(ValueError, match=r"^notes.txt is not an image this page can read") as caught:
        open_upload(path)
    assert "\n" not in str(caught.value) and str(tmp_path) not in str(caught.value)


def test_mask_from_layers_maps_an_enlarged_canvas_onto_image_pixels():
    layer = np.zeros((32, 32, 4), np.uint8)  # a canvas 4x the 8x8 image
    layer[5, 9, 3] = 255  # one painted canvas pixel -> image pixel (1, 2)
    layer[20:24, 0:4, 3] = 10  # a faint stroke still counts: alpha > 0
    mask = mask_from_layers([layer], (8, 8))
    expected = np.zeros((8, 8), bool)
    expected[1, 2] = expected[5, 0] = True
    assert np.array_equal(mask, expected)
    assert not mask_from_layers([], (8, 8)).any()


def test_mask_from_layers_refuses_a_canvas_of_another_shape():
    with pytest.raises(ValueError, match="the brush layer is 30x32 pixels, not a multiple of the 8x8 image"):
        mask_from_layers([np.zeros((32, 30, 4), np.uint8)], (8, 8))


def test_token_picture_gives_each_code_its_colour_and_each_channel_its_panel():
    tokens = np.zeros((2, 3, 2), np.int64)
    tokens[..., 1] = 5
    tokens[1, 2, 0] = 7
    picture = token_picture(tokens, codebook_size=8, cell=4, gap=2)
    palette = code_palette(8)
    assert picture.shape == (2 * 4, 2 * 3 * 4 + 2, 3)
    assert np.all(picture[0, 0] == palette[0]) and np.all(picture[7, 11] == palette[7])  # channel 0
    assert np.all(picture[:, 12:14] == 255)  # the gap
    assert np.all(picture[:, 14:] == palette[5])  # channel 1: all code 5
    assert len({tuple(colour) for colour in code_palette(512)}) > 400  # codes are told apart
