"""The page in a real headless Chromium: sample, paint and inpaint, bad uploads. Screenshots of each tab are kept
under runs/ui-screenshots/.

Skipped, with the reason, where Chromium, ChromeDriver or selenium are missing, unless MOVQ_UI_BROWSER_TESTS=required
(`make test-ui`), which makes them fail instead.
"""
import os
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from movq_deploy.images import make_grid
from movq_deploy.ui.browser import PageDriver, find_chromium

pytest.importorskip("gradio", reason="the ui extra (gradio) is not installed: pip install -e .[ui]")
WHY_NOT = find_chromium()[2]
REQUIRED = os.environ.get("MOVQ_UI_BROWSER_TESTS") == "required"
pytestmark = [pytest.mark.skipif(bool(WHY_NOT) and not REQUIRED, reason=WHY_NOT),
              # gradio's queue on pandas 3 (not this code): deprecation notes on each request
              pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword is deprecated")]
SCREENSHOTS = Path(os.environ.get("MOVQ_UI_SCREENSHOTS", Path(__file__).parents[2] / "runs" / "ui-screenshots"))
FEATHER = 2  # Generator.edit's default seam: pixels farther than 2 * FEATHER from the mask keep their values


@pytest.fixture(scope="module")
def page_url(tiny_generator):
    if WHY_NOT:
        pytest.fail(f"browser tests required but {WHY_NOT}")
    from movq_deploy.ui.app import launch
    from movq_deploy.ui.page import build_page
    from movq_deploy.ui.service import LocalService

    blocks = build_page(LocalService(tiny_generator))
    with socket.socket() as probe:  # a free port for this run
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    yield launch(blocks, port=port, block=False)
    blocks.close()


@pytest.fixture
def browser(page_url, tmp_path):
    page = PageDriver(page_url, download_dir=str(tmp_path))
    yield page
    page.close()


def _photo(tmp_path, size=(64, 64), name="photo.png") -> "tuple[np.ndarray, str]":
    """A smooth test picture (no pixel is the mask preview's grey 127,127,127: blue is 200 everywhere)."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // width, y * 255 // height, np.full_like(x, 200)], axis=-1).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / name)
    return image, str(tmp_path / name)


def test_sample_shows_the_generators_images_for_a_seed(browser, tiny_generator, tmp_path):
    assert "onnxruntime-cpu (fp32) · 64x64 images · tokens 8x8x4" in browser.text("#model-info")
    browser.screenshot(str(SCREENSHOTS / "sample-empty.png"))
    browser.set_number("count", 4)
    browser.set_number("seed", 7)
    browser.click("sample")
    browser.wait_until(lambda: "seed 7" in browser.text("#sample-status"), "the sampling to finish")
    expected = np.asarray(make_grid(tiny_generator.sample(4, seed=7, output_type="np")))
    shown = browser.fetch_image(browser.wait_until(lambda: browser.image_sources("#grid"), "the grid")[0])
    assert np.array_equal(shown, expected)
    browser.click("download")
    download = browser.wait_until(lambda: list(tmp_path.glob("samples-seed7*.png")), "the PNG download")[0]
    assert np.array_equal(np.asarray(Image.open(download).convert("RGB")), expected)
    browser.screenshot(str(SCREENSHOTS / "sample.png"))


def test_inpaint_regenerates_the_painted_region_only(browser, tiny_generator, tmp_path):
    original, path = _photo(tmp_path)
    browser.open_tab("Inpaint / outpaint")
    browser.upload("edit-upload", path)
    browser.wait_until(lambda: "64x64: used as it is" in browser.text("#edit-note"), "the upload to reach the editor")
    browser.paint("#editor canvas", [(-60, 10), (-20, 12), (20, 8), (60, 10)])  # a horizontal stroke
    browser.click("inpaint")
    sources = browser.wait_until(lambda: len(browser.image_sources("#edit-results")) == 5
                                 and browser.image_sources("#edit-results"), "the four fills")
    preview, *fills = [browser.fetch_image(source) for source in sources]
    mask = np.any(preview != original, axis=-1)  # the page greys out the mask it used
    rows, cols = np.nonzero(mask)
    assert mask.sum() > 20 and np.all(preview[mask] == 127)
    assert rows.max() - rows.min() < cols.max() - cols.min()  # the stroke's shape: wider than tall
    assert abs(rows.mean() - 32) < 12 and abs(cols.mean() - 32) < 12  # painted around the middle
    grown = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(4 * FEATHER + 3))
    outside = np.asarray(grown) == 0
    expected = tiny_generator.edit([original] * 4, [mask] * 4, seed=0, paste_original=True, output_type="np")
    for fill, want in zip(fills, expected):
        assert np.array_equal(fill[outside], original[outside])  # untouched away from the mask
        assert np.array_equal(fill, want)  # and what the Generator gives for this mask and seed
    assert any(np.any(fill[mask] != original[mask]) for fill in fills)
    browser.screenshot(str(SCREENSHOTS / "inpaint.png"))


def test_bad_uploads_show_one_error_line_and_the_page_goes_on(browser, tmp_path):
    def error_shown(message):
        browser.wait_until(lambda: message in browser.error_lines(), f"the error line {message!r}")
        browser.dismiss_errors()

    (tmp_path / "notes.txt").write_text("not pixels")
    browser.open_tab("Inpaint / outpaint")
    browser.upload("edit-upload", str(tmp_path / "notes.txt"))
    error_shown("notes.txt is not an image this page can read (PNG, JPEG, WebP, ...)")
    browser.screenshot(str(SCREENSHOTS / "error.png"))
    browser.click("inpaint")
    error_shown("upload an image first (or take one from the Sample tab)")

    _, photo = _photo(tmp_path)
    browser.upload("edit-upload", photo)
    browser.wait_until(lambda: "used as it is" in browser.text("#edit-note"), "the upload to reach the editor")
    browser.click("inpaint")
    error_shown("the mask is empty: paint the region to regenerate first")

    browser.open_tab("Reconstruct")
    next(label for label in browser.find("#reconstruct-fit label") if label.text == "exact").click()
    _, small = _photo(tmp_path, size=(48, 32), name="small.png")
    browser.upload("reconstruct-upload", small)
    error_shown("the image is 48x32 pixels; the model takes 64x64 (choose crop or resize to fit it)")
    browser.upload("reconstruct-upload", photo)  # the server still answers
    browser.wait_until(lambda: "PSNR" in browser.text("#reconstruct-status"), "the reconstruction")
    assert len(browser.image_sources("#reconstruct-tokens")) == 1
    browser.screenshot(str(SCREENSHOTS / "reconstruct.png"))
