"""Classifier-free guidance through the Generator on ONNX Runtime CPU: w = 0 is today's sampling, guided parity with
the PyTorch reference, per-row routing and determinism, bad values, and directories that cannot guide."""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest

from movq_deploy import contract, sampling
from movq_deploy.generator import Generator
from movq_deploy.manifest import EngineDir

LABELS = [0, 1, 2, 0, 1, 2, 0, 1]


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


def _prior_feeds(engine_dir: EngineDir, batch: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    n, k = engine_dir.grid.num_slots, engine_dir.codebook_size
    tokens = np.where(rng.random((batch, n)) < 0.6, k, rng.integers(0, k, (batch, n)))
    tokens[0] = k  # the first step: everything masked
    labels = rng.integers(0, engine_dir.num_classes + 1, batch)  # the null class too
    return contract.prior_step_feeds(tokens, labels, rng.random((batch, n)), rng.gumbel(size=(batch, n)), 1.0, 2.0)


@pytest.mark.parametrize("batch", [1, 3, 16])
def test_the_guided_graph_at_w0_is_the_plain_graph_bit_for_bit_in_fp32(tiny_engines, batch):
    engine_dir = EngineDir.load(tiny_engines.engine_dir)
    plain, guided = (ort.InferenceSession(str(engine_dir.verify(engine_dir.graph("fp32", name))),
                                          providers=["CPUExecutionProvider"]) for name in ("prior", "prior_guided"))
    feeds = _prior_feeds(engine_dir, batch, seed=batch)
    expected = plain.run(None, feeds)
    got = guided.run(None, {**feeds, "guidance_scale": np.zeros(batch, np.float32)})
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    # (Not so for the int8 graphs: their activation scales are computed over the whole call, null-class rows
    # included; w = 0 rows never reach the guided graph, so Generator sampling at w = 0 is exact there too.)


def test_w0_gives_exactly_the_unguided_images_and_is_the_default(tiny_generator):
    unguided = tiny_generator.sample_tokens(n=8, steps=4, seed=2, class_labels=LABELS)
    assert tiny_generator.engine_dir.sampling.guidance_scale == 0.0
    assert np.array_equal(tiny_generator.sample_tokens(n=8, steps=4, seed=2, class_labels=LABELS,
                                                       guidance_scale=0.0), unguided)
    assert np.array_equal(tiny_generator.sample_tokens(n=8, steps=4, seed=2, class_labels=LABELS,
                                                       guidance_scale=[0.0] * 8), unguided)


def test_guided_sampling_matches_the_pytorch_reference_and_changes_tokens(tiny_generator, tiny_reference,
                                                                          one_torch_thread):
    labels = LABELS * 2
    ours = tiny_generator.sample_tokens(n=16, seed=4, class_labels=labels, guidance_scale=3.0)
    reference = tiny_reference.sample_tokens(16, steps=8, seed=4, class_labels=labels, guidance_scale=3.0)
    identical = (ours == reference).all(axis=1).mean()
    print(f"guided (w=3): {identical:.1%} of 16 token grids identical to the reference")
    assert identical >= 0.9
    unguided = tiny_generator.sample_tokens(n=16, seed=4, class_labels=labels)
    assert (ours != unguided).any(axis=1).mean() >= 0.5  # guidance changes most images


def test_mixed_guidance_rows_equal_each_alone_whatever_the_batching(tiny_engines, tiny_generator):
    w = [0.0, 3.0, 0.0, 3.0, 1.0, 0.0]
    labels = LABELS[:6]
    mixed = tiny_generator.sample_tokens(n=6, steps=4, seed=9, class_labels=labels, guidance_scale=w)
    unguided = tiny_generator.sample_tokens(n=6, steps=4, seed=9, class_labels=labels, guidance_scale=0.0)
    guided = {scale: tiny_generator.sample_tokens(n=6, steps=4, seed=9, class_labels=labels, guidance_scale=scale)
              for scale in (1.0, 3.0)}
    for row, scale in enumerate(w):
        expected = unguided[row] if scale == 0 else guided[scale][row]
        assert np.array_equal(mixed[row], expected), row
    one_by_one = Generator(tiny_engines.engine_dir, backend="onnxruntime-cpu", batch_size=1)
    assert np.array_equal(one_by_one.sample_tokens(n=6, steps=4, seed=9, class_labels=labels, guidance_scale=w),
                          mixed)


def test_a_step_is_at_most_two_prior_calls(tiny_engines):
    generator = Generator(tiny_engines.engine_dir, backend="onnxruntime-cpu")
    calls = {"prior": [], "prior_guided": []}
    for name, runner in generator.backend.runners.items():
        if name in calls:
            run = runner.run
            runner.run = lambda feeds, run=run, name=name: calls[name].append(len(feeds["tokens"])) or run(feeds)
    ticks = []
    generator.sample_tokens(n=5, steps=3, seed=0, class_labels=LABELS[:5], guidance_scale=[0, 2, 0, 2, 2],
                            progress=lambda done, total: ticks.append((done, total)))
    assert calls == {"prior": [2, 2, 2], "prior_guided": [3, 3, 3]}
    assert ticks == [(1, 3), (2, 3), (3, 3)]  # one progress tick per step


@pytest.mark.parametrize("value, words", [
    (-1.0, "guidance_scale must be >= 0"),
    (float("nan"), "guidance_scale must be a finite number >= 0"),
    (float("inf"), "guidance_scale must be a finite number >= 0"),
    ([1.0, 2.0, 3.0], "guidance_scale must be one number or 2 (one per image)"),
    ("2", "guidance_scale must be a finite number >= 0"),
])
def test_bad_guidance_scale_gets_one_line(tiny_generator, value, words):
    with pytest.raises(ValueError) as excinfo:
        tiny_generator.sample(n=2, steps=2, seed=0, guidance_scale=value)
    assert words in _one_line_error(excinfo)
    size = tiny_generator.image_size
    with pytest.raises(ValueError) as excinfo:
        tiny_generator.edit(np.zeros((2, size, size, 3), np.uint8), np.ones((2, size, size), bool), steps=2,
                            guidance_scale=value)
    assert words in _one_line_error(excinfo)


def test_edit_takes_guidance_and_w0_is_unguided(tiny_generator):
    size = tiny_generator.image_size
    images = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    masks = np.zeros((3, size, size), bool)
    masks[:, size // 2:] = True
    plain = tiny_generator.edit_tokens(images, masks, steps=4, seed=1, class_labels=[0, 1, 2])
    assert np.array_equal(tiny_generator.edit_tokens(images, masks, steps=4, seed=1, class_labels=[0, 1, 2],
                                                     guidance_scale=0), plain)
    guided = tiny_generator.edit_tokens(images, masks, steps=4, seed=1, class_labels=[0, 1, 2], guidance_scale=4)
    regenerated = sampling.slot_mask_from_pixels(masks, tiny_generator.grid)
    assert np.array_equal(guided[~regenerated], plain[~regenerated])  # outside the mask: the images' own tokens
    assert not np.array_equal(guided[regenerated], plain[regenerated])


def _without_guided_graph(tiny_engines, tmp_path):
    """A copy of the tiny engine directory as exported before guidance: no prior_guided graph, no default."""
    engine_dir = tmp_path / "engines"
    shutil.copytree(tiny_engines.engine_dir, engine_dir)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    for graphs in manifest["graphs"].values():
        entry = graphs.pop("prior_guided")
        (engine_dir / entry["file"]).unlink()
        manifest["validation"].get("fp32", {}).pop("prior_guided", None)
    del manifest["sampling"]["guidance_scale"]
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    return engine_dir


def test_a_directory_without_the_guided_graph_loads_and_refuses_guidance(tiny_engines, tiny_generator, tmp_path):
    old = Generator(_without_guided_graph(tiny_engines, tmp_path), backend="onnxruntime-cpu")
    assert set(old.backend.runners) == {"encoder", "decoder", "prior"} and old.engine_dir.sampling.guidance_scale == 0
    assert np.array_equal(old.sample_tokens(n=4, steps=3, seed=5, class_labels=1),
                          tiny_generator.sample_tokens(n=4, steps=3, seed=5, class_labels=1))
    assert old.sample_tokens(n=2, steps=2, seed=0, guidance_scale=0).shape == (2, old.num_slots)
    with pytest.raises(ValueError) as excinfo:
        old.sample(n=2, steps=2, seed=0, class_labels=1, guidance_scale=2.0)
    message = _one_line_error(excinfo)
    assert "no prior_guided graph" in message and "re-export" in message and "export/to_onnx.py" in message
    int8 = Generator(old.engine_dir, backend="onnxruntime-cpu", precision="int8")
    assert set(int8.backend.runners) == {"encoder", "decoder", "prior"}


def test_an_unconditional_model_has_no_guided_graph_and_refuses_guidance(tiny_unconditional_engines):
    generator = Generator(tiny_unconditional_engines.engine_dir, backend="onnxruntime-cpu")
    assert "prior_guided" not in generator.backend.runners
    assert "prior_guided" not in generator.engine_dir.graphs["fp32"]
    assert generator.sample_tokens(n=2, steps=2, seed=0, guidance_scale=0.0).shape == (2, generator.num_slots)
    with pytest.raises(ValueError) as excinfo:
        generator.sample(n=2, steps=2, seed=0, guidance_scale=1.5)
    assert "unconditional" in _one_line_error(excinfo)


def test_the_manifest_default_guidance_applies(tiny_engines, tiny_generator, tmp_path):
    engine_dir = tmp_path / "engines"
    shutil.copytree(tiny_engines.engine_dir, engine_dir)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    manifest["sampling"]["guidance_scale"] = 2.0
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    generator = Generator(engine_dir, backend="onnxruntime-cpu")
    assert np.array_equal(generator.sample_tokens(n=3, steps=3, seed=1, class_labels=2),
                          tiny_generator.sample_tokens(n=3, steps=3, seed=1, class_labels=2, guidance_scale=2.0))
    assert np.array_equal(generator.sample_tokens(n=3, steps=3, seed=1, class_labels=2, guidance_scale=0),
                          tiny_generator.sample_tokens(n=3, steps=3, seed=1, class_labels=2))
