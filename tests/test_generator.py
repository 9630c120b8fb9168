"""Generator on ONNX Runtime CPU: parity with the PyTorch reference, determinism, threads, bad input."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from PIL import Image

from movq_deploy.generator import Generator


def _one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message, message
    return message


def _copy_engines(tiny_engines, tmp_path):
    engine_dir = tmp_path / "engines"
    shutil.copytree(tiny_engines.engine_dir, engine_dir)
    return engine_dir


def _images(count, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def test_runtime_never_imports_torch(tiny_engines):
    code = textwrap.dedent(f"""
        import sys
        import movq_deploy
        from movq_deploy import Generator
        import movq_deploy.cli, movq_deploy.images, movq_deploy.backends.onnxruntime
        images = Generator({str(tiny_engines.engine_dir)!r}).sample(n=2, steps=2, seed=0, output_type="np")
        assert images.shape[0] == 2
        print("torch" in sys.modules)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_auto_backend_is_onnxruntime_cpu_here_and_says_why(tiny_engines, caplog):
    with caplog.at_level(logging.INFO, logger="movq_deploy"):
        generator = Generator(tiny_engines.engine_dir)
    assert generator.backend_name == "onnxruntime-cpu"
    assert generator.precision == "fp32"
    assert "TensorRT" in generator.backend_reason and "CPU" in generator.backend_reason
    lines = [r.getMessage() for r in caplog.records if r.name == "movq_deploy"]
    assert len(lines) == 1 and "onnxruntime-cpu" in lines[0]


def test_sample_output_types(tiny_generator):
    size = tiny_generator.image_size
    images = tiny_generator.sample(n=3, steps=2, seed=0)
    assert len(images) == 3 and all(isinstance(i, Image.Image) and i.size == (size, size) for i in images)
    array = tiny_generator.sample(n=3, steps=2, seed=0, output_type="np")
    assert array.dtype == np.uint8 and array.shape == (3, size, size, 3)
    assert np.array_equal(np.stack([np.asarray(i) for i in images]), array)


@pytest.mark.parametrize("seed", [0, 1])
def test_sample_tokens_match_the_pytorch_reference(tiny_generator, tiny_reference, one_torch_thread, seed):
    ours = tiny_generator.sample_tokens(n=64, seed=seed)
    reference = tiny_reference.sample_tokens(64, steps=8, seed=seed)
    assert ours.dtype == np.int32 and ours.shape == reference.shape
    identical = (ours == reference).all(axis=1).mean()
    print(f"seed {seed}: {identical:.1%} of 64 token grids identical to the reference, "
          f"{(ours == reference).mean():.2%} of slots")
    assert identical >= 0.95
    # Images decoded from the same tokens: within 1 per pixel.
    difference = np.abs(tiny_generator.decode(reference, output_type="np").astype(int)
                        - tiny_reference.decode(reference).astype(int))
    assert difference.max() <= 1


def test_class_conditional_parity_and_names(tiny_engines, tiny_generator, tiny_reference, one_torch_thread):
    labels = [i % tiny_engines.num_classes for i in range(16)]
    ours = tiny_generator.sample_tokens(n=16, seed=3, class_labels=labels)
    reference = tiny_reference.sample_tokens(16, steps=8, seed=3, class_labels=labels)
    assert (ours == reference).all(axis=1).mean() >= 0.9
    by_name = tiny_generator.sample_tokens(n=16, seed=3, class_labels=[tiny_engines.class_names[i] for i in labels])
    assert np.array_equal(by_name, ours)
    # One label, as an int or a 0-d array, applies to every image.
    one = tiny_generator.sample_tokens(n=2, steps=2, seed=3, class_labels=1)
    assert np.array_equal(tiny_generator.sample_tokens(n=2, steps=2, seed=3, class_labels=np.array(1)), one)
    # No label = the null class, which changes the samples.
    assert not np.array_equal(tiny_generator.sample_tokens(n=16, seed=3), ours)


def test_sample_is_decode_of_sample_tokens(tiny_generator):
    tokens = tiny_generator.sample_tokens(n=4, steps=3, seed=7)
    images = tiny_generator.sample(n=4, steps=3, seed=7, output_type="np")
    assert np.array_equal(images, tiny_generator.decode(tokens, output_type="np"))


