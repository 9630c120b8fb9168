"""Graphs opened by their first call: the CPU's encoder and guided prior (movq_deploy.backends.deferred)."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from movq_deploy.backends.deferred import DeferredRunner
from movq_deploy.generator import Generator

DEFERRED = ["encoder", "prior_guided"]


def _deferred(generator):
    return {name: runner.opened for name, runner in generator.backend.runners.items()
            if isinstance(runner, DeferredRunner)}


@pytest.mark.parametrize("backend", ["onnxruntime-cpu", "openvino"])
def test_a_plain_sample_opens_neither_the_encoder_nor_the_guided_prior(tiny_engines, backend):
    if backend == "openvino":
        pytest.importorskip("openvino", reason="the openvino extra is not installed")
    generator = Generator(tiny_engines.engine_dir, backend=backend)
    assert _deferred(generator) == {"encoder": False, "prior_guided": False}
    plain = generator.sample(n=3, steps=2, seed=5, output_type="np")
    assert _deferred(generator) == {"encoder": False, "prior_guided": False}

    guided = generator.sample(n=3, steps=2, seed=5, guidance_scale=2.0, class_labels=1, output_type="np")
    assert _deferred(generator) == {"encoder": False, "prior_guided": True}
    generator.encode(plain)
    assert _deferred(generator) == {"encoder": True, "prior_guided": True}

    warmed = Generator(tiny_engines.engine_dir, backend=backend).warm_up()
    assert _deferred(warmed) == {"encoder": True, "prior_guided": True}
    assert np.array_equal(warmed.sample(n=3, steps=2, seed=5, output_type="np"), plain)
    assert np.array_equal(warmed.sample(n=3, steps=2, seed=5, guidance_scale=2.0, class_labels=1,
                                        output_type="np"), guided)
    assert np.array_equal(warmed.encode(plain), generator.encode(plain))


def test_an_altered_deferred_graph_is_refused_when_the_generator_opens(tiny_engines, tmp_path):
    engine_dir = tmp_path / "engines"
    shutil.copytree(tiny_engines.engine_dir, engine_dir)
    with open(engine_dir / "prior_guided.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError) as excinfo:
        Generator(engine_dir, backend="onnxruntime-cpu")
    message = str(excinfo.value)
    assert "\n" not in message and "prior_guided.onnx" in message and "sha256" in message


def test_a_deferred_graph_against_the_contract_fails_its_first_call_in_one_line(tiny_engines, tmp_path):
    """The contract check runs when the graph opens: here the guided prior of an unconditional export stands in for
    the conditional one (same file hash in the manifest, other inputs)."""
    engine_dir = tmp_path / "engines"
    shutil.copytree(tiny_engines.engine_dir, engine_dir)
    manifest = json.loads((engine_dir / "manifest.json").read_text())
    prior = manifest["graphs"]["fp32"]["prior"]
    manifest["graphs"]["fp32"]["prior_guided"] = dict(prior)  # the plain prior's file: no guidance_scale input
    (engine_dir / "manifest.json").write_text(json.dumps(manifest))
    generator = Generator(engine_dir, backend="onnxruntime-cpu")
    generator.sample(n=1, steps=1, seed=0, output_type="tokens")  # unguided: the guided graph stays closed
    with pytest.raises(ValueError) as excinfo:
        generator.sample(n=1, steps=1, seed=0, guidance_scale=1.0, class_labels=0, output_type="tokens")
    message = str(excinfo.value)
    assert "\n" not in message and "guidance_scale" in message
    assert not generator.backend.runners["prior_guided"].opened


def test_the_runner_opens_once_whatever_the_threads():
    opened, started = [], threading.Barrier(8)

    class Runner:
        inputs = outputs = []

        def run(self, feeds):
            return {"rows": len(opened)}

        def close(self):
            opened.append("closed")

    def open_runner():
        opened.append("opened")
        return Runner()

    deferred = DeferredRunner("graph", open_runner)
    results = []

    def call():
        started.wait()
        results.append(deferred.run({})["rows"])

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert opened == ["opened"] and results == [1] * 8
    deferred.close()
    assert opened == ["opened", "closed"]
    with pytest.raises(RuntimeError, match="closed"):
        deferred.run({})


def test_a_serving_replica_opens_every_graph_before_its_first_request(tiny_engines):
    from movq_deploy.serving.service import ImageService, ServiceConfig

    service = ImageService(ServiceConfig(str(tiny_engines.engine_dir), backend="onnxruntime-cpu", batching="none"))
    assert _deferred(service.generator) == {"encoder": True, "prior_guided": True}
