"""The page's services give what the Generator gives, and refuse bad edits up front: LocalService (a Generator in
this process) and ServedService (a serving replica's batching service, without Ray)."""
import asyncio

import numpy as np
import pytest

from movq_deploy.ui.service import MAX_IMAGES, LocalService, SamplingOptions, ServedService


def _run(call, *args, **kwargs):
    return asyncio.run(call(*args, **kwargs))


@pytest.fixture(scope="module", params=["local", "served"])
def service(request, tiny_generator, tiny_engines):
    if request.param == "local":
        yield LocalService(tiny_generator)
        return
    from movq_deploy.serving.service import ImageService, ServiceConfig

    served = ImageService(ServiceConfig(str(tiny_engines.engine_dir), backend="onnxruntime-cpu"))
    yield ServedService(served)
    served.close()


def test_info_describes_the_model_and_its_stored_defaults(service, tiny_generator, tiny_engines):
    info = service.info()
    stored = tiny_generator.engine_dir.sampling  # the manifest's "sampling"
    assert (info.backend, info.precision) == ("onnxruntime-cpu", "fp32")
    assert (info.image_size, info.grid, info.codebook_size) == (64, (8, 8, 4), tiny_generator.codebook_size)
    assert info.class_names == tiny_engines.class_names and info.num_classes == tiny_engines.num_classes
    assert info.defaults == stored and stored.steps == 8


def test_sample_is_the_generators_sample(service, tiny_generator):
    options = SamplingOptions(steps=4, temperature=0.8, choice_temperature=2.0, class_label=1)
    result = _run(service.sample, 3, 11, options)
    expected = tiny_generator.sample(3, steps=4, seed=11, class_labels=1, temperature=0.8, choice_temperature=2.0,
                                     output_type="np")
    assert result.seed == 11 and result.seconds > 0
    assert np.array_equal(result.images, expected)


def test_unset_options_take_the_stored_defaults(service, tiny_generator):
    defaults = service.info().defaults
    explicit = SamplingOptions(defaults.steps, defaults.temperature, defaults.choice_temperature)
    unset = _run(service.sample, 2, 5, SamplingOptions())
    assert np.array_equal(unset.images, _run(service.sample, 2, 5, explicit).images)


def test_edit_is_the_generators_edit(service, tiny_generator):
    image = tiny_generator.sample(1, seed=3, output_type="np")[0]
    mask = np.zeros((64, 64), bool)
    mask[20:40, 10:30] = True
    result = _run(service.edit, image, mask, 2, 9, SamplingOptions(steps=4), paste_original=True)
    expected = tiny_generator.edit([image] * 2, [mask] * 2, steps=4, seed=9, paste_original=True, output_type="np")
    assert np.array_equal(result.images, expected)


@pytest.mark.parametrize("shape, mask_shape, painted, message", [
    ((64, 64, 3), (64, 64), False, "the mask is empty: paint the region to regenerate first"),
    ((32, 32, 3), (32, 32), True, "the image is 32x32 pixels; the model takes 64x64"),
    ((64, 64, 3), (32, 64), True, "the mask is 64x32 pixels but the image is 64x64"),
])
def test_edit_refuses_bad_input_in_one_line(service, shape, mask_shape, painted, message):
    mask = np.full(mask_shape, painted)
    with pytest.raises(ValueError, match=f"^{message}$"):
        _run(service.edit, np.zeros(shape, np.uint8), mask, 1, 0, SamplingOptions(), paste_original=True)


@pytest.mark.parametrize("n", [0, MAX_IMAGES + 1, 2.5])
def test_sample_refuses_counts_outside_the_page_limit(service, n):
    limit = service.info().max_images  # the served page keeps to the HTTP API's request limit
    assert limit == (MAX_IMAGES if isinstance(service, LocalService) else 16)
    with pytest.raises(ValueError, match=f"between 1 and {limit}|in \\[1, {limit}\\]"):
        _run(service.sample, n, 0, SamplingOptions())


def test_reconstruct_gives_the_tokens_and_their_decoding(service, tiny_generator):
    image = tiny_generator.sample(1, seed=4, output_type="np")[0]
    result = _run(service.reconstruct, image)
    assert np.array_equal(result.tokens, tiny_generator.encode(image)[0])
    assert np.array_equal(result.image, tiny_generator.reconstruct(image, output_type="np")[0])