def test_results_depend_on_seed_not_on_batch_size(tiny_engines, tiny_generator):
    chunked = Generator(tiny_engines.engine_dir, backend="onnxruntime-cpu", batch_size=5)
    whole = tiny_generator.sample_tokens(n=12, steps=3, seed=11)
    assert (chunked.batch_size, chunked.image_batch_size) == (5, 5)
    assert (tiny_generator.batch_size, tiny_generator.image_batch_size) == (64, 16)
    assert np.array_equal(chunked.sample_tokens(n=12, steps=3, seed=11), whole)
    assert np.array_equal(chunked.decode(whole, output_type="np"), tiny_generator.decode(whole, output_type="np"))
    assert np.array_equal(tiny_generator.sample_tokens(n=4, steps=3, seed=11), whole[:4])
    assert not np.array_equal(tiny_generator.sample_tokens(n=12, steps=3, seed=12), whole)
    # seed=None draws a fresh seed per call.
    assert not np.array_equal(tiny_generator.sample_tokens(n=2, steps=3), tiny_generator.sample_tokens(n=2, steps=3))


def test_progress_counts_every_engine_call(tiny_engines):
    generator = Generator(tiny_engines.engine_dir, backend="onnxruntime-cpu", batch_size=2)
    calls = []
    generator.sample(n=3, steps=2, seed=0, progress=lambda done, total: calls.append((done, total)))
    # 2 chunks x 2 prior steps + 2 decoder calls.
    assert calls == [(i, 6) for i in range(1, 7)]


def test_sample_from_8_threads_equals_serial(tiny_generator):
    seeds = list(range(8))
    serial = [tiny_generator.sample(n=4, steps=4, seed=s, output_type="np") for s in seeds]
    results, errors = [None] * 8, []
    barrier = threading.Barrier(8)

    def work(i):
        try:
            barrier.wait()
            results[i] = tiny_generator.sample(n=4, steps=4, seed=seeds[i], output_type="np")
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert all(np.array_equal(a, b) for a, b in zip(results, serial))


@pytest.mark.parametrize("kwargs, words", [
    (dict(n=0), "n must be"),
    (dict(n=-2), "n must be"),
    (dict(n=2.5), "n must be"),
    (dict(steps=0), "steps must be"),
    (dict(steps=-1), "steps must be"),
    (dict(temperature=float("nan")), "temperature must be"),
    (dict(temperature=-1.0), "temperature must be"),
    (dict(temperature=0.0), "temperature must be > 0"),
    (dict(choice_temperature=float("nan")), "choice_temperature must be"),
    (dict(choice_temperature=-0.5), "choice_temperature must be"),
    (dict(class_labels=3), "out of range"),
    (dict(class_labels=-1), "out of range"),
    (dict(class_labels=[0, 1, 2]), "2 images"),
    (dict(class_labels="purple"), "unknown class name"),
    (dict(seed=-1), "seed must be"),
    (dict(output_type="tensor"), "output_type"),
])
def test_bad_sampling_arguments_get_one_line(tiny_generator, kwargs, words):
    arguments = {"n": 2, "steps": 2, "seed": 0, **kwargs}
    with pytest.raises(ValueError) as excinfo:
        tiny_generator.sample(**arguments)
    assert words in _one_line_error(excinfo)


