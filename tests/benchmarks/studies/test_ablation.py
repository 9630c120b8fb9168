"""benchmarks/studies/ablation.py's rows and table (the training itself is train/tokenizer.py's, tested there) and the
reconstruction metrics of benchmarks/recon_metrics.py."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.studies.ablation import FIG6, base_config, markdown, summarize, variants, verdict_text
from benchmarks.recon_metrics import frechet_distance, ssim


def test_fig6_rows_change_one_thing_at_a_time():
    rows = variants(base_config(32))
    config = {name: rows[name][0] for name in FIG6}
    assert all(c.grid[:2] == (8, 8) and c.image_size == 32 for c in config.values())
    assert (config["A"].num_chunks, config["A"].modulation) == (1, "none")
    assert (config["B"].num_chunks, config["B"].modulation, config["B"].f0) == (4, "none", "conv")
    for f0 in ("conv", "fourier", "sinusoid", "learned"):
        c = config[f"C-{f0}"]
        assert (c.num_chunks, c.modulation, c.f0, c.codebook_size) == (4, "first", f0, 512)
    assert config["K-x16"].codebook_size == 16 * config["C-fourier"].codebook_size
    assert [config[f"c{c}"].num_chunks for c in (1, 2, 8)] == [1, 2, 8]
    assert all(config[f"c{c}"].latent_channels == 64 and config[f"c{c}"].f0 == "fourier" for c in (1, 2, 8))
    assert base_config(64).block_out_channels == (16, 16, 32, 64)  # 64²: the tiny preset itself
    with pytest.raises(ValueError, match="image-size"):
        base_config(48)


def test_table_reports_mean_and_std_over_seeds_and_reads_the_direction():
    table_of = variants(base_config(32))
    common = {"grid": "8x8x4", "K": 512, "bits": 2304.0, "params_m": 0.8, "eval_crops": 48, "seconds": 1.0,
              "perplexity": 100.0}
    rows = [{"variant": "B", "seed": 0, "psnr": 20.0, "ssim": 0.50, **common},
            {"variant": "B", "seed": 1, "psnr": 20.2, "ssim": 0.52, **common},
            {"variant": "C-conv", "seed": 0, "psnr": 21.0, "ssim": 0.55, **common},
            {"variant": "C-conv", "seed": 1, "psnr": 21.4, "ssim": 0.57, **common}]
    table = summarize(rows, table_of)
    b = table[0]
    assert b["psnr"] == pytest.approx(20.1) and b["psnr_std"] == pytest.approx(0.1) and b["seeds"] == 2
    verdict = verdict_text(table)
    assert "the spatial norm helps" in verdict and "**holds**" in verdict and "beyond" in verdict
    text = markdown(table, "header", verdict)
    assert "20.10 ± 0.10" in text and "not computed" in text  # no LPIPS / rFID weights were given


def test_frechet_distance_of_gaussians_matches_the_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 1.0, (20000, 3))
    b = rng.normal(0.5, 2.0, (20000, 3))
    expected = 3 * 0.5 ** 2 + 3 * (1 + 4 - 2 * 2)  # |mu_a - mu_b|² + Tr(S_a + S_b - 2 (S_a S_b)^1/2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_ssim_is_one_for_identical_images_and_lower_for_noisy_ones():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    noisy = np.clip(images + rng.normal(0, 40, images.shape), 0, 255).astype(np.uint8)
    assert ssim(images, images) == pytest.approx([1.0, 1.0])
    assert (ssim(images, noisy) < 0.9).all()
