"""The page's handlers, called as gradio calls them (no browser): what they show, and the one-line errors."""
import asyncio

import numpy as np
import pytest
from PIL import Image

gr = pytest.importorskip("gradio", reason="the ui extra (gradio) is not installed: pip install -e .[ui]")

from movq_deploy.images import extend_canvas, make_grid  # noqa: E402
from movq_deploy.ui.page import NO_CLASS, Page, build_page  # noqa: E402
from movq_deploy.ui.pictures import enlarge  # noqa: E402
from movq_deploy.ui.service import LocalService  # noqa: E402


@pytest.fixture(scope="module")
def page(tiny_generator):
    page = Page(LocalService(tiny_generator))
    page.build()
    return page


def _run(handler, *args):
    """A handler called as gradio calls it: awaited on an event loop."""
    return asyncio.run(handler(*args))


def _png(tmp_path, array, name="in.png"):
    path = tmp_path / name
    Image.fromarray(array).save(path)
    return str(path)


def test_sample_shows_the_generators_grid_and_offers_it_as_a_png(page, tiny_generator):
    grid, status, download, send, samples = _run(page.sample, 4, 21, "green", 4, 1.0, 4.5)
    expected = tiny_generator.sample(4, steps=4, seed=21, class_labels="green", output_type="np")
    assert np.array_equal(samples, expected) and np.array_equal(grid, np.asarray(make_grid(expected)))
    assert "seed **21**" in status and "onnxruntime-cpu (fp32)" in status
    assert np.array_equal(np.asarray(Image.open(download.value["path"])), grid) and download.interactive


def test_a_sample_taken_to_the_editor_is_edited_there(page, tiny_generator):
    samples = tiny_generator.sample(2, seed=1, output_type="np")
    editor, image, note, tabs = _run(page.take_sample, samples, 2)
    assert np.array_equal(image, samples[1]) and note == "sample #2 of the last grid"
    assert editor["background"].shape == (256, 256, 3)  # shown enlarged 4x for painting
    layer = np.zeros((256, 256, 4), np.uint8)
    layer[100:140, 40:200, 3] = 255  # a painted band: image rows 25..34, columns 10..49
    editor = {"background": None, "layers": [layer], "composite": None}
    gallery, status = _run(page.inpaint, editor, image, 5, 2, True, NO_CLASS, 8, 1.0, 4.5)
    mask = np.zeros((64, 64), bool)
    mask[25:35, 10:50] = True
    expected = tiny_generator.edit([image] * 2, [mask] * 2, seed=5, paste_original=True, output_type="np")
    assert [caption for _, caption in gallery] == ["input (grey: to fill)", "fill 0 · seed 5", "fill 1 · seed 5"]
    assert all(np.array_equal(fill, want) for (fill, _), want in zip(gallery[1:], expected))
    assert "400 pixels regenerated" in status


def test_outpaint_fills_the_border(page, tiny_generator):
    image = tiny_generator.sample(1, seed=2, output_type="np")[0]
    gallery, _ = _run(page.outpaint, 0, 0, 16, 0, image, 3, 1, True, NO_CLASS, 8, 1.0, 4.5)
    canvas, border = extend_canvas(image, right=16, size=64)
    expected = tiny_generator.edit(canvas, border, seed=3, paste_original=True, output_type="np")
    assert np.array_equal(gallery[1][0], expected[0])


def test_reconstruct_shows_input_decoding_and_token_picture(page, tiny_generator, tmp_path):
    image = tiny_generator.sample(1, seed=6, output_type="np")[0]
    shown, decoded, tokens, status = _run(page.reconstruct, _png(tmp_path, image), "crop")
    assert np.array_equal(shown, enlarge(image, 4))  # shown 4x larger: 256 pixels for a 64-pixel model
    assert np.array_equal(decoded, enlarge(tiny_generator.reconstruct(image, output_type="np")[0], 4))
    assert tokens.shape == (128, 4 * 128 + 3 * 2, 3)  # 8x8 tokens in 16-pixel cells, 4 channels, 2-pixel gaps
    assert "used as it is" in status and "PSNR" in status and "tokens 8x8x4" in status


@pytest.mark.parametrize("case, message", [
    ("not an image", "notes.txt is not an image this page can read (PNG, JPEG, WebP, ...)"),
    ("wrong size", "the image is 48x32 pixels; the model takes 64x64 (choose crop or resize to fit it)"),
    ("empty mask", "the mask is empty: paint the region to regenerate first"),
    ("no image", "upload an image first (or take one from the Sample tab)"),
    ("no margins", "all four margins are 0: give the border to extend, in pixels"),
])
def test_bad_input_is_one_error_line(page, tmp_path, case, message):
    with pytest.raises(gr.Error) as caught:
        if case == "not an image":
            (tmp_path / "notes.txt").write_text("hello")
            _run(page.load_for_edit, str(tmp_path / "notes.txt"), "crop")
        elif case == "wrong size":
            _run(page.reconstruct, _png(tmp_path, np.zeros((32, 48, 3), np.uint8)), "exact")
        elif case == "empty mask":
            _run(page.inpaint, {"layers": []}, np.zeros((64, 64, 3), np.uint8), 0, 1, True, NO_CLASS, 8, 1.0, 4.5)
        elif case == "no image":
            _run(page.inpaint, {"layers": []}, None, 0, 1, True, NO_CLASS, 8, 1.0, 4.5)
        else:
            _run(page.outpaint, 0, 0, 0, 0, np.zeros((64, 64, 3), np.uint8), 0, 1, True, NO_CLASS, 8, 1.0, 4.5)
    assert caught.value.message == message


def test_the_page_builds_for_an_unconditional_model(tiny_unconditional_engines):
    from movq_deploy.generator import Generator

    blocks = build_page(LocalService(Generator(tiny_unconditional_engines.engine_dir, backend="onnxruntime-cpu")))
    dropdowns = [block for block in blocks.blocks.values() if isinstance(block, gr.Dropdown)]
    assert len(dropdowns) == 1 and not dropdowns[0].visible  # no class to choose


def test_the_guidance_slider_reaches_the_generator(page, tiny_generator):
    assert page.info.guidance and page.guidance_scale.visible  # a class-conditional model with prior_guided
    _, _, _, _, samples = _run(page.sample, 2, 8, "blue", 3, 1.0, 4.5, 3.0)
    expected = tiny_generator.sample(2, steps=3, seed=8, class_labels="blue", guidance_scale=3.0, output_type="np")
    assert np.array_equal(samples, expected)
    with pytest.raises(gr.Error, match="guidance_scale must be &gt;= 0|guidance_scale must be >= 0"):
        _run(page.sample, 2, 8, "blue", 3, 1.0, 4.5, -1.0)