def test_missing_engine_dir(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        Generator(tmp_path / "nowhere")
    assert "does not exist" in _one_line_error(excinfo)


def test_altered_or_missing_onnx_file_is_refused(tiny_engines, tmp_path):
    engine_dir = _copy_engines(tiny_engines, tmp_path)
    with open(engine_dir / "decoder.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError) as excinfo:
        Generator(engine_dir)
    assert "decoder.onnx" in _one_line_error(excinfo) and "sha256" in str(excinfo.value)
    (engine_dir / "decoder.onnx").unlink()
    with pytest.raises(FileNotFoundError) as excinfo:
        Generator(engine_dir)
    assert "decoder.onnx" in _one_line_error(excinfo)


def test_manifest_of_another_format_version_is_refused(tiny_engines, tmp_path):
    engine_dir = _copy_engines(tiny_engines, tmp_path)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    manifest["format_version"] = 99
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as excinfo:
        Generator(engine_dir)
    assert "format version 99" in _one_line_error(excinfo)


def test_unconditional_model_parity_and_refused_labels(tiny_unconditional_engines, one_torch_thread):
    from movq_deploy.models.checkpoint import load_models
    from movq_deploy.models.reference import ReferenceSampler

    generator = Generator(tiny_unconditional_engines.engine_dir)
    assert not any(spec.name == "class_labels" for spec in generator.backend.runners["prior"].inputs)
    reference = ReferenceSampler(*load_models(tiny_unconditional_engines.ckpt)[:2])
    ours, theirs = generator.sample_tokens(n=16, seed=4), reference.sample_tokens(16, steps=8, seed=4)
    assert (ours == theirs).all(axis=1).mean() >= 0.9
    with pytest.raises(ValueError) as excinfo:
        generator.sample(n=2, steps=2, seed=0, class_labels=1)
    assert "unconditional" in _one_line_error(excinfo)


def test_manifest_disagreeing_with_the_prior_graph_is_refused(tiny_engines, tmp_path):
    engine_dir = _copy_engines(tiny_engines, tmp_path)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    manifest["num_classes"], manifest["class_names"] = 0, []
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as excinfo:
        Generator(engine_dir)
    assert "class_labels" in _one_line_error(excinfo)


def test_encode_decode_reconstruct(tiny_generator, tiny_reference, one_torch_thread):
    size, grid = tiny_generator.image_size, tiny_generator.grid
    images = _images(5, size)
    indices = tiny_generator.encode(images)
    assert indices.dtype == np.int32 and indices.shape == (5, *grid)
    assert (indices == tiny_reference.encode(images)).mean() >= 0.99  # exact ties may differ
    assert np.array_equal(tiny_generator.encode(Image.fromarray(images[0])), indices[:1])
    reconstructed = tiny_generator.reconstruct(images, output_type="np")
    assert np.array_equal(reconstructed, tiny_generator.decode(indices, output_type="np"))
    assert np.array_equal(tiny_generator.decode(indices.reshape(5, -1), output_type="np"), reconstructed)
    pil = tiny_generator.reconstruct([Image.fromarray(image) for image in images])
    assert np.array_equal(np.stack([np.asarray(i) for i in pil]), reconstructed)


@pytest.mark.parametrize("bad, words", [
    (np.zeros((1, 32, 32, 3), np.uint8), "the engines take"),
    (np.zeros((1, 64, 64, 3), np.float32), "must be uint8"),
    (np.zeros((1, 64, 64), np.uint8), "must be uint8"),
    ([], "no images"),
])
def test_bad_images_get_one_line(tiny_generator, bad, words):
    with pytest.raises(ValueError) as excinfo:
        tiny_generator.encode(bad)
    assert words in _one_line_error(excinfo)


@pytest.mark.parametrize("bad, words", [
    (np.zeros((1, 8, 8, 2), np.int32), "must have shape"),
    (np.full((1, 8, 8, 4), 10_000, np.int32), "must lie in"),
    (np.zeros((1, 8, 8, 4), np.float32), "must be integers"),
])
def test_bad_indices_get_one_line(tiny_generator, bad, words):
    with pytest.raises(ValueError) as excinfo:
        tiny_generator.decode(bad)
    assert words in _one_line_error(excinfo)


def test_int8_precision_uses_the_int8_graphs(tiny_engines, tiny_generator):
    generator = Generator(tiny_engines.engine_dir, precision="int8")
    assert generator.precision == "int8"
    assert generator.backend.runners["prior"].path.name == "prior.int8.onnx"
    assert generator.backend.runners["decoder"].path.name == "decoder.int8.onnx"
    tokens = generator.sample_tokens(n=8, steps=4, seed=0)
    assert tokens.shape == (8, generator.num_slots) and tokens.max() < generator.codebook_size
    with pytest.raises(FileNotFoundError) as excinfo:  # this engine dir was exported without --fp16
        Generator(tiny_engines.engine_dir, precision="fp16")
    assert "fp16" in _one_line_error(excinfo)


@pytest.mark.parametrize("guidance_scale", [None, [0.0, 2.0, 0.5, 3.0, 1.0, 0.0, 2.5, 1.5]])
def test_int8_images_do_not_depend_on_their_batchmates(tiny_engines, guidance_scale):
    """The int8 prior-step graphs' activation scales are fixed at export: each image of sample(n=8) is, bit for bit,
    the image sampled alone (one image per prior call), with mixed labels and, guided, per-image guidance scales."""
    labels = [0, 1, 2, None, 2, 1, 0, None]
    kwargs = dict(n=8, steps=4, seed=5, class_labels=labels, guidance_scale=guidance_scale, output_type="np")
    together = Generator(tiny_engines.engine_dir, precision="int8").sample(**kwargs)
    alone = Generator(tiny_engines.engine_dir, precision="int8", batch_size=1).sample(**kwargs)
    assert np.array_equal(alone, together)
    first = Generator(tiny_engines.engine_dir, precision="int8").sample(
        **{**kwargs, "n": 1, "class_labels": labels[:1], "guidance_scale": guidance_scale and guidance_scale[:1]})
    assert np.array_equal(first[0], together[0])
    assert len({image.tobytes() for image in together}) > 1  # not one image eight times


def test_output_type_tokens_and_the_token_twin(tiny_engines):
    generator = Generator(tiny_engines.engine_dir, backend="onnxruntime-cpu", batch_size=2)
    calls = []
    tokens = generator.sample(n=3, steps=2, seed=4, output_type="tokens", progress=lambda *call: calls.append(call))
    assert tokens.dtype == np.int32 and tokens.shape == (3, generator.num_slots)
    assert calls[-1] == (4, 4)  # 2 chunks x 2 prior steps, no decoder call
    assert np.array_equal(tokens, generator.sample_tokens(n=3, steps=2, seed=4))


def test_sampling_defaults_come_from_the_engine_dir(tiny_engines, tiny_generator, tmp_path):
    engine_dir = _copy_engines(tiny_engines, tmp_path)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    manifest["sampling"] = {"steps": 3, "temperature": 0.7, "choice_temperature": 2.0}
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    custom = Generator(engine_dir, backend="onnxruntime-cpu")
    assert custom.default_steps == 3
    explicit = tiny_generator.sample_tokens(n=2, seed=1, steps=3, temperature=0.7, choice_temperature=2.0)
    assert np.array_equal(custom.sample_tokens(n=2, seed=1), explicit)
    assert not np.array_equal(tiny_generator.sample_tokens(n=2, seed=1, steps=3), explicit)


def test_per_image_temperatures_equal_one_call_per_temperature(tiny_generator):
    mixed = tiny_generator.sample_tokens(n=3, steps=3, seed=2, temperature=[1.0, 0.5, 1.0],
                                         choice_temperature=[4.5, 4.5, 0.0])
    plain = tiny_generator.sample_tokens(n=3, steps=3, seed=2, temperature=1.0, choice_temperature=4.5)
    cold = tiny_generator.sample_tokens(n=3, steps=3, seed=2, temperature=0.5, choice_temperature=4.5)
    noiseless = tiny_generator.sample_tokens(n=3, steps=3, seed=2, temperature=1.0, choice_temperature=0.0)
    assert np.array_equal(mixed[0], plain[0]) and np.array_equal(mixed[1], cold[1])
    assert np.array_equal(mixed[2], noiseless[2]) and not np.array_equal(cold[1], plain[1])
    with pytest.raises(ValueError) as excinfo:
        tiny_generator.sample_tokens(n=3, temperature=[1.0, 2.0])
    assert "temperature must be one number or 3" in _one_line_error(excinfo)


def test_with_block_closes_the_runners(tiny_engines):
    closed = []
    with Generator(tiny_engines.engine_dir, backend="onnxruntime-cpu") as generator:
        for name, runner in generator.backend.runners.items():
            runner.close = lambda name=name: closed.append(name)  # records the call (the real close frees memory)
        generator.sample_tokens(n=1, steps=1, seed=0)
        assert closed == []
    assert sorted(closed) == ["decoder", "encoder", "prior", "prior_guided"]


def test_batch_sizes_come_from_the_memory_budget_and_never_change_an_image(tiny_engines, tiny_generator):
    """The export records each graph's memory per image; a budget of about two decoder images gives calls of two
    images (the default budget, of gigabytes, the speed caps), the same images, and a budget below one image is
    refused in one line when the Generator opens."""
    from movq_deploy.memory import MemoryBudgetError

    manifest = tiny_generator.engine_dir
    decoder = manifest.graph("fp32", "decoder")["memory_per_image"]["peak"]
    encoder = manifest.graph("fp32", "encoder")["memory_per_image"]["peak"]
    assert decoder > 0 and encoder > 0
    assert (tiny_generator.batch_size, tiny_generator.image_batch_size) == (64, 16)
    budget = int(2.5 * max(decoder, encoder))
    small = Generator(tiny_engines.engine_dir, memory_budget=budget)
    assert small.image_batch_size == 2
    kwargs = dict(n=5, seed=3, class_labels=[0, 1, 2, None, 0], output_type="np")
    np.testing.assert_array_equal(small.sample(**kwargs), tiny_generator.sample(**kwargs))
    with pytest.raises(MemoryBudgetError, match=r"running the (encoder|decoder|prior|prior_guided) graph \(\d+x\d+\) needs .* for one "
                                                r"item, more than the memory budget of .* \(memory_budget\)"):
        Generator(tiny_engines.engine_dir, memory_budget=min(decoder, encoder) // 2)
