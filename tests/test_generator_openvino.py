"""Generator on OpenVINO, every precision: parity with the fp32 graphs, determinism (batch, chunking, the server's
scheduler), and the one-line refusals (no bf16 validation, OpenVINO missing, a CPU without bf16)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from movq_deploy import contract
from movq_deploy.backends import cpu_choice, cpu_features
from movq_deploy.backends.cpu_choice import Placement
from movq_deploy.generator import Generator
from movq_deploy.serving.scheduler import Scheduler, SchedulerConfig

pytest.importorskip("openvino", reason="openvino is not installed (pip install 'movq-deploy[openvino]')")
needs_bf16 = pytest.mark.skipif(not cpu_features.native_bf16(),
                                reason=f"this CPU has no native bf16 ({cpu_features.describe()})")
needs_int8 = pytest.mark.skipif(not (cpu_features.native_int8() and cpu_features.native_bf16()),
                                reason=f"needs int8 dot products and native bf16 ({cpu_features.describe()})")
PRECISIONS = [pytest.param("fp32"), pytest.param("bf16", marks=needs_bf16), pytest.param("int8", marks=needs_int8)]


@pytest.fixture(scope="module")
def generators(tiny_engines):
    """{precision: Generator(backend="openvino", precision=...)} opened once for the module."""
    made = {}

    def get(precision):
        if precision not in made:
            made[precision] = Generator(tiny_engines.engine_dir, backend="openvino", precision=precision)
        return made[precision]

    return get


@pytest.mark.parametrize("precision", PRECISIONS)
def test_placement_and_name(generators, tiny_engines, precision):
    generator = generators(precision)
    assert generator.backend_name == "openvino"
    if precision == "int8":  # the graphs quantized for OpenVINO in int8, the others in bf16 where it passes
        quantized = generator.engine_dir.graphs["int8-openvino"]
        assert {g for g, p in generator.placement.items() if p.precision == "int8"} == set(quantized)
        for graph in set(generator.placement) - set(quantized):
            passes = cpu_choice.bf16_unusable(generator.engine_dir, graph) is None
            assert generator.placement[graph] == Placement("openvino", "bf16" if passes else "fp32")
    else:
        assert set(generator.placement.values()) == {Placement("openvino", precision)}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("guidance_scale", [0.0, 2.0])
def test_images_do_not_depend_on_batch_or_chunking(generators, tiny_engines, precision, guidance_scale):
    """sample(n=7) equals each image sampled alone and the same call in chunks of 3, bit for bit."""
    kwargs = dict(n=7, seed=11, class_labels=[0, 1, 2, None, 0, 1, 2], guidance_scale=guidance_scale,
                  output_type="np")
    together = generators(precision).sample(**kwargs)
    chunked = Generator(tiny_engines.engine_dir, backend="openvino", precision=precision, batch_size=3)
    np.testing.assert_array_equal(chunked.sample(**kwargs), together)
    alone = Generator(tiny_engines.engine_dir, backend="openvino", precision=precision, batch_size=1)
    np.testing.assert_array_equal(alone.sample(**kwargs), together)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_served_image_equals_generator_sample(generators, precision):
    """The server's step-level scheduler mixes requests in every prior call; each image is still the library's."""
    generator = generators(precision)
    with Scheduler(generator, SchedulerConfig(capacity=5, max_request_images=4)) as scheduler:
        jobs = [scheduler.submit_sample(n, seed=seed, class_labels=label)
                for n, seed, label in ((3, 1, 0), (1, 2, None), (4, 3, 2), (2, 4, 1))]
        served = [job.future.result(timeout=120) for job in jobs]
    for (n, seed, label), images in zip(((3, 1, 0), (1, 2, None), (4, 3, 2), (2, 4, 1)), served):
        np.testing.assert_array_equal(images, generator.sample(n=n, seed=seed, class_labels=label,
                                                               output_type="np"))


def test_fp32_samples_the_onnxruntime_tokens(generators, tiny_generator):
    kwargs = dict(n=6, seed=5, class_labels=[0, 1, 2, 0, 1, 2])
    ours, reference = generators("fp32").sample_tokens(**kwargs), tiny_generator.sample_tokens(**kwargs)
    assert (ours == reference).mean() >= 0.99


@needs_bf16
def test_bf16_stays_close_to_fp32(generators, tiny_generator, tiny_engines):
    """What the export's bf16 validation measured (tiny random weights: prior top token 99%, decoder 47 dB, encoder
    97%), reproduced through the Generator."""
    bf16 = generators("bf16")
    rng = np.random.default_rng(0)
    grids = rng.integers(0, tiny_generator.codebook_size, (8, *tiny_generator.grid), dtype=np.int32)
    reference, images = tiny_generator.decode(grids, output_type="np"), bf16.decode(grids, output_type="np")
    mse = np.mean((reference.astype(float) - images) ** 2)
    assert 10 * np.log10(255 ** 2 / mse) >= 40
    assert (bf16.encode(reference) == tiny_generator.encode(reference)).mean() >= 0.95
    slots, mask_id = tiny_generator.num_slots, tiny_generator.mask_id
    tokens = np.where(rng.random((16, slots)) < 0.7, mask_id, grids.reshape(8, -1).repeat(2, axis=0))
    feeds = contract.prior_step_feeds(tokens, np.zeros(16, np.int32), np.full((16, slots), 0.5, np.float32),
                                      np.zeros((16, slots), np.float32), 1e-4, 0.0)  # an argmax draw
    masked = tokens == mask_id
    top = bf16.backend.runners["prior"].run(feeds)["sampled"][masked]
    assert (top == tiny_generator.backend.runners["prior"].run(feeds)["sampled"][masked]).mean() >= 0.97


# ---- refusals ---------------------------------------------------------------------------------------------


def _without_bf16_validation(tiny_engines, tmp_path):
    engine_dir = tmp_path / "engines"
    shutil.copytree(tiny_engines.engine_dir, engine_dir)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    del manifest["validation"]["bf16"]
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    return engine_dir


def test_bf16_without_validation_is_refused_in_one_line(tiny_engines, tmp_path):
    engine_dir = _without_bf16_validation(tiny_engines, tmp_path)
    with pytest.raises(RuntimeError) as refused:
        Generator(engine_dir, backend="openvino", precision="bf16")
    assert "holds no bf16 validation of the encoder graph; re-export" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert Generator(engine_dir, backend="openvino").precision == "fp32"  # "auto" on OpenVINO: fp32 then


def test_a_cpu_without_bf16_gets_one_line_or_onnxruntime(tiny_engines, monkeypatch):
    monkeypatch.setattr(cpu_features, "native_bf16", lambda: False)
    with pytest.raises(RuntimeError, match="bf16 is not usable for the encoder graph here: this CPU has no native"):
        Generator(tiny_engines.engine_dir, backend="openvino", precision="bf16")
    generator = Generator(tiny_engines.engine_dir)
    assert generator.backend_name == "onnxruntime-cpu" and "this CPU has no native bf16" in generator.backend_reason


def test_openvino_missing_gets_one_line_or_onnxruntime(tiny_engines, monkeypatch):
    monkeypatch.setattr(cpu_choice, "openvino_installed", lambda: False)
    with pytest.raises(ImportError, match=r"^openvino is not installed; install it with `pip install 'movq-deploy"):
        Generator(tiny_engines.engine_dir, backend="openvino")
    generator = Generator(tiny_engines.engine_dir)
    assert generator.backend_name == "onnxruntime-cpu" and "openvino is not installed" in generator.backend_reason
