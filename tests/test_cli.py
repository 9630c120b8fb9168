"""The movq-deploy console script (sample, edit, info) and the grid/image helpers it uses."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from movq_deploy import cli
from movq_deploy.images import load_image, load_mask, make_grid


def test_sample_writes_the_grid_of_generator_sample(tiny_engines, tiny_generator, tmp_path, capsys):
    out = tmp_path / "samples.png"
    rc = cli.main(["sample", "--engine-dir", str(tiny_engines.engine_dir), "-n", "6", "--seed", "0",
                   "--steps", "3", "--nrow", "3", "--out", str(out)])
    assert rc == 0
    expected = make_grid(tiny_generator.sample(n=6, steps=3, seed=0, output_type="np"), nrow=3)
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    captured = capsys.readouterr()
    assert "6 images" in captured.out and "onnxruntime-cpu" in captured.out and str(out) in captured.out
    assert "sampling" in captured.err  # progress (tqdm bar or plain lines)


def test_sample_and_edit_take_a_guidance_scale(tiny_engines, tiny_generator, tmp_path, capsys):
    out = tmp_path / "guided.png"
    rc = cli.main(["sample", "--engine-dir", str(tiny_engines.engine_dir), "-n", "3", "--seed", "1", "--steps", "3",
                   "--class-label", "green", "--guidance-scale", "2.5", "--nrow", "3", "--out", str(out)])
    assert rc == 0
    expected = tiny_generator.sample(n=3, steps=3, seed=1, class_labels="green", guidance_scale=2.5, output_type="np")
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(make_grid(expected, nrow=3)))
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    size = tiny_generator.image_size
    Image.fromarray(np.full((size, size, 3), 90, np.uint8)).save(image)
    Image.new("L", (size, size), 255).save(mask)
    rc = cli.main(["edit", "--engine-dir", str(tiny_engines.engine_dir), "--image", str(image), "--mask", str(mask),
                   "--seed", "2", "--steps", "3", "--class-label", "1", "--guidance-scale", "3",
                   "--out", str(tmp_path / "edited.png")])
    assert rc == 0
    want = tiny_generator.edit([Image.open(image)], [Image.open(mask)], steps=3, seed=2, class_labels=1,
                               guidance_scale=3.0, output_type="np")
    assert np.array_equal(np.asarray(Image.open(tmp_path / "edited.png")), want[0])
    capsys.readouterr()
    assert cli.main(["info", "--engine-dir", str(tiny_engines.engine_dir)]) == 0
    assert "guidance scale 0 (defaults)" in capsys.readouterr().out


def test_progress_falls_back_to_plain_lines(tiny_engines, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_tqdm", lambda: None)  # as if tqdm were not installed
    rc = cli.main(["sample", "--engine-dir", str(tiny_engines.engine_dir), "-n", "2", "--seed", "1",
                   "--steps", "2", "--out", str(tmp_path / "s.png")])
    assert rc == 0
    assert "sampling: 3/3 engine calls" in capsys.readouterr().err


def test_progress_into_a_log_is_a_few_plain_lines(tiny_engines, tmp_path, capsys):
    """stderr is not a terminal here (a log file, as in make demo): a line every tenth, not one per engine call."""
    rc = cli.main(["sample", "--engine-dir", str(tiny_engines.engine_dir), "-n", "2", "--seed", "1",
                   "--steps", "30", "--out", str(tmp_path / "s.png")])
    assert rc == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("sampling")]
    assert "\r" not in err and 1 < len(lines) <= 11  # 31 engine calls
    assert lines[-1] == "sampling: 31/31 engine calls"


def test_edit_inpaints_the_masked_box(tiny_engines, tiny_generator, tmp_path):
    size = tiny_generator.image_size
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(image).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    rc = cli.main(["edit", "--engine-dir", str(tiny_engines.engine_dir), "--image", str(tmp_path / "in.png"),
                   "--mask", str(tmp_path / "mask.png"), "--out", str(out), "--seed", "0", "--steps", "3"])
    assert rc == 0
    expected = tiny_generator.edit(image, mask > 0, steps=3, seed=0, output_type="np")[0]
    assert np.array_equal(np.asarray(Image.open(out)), expected)


def test_edit_outpaints_and_writes_a_grid_of_fills(tiny_engines, tmp_path):
    Image.new("RGB", (48, 48), (200, 30, 30)).save(tmp_path / "in.png")
    out = tmp_path / "fills.png"
    rc = cli.main(["edit", "--engine-dir", str(tiny_engines.engine_dir), "--image", str(tmp_path / "in.png"),
                   "--extend", "0,0,16,16", "-n", "4", "--nrow", "2", "--out", str(out), "--seed", "0",
                   "--steps", "2", "--paste-original"])
    assert rc == 0
    assert Image.open(out).size == (2 + 2 * (64 + 2), 2 + 2 * (64 + 2))


def test_edit_before_after_row(tiny_engines, tmp_path):
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "in.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "row.png"
    rc = cli.main(["edit", "--engine-dir", str(tiny_engines.engine_dir), "--image", str(tmp_path / "in.png"),
                   "--mask", str(tmp_path / "mask.png"), "-n", "3", "--before-after", "--out", str(out),
                   "--seed", "0", "--steps", "2"])
    assert rc == 0
    row = np.asarray(Image.open(out))
    assert row.shape == (2 + 66, 2 + 5 * 66, 3)  # input, masked input, 3 fills
    assert (row[2:66, 2:66] == (10, 200, 30)).all()
    assert (row[2:66, 68 + 32:68 + 64] == 127).all() and (row[2:66, 68:68 + 32] == (10, 200, 30)).all()


@pytest.mark.parametrize("argv, words", [
    (["sample", "--engine-dir", "{missing}"], "does not exist"),
    (["sample", "--engine-dir", "{engines}", "-n", "0"], "n must be"),
    (["sample", "--engine-dir", "{engines}", "--temperature", "nan"], "temperature must be"),
    (["edit", "--engine-dir", "{engines}", "--image", "{missing}"], "exactly one of --mask"),
    (["edit", "--engine-dir", "{engines}", "--image", "{missing}", "--mask", "m.png"], "does not exist"),
    (["edit", "--engine-dir", "{engines}", "--image", "{small}", "--extend", "1,2"], "four comma-separated"),
    (["edit", "--engine-dir", "{engines}", "--image", "{small}", "--mask", "{small}"], "the engines take 64x64"),
])
def test_bad_input_ends_with_one_line(tiny_engines, tmp_path, capsys, argv, words):
    Image.new("RGB", (32, 32)).save(tmp_path / "small.png")
    names = {"missing": str(tmp_path / "missing"), "engines": str(tiny_engines.engine_dir),
             "small": str(tmp_path / "small.png")}
    rc = cli.main([arg.format(**names) for arg in argv] + ["--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert words in err[-1] and err[-1].startswith("movq-deploy ")


def test_resize_fits_other_image_sizes(tiny_engines, tmp_path):
    Image.new("RGB", (100, 80), (0, 90, 200)).save(tmp_path / "big.png")
    Image.new("L", (100, 80), 255).save(tmp_path / "mask.png")
    rc = cli.main(["edit", "--engine-dir", str(tiny_engines.engine_dir), "--image", str(tmp_path / "big.png"),
                   "--mask", str(tmp_path / "mask.png"), "--resize", "--steps", "2", "--seed", "0",
                   "--out", str(tmp_path / "o.png")])
    assert rc == 0 and Image.open(tmp_path / "o.png").size == (64, 64)


def test_console_script_is_installed(tiny_engines):
    script = Path(sys.executable).parent / "movq-deploy"
    if not script.exists():
        script = shutil.which("movq-deploy")
    assert script is not None, "movq-deploy is not on PATH: pip install -e ."
    result = subprocess.run([str(script), "info", "--engine-dir", str(tiny_engines.engine_dir)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "onnxruntime-cpu" in result.stdout and "8x8x4" in result.stdout


def test_make_grid_layout():
    images = np.stack([np.full((4, 6, 3), i * 40, np.uint8) for i in range(5)])
    grid = np.asarray(make_grid(images, nrow=2, padding=1, pad_value=255))
    assert grid.shape == (1 + 3 * 5, 1 + 2 * 7, 3)
    assert (grid[1:5, 8:14] == 40).all() and (grid[11:15, 1:7] == 160).all() and (grid[11:15, 8:14] == 255).all()
    assert make_grid(list(images)).size == (1 * 2 + 3 * 8, 2 + 2 * 6)  # 3 per row by default for 5 images


def test_loading_helpers(tmp_path):
    Image.new("RGBA", (8, 8), (1, 2, 3, 4)).save(tmp_path / "a.png")
    assert load_image(tmp_path / "a.png").mode == "RGB" and load_mask(tmp_path / "a.png").mode == "L"
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(tmp_path / "b.png")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_mask(tmp_path / "c.png")


def test_unwritable_output_ends_with_one_line(tiny_engines, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    rc = cli.main(["sample", "--engine-dir", str(tiny_engines.engine_dir), "-n", "1", "--steps", "1", "--seed", "0",
                   "--out", str(tmp_path / "file" / "o.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("movq-deploy sample: error:") and "file" in err[-1]


@pytest.mark.parametrize("args, words", [
    (["sample", "--nrow", "-3"], "--nrow must be positive, got -3"),
    (["sample", "--nrow", "0"], "--nrow must be positive, got 0"),
    (["sample", "-n", "0"], "-n must be positive, got 0"),
    (["sample", "--steps", "0"], "--steps must be positive, got 0"),
    (["sample", "--seed", "-1"], "--seed must be non-negative, got -1"),
    (["sample", "--batch-size", "-2"], "--batch-size must be positive, got -2"),
    (["sample", "--temperature", "0"], "--temperature must be a finite number > 0, got 0.0"),
    (["sample", "--temperature", "nan"], "--temperature must be a finite number > 0, got nan"),
    (["sample", "--choice-temperature", "-1"], "--choice-temperature must be a finite number >= 0, got -1.0"),
    (["sample", "--guidance-scale", "-1"], "--guidance-scale must be a finite number >= 0, got -1.0"),
    (["edit", "--image", "IMAGE", "--mask", "IMAGE", "--guidance-scale", "inf"],
     "--guidance-scale must be a finite number >= 0, got inf"),
    (["edit", "--image", "missing.png", "--mask", "m.png"], "--image missing.png does not exist"),
    (["edit", "--image", "IMAGE", "--extend", "1,2"], "--extend takes four comma-separated pixel counts"),
])
def test_bad_arguments_fail_in_one_line_before_any_engine_work(tmp_path, monkeypatch, capsys, args, words):
    import movq_deploy.generator

    def no_engines(*_, **__):
        raise AssertionError("a Generator was opened before the arguments were checked")

    monkeypatch.setattr(movq_deploy.generator, "Generator", no_engines)
    image = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(image)
    args = [str(image) if arg == "IMAGE" else arg for arg in args]
    assert cli.main([*args, "--engine-dir", str(tmp_path), "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err


def test_out_must_not_be_a_directory(tmp_path, capsys):
    assert cli.main(["sample", "--engine-dir", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
