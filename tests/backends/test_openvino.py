"""The OpenVINO runners on this CPU: contract I/O, parity with ONNX Runtime, the fp32 ends of bf16, rows independent
of their batchmates in every precision, concurrent calls, the model cache, the closed runner."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from movq_deploy import contract
from movq_deploy.backends import cpu_features
from movq_deploy.backends.onnxruntime import OnnxRuntimeRunner
from movq_deploy.manifest import EngineDir

ov = pytest.importorskip("openvino", reason="openvino is not installed (pip install 'movq-deploy[openvino]')")
from movq_deploy.backends import openvino as ov_backend  # noqa: E402

needs_bf16 = pytest.mark.skipif(not cpu_features.native_bf16(),
                                reason=f"this CPU has no native bf16 ({cpu_features.describe()})")
needs_int8 = pytest.mark.skipif(not cpu_features.native_int8(),
                                reason=f"this CPU has no int8 dot products ({cpu_features.describe()})")


@pytest.fixture(scope="module")
def engine_dir(tiny_engines) -> EngineDir:
    return EngineDir.load(tiny_engines.engine_dir)


def _graph_path(engine_dir: EngineDir, precision: str, graph: str):
    files = "int8-openvino" if precision == "int8" else "fp32"
    return engine_dir.verify(engine_dir.graph(files, graph))


def _runner(engine_dir, graph, precision, **kwargs):
    return ov_backend.OpenVinoRunner(_graph_path(engine_dir, precision, graph), graph, precision, **kwargs)


def _feeds(engine_dir: EngineDir, graph: str, batch: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    size, grid = engine_dir.image_size, engine_dir.grid.shape
    if graph == "encoder":
        return {"image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)}
    if graph == "decoder":
        return {"indices": rng.integers(0, engine_dir.codebook_size, (batch, *grid), dtype=np.int32)}
    slots = engine_dir.grid.num_slots
    tokens = np.where(rng.random((batch, slots)) < 0.6, engine_dir.mask_id,
                      rng.integers(0, engine_dir.codebook_size, (batch, slots)))
    feeds = contract.prior_step_feeds(tokens, rng.integers(0, engine_dir.num_classes + 1, batch),
                                      rng.random((batch, slots), dtype=np.float32), rng.gumbel(size=(batch, slots)),
                                      rng.uniform(0.5, 1.5, batch), rng.uniform(0.0, 4.0, batch))
    if graph == contract.GUIDED_PRIOR:
        feeds["guidance_scale"] = rng.uniform(0.0, 3.0, batch).astype(np.float32)
    return feeds


PRECISIONS = [pytest.param("fp32"), pytest.param("bf16", marks=needs_bf16),
              pytest.param("int8", marks=[needs_int8, needs_bf16])]
GRAPHS = ["encoder", "decoder", "prior", "prior_guided"]


@pytest.mark.parametrize("graph", GRAPHS)
def test_specs_are_the_contract(engine_dir, graph):
    runner = _runner(engine_dir, graph, "fp32")
    expected = contract.graph_io(graph, engine_dir.image_size, engine_dir.grid.shape, conditional=True)
    contract.check_runner(runner, expected, "test")  # raises on any difference


@pytest.mark.parametrize("graph", GRAPHS)
def test_fp32_agrees_with_onnxruntime(engine_dir, graph):
    feeds = _feeds(engine_dir, graph, 4)
    reference = OnnxRuntimeRunner(_graph_path(engine_dir, "fp32", graph)).run(feeds)
    outputs = _runner(engine_dir, graph, "fp32").run(feeds)
    if graph == "decoder":
        assert np.abs(outputs["image"].astype(int) - reference["image"]).max() <= 1
    elif graph == "encoder":
        assert (outputs["indices"] == reference["indices"]).mean() >= 0.99
    else:
        masked = feeds["tokens"] == engine_dir.mask_id
        assert (outputs["sampled"] == reference["sampled"]).mean() >= 0.99
        np.testing.assert_allclose(outputs["confidence"][masked], reference["confidence"][masked], atol=1e-4)
        assert np.isposinf(outputs["confidence"][~masked]).all()


@needs_bf16
def test_bf16_keeps_the_fp32_ends_in_fp32_parts(engine_dir):
    """The prior's logits projection and sampling head, the encoder's last two convolutions and nearest-code
    search, the decoder's Fourier phase and last convolution run in compiled parts of their own, in f32."""
    assert _runner(engine_dir, "prior", "bf16").part_precisions == ["bf16", "f32"]
    assert _runner(engine_dir, "encoder", "bf16").part_precisions == ["bf16", "f32"]
    fourier = engine_dir.model["tokenizer"].get("f0") == "fourier"
    decoder = ["f32", "bf16", "f32"] if fourier else ["bf16", "f32"]
    assert _runner(engine_dir, "decoder", "bf16").part_precisions == decoder
    core = ov_backend.shared_core()
    for graph, prefix_types, suffix_counts in (("prior", set(), {"MatMul": 1}),
                                               ("encoder", set(), {"Convolution": 2})):
        model = ov_backend.fold_constants(core.read_model(str(_graph_path(engine_dir, "fp32", graph))))
        prefix, suffix = ov_backend.fp32_ends(model, graph)
        types = [op.get_type_name() for op in model.get_ordered_ops() if op.get_friendly_name() in suffix]
        assert not prefix
        for op_type, count in suffix_counts.items():
            assert types.count(op_type) == count
        if graph == "prior":
            assert {"Softmax", "LogSoftmax", "CumSum"} & set(types)  # the sampling head is in the f32 part


@pytest.mark.parametrize("precision", PRECISIONS)
def test_rows_do_not_depend_on_their_batchmates(engine_dir, precision):
    """Every graph of the precision (int8: the graphs the export quantized for OpenVINO), row by row: alone equals
    inside a batch of 5, bit for bit."""
    graphs = list(engine_dir.graphs["int8-openvino"]) if precision == "int8" else GRAPHS
    assert graphs
    for graph in graphs:
        runner = _runner(engine_dir, graph, precision)
        feeds = _feeds(engine_dir, graph, 5, seed=3)
        together = runner.run(feeds)
        for row in (0, 4):
            alone = runner.run({name: value[row:row + 1] for name, value in feeds.items()})
            for name, value in together.items():
                np.testing.assert_array_equal(alone[name][0], value[row], err_msg=f"{graph} {precision} {name}")


@needs_bf16
def test_concurrent_calls_agree(engine_dir):
    runner = _runner(engine_dir, "prior", "bf16")
    feeds = [_feeds(engine_dir, "prior", 3, seed=seed) for seed in range(6)]
    expected = [runner.run(f)["sampled"] for f in feeds]
    results = [None] * len(feeds)

    def work(i):
        for _ in range(3):
            results[i] = runner.run(feeds[i])["sampled"]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(feeds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for got, want in zip(results, expected):
        np.testing.assert_array_equal(got, want)


def test_the_model_cache_is_filled_once_and_reused(engine_dir, tmp_path):
    cache = tmp_path / "cache"
    first = _runner(engine_dir, "decoder", "fp32", cache_dir=cache)
    blobs = sorted(path.name for path in cache.iterdir())
    assert blobs  # OpenVINO wrote its compiled model
    second = _runner(engine_dir, "decoder", "fp32", cache_dir=cache)
    assert sorted(path.name for path in cache.iterdir()) == blobs  # the same blob served the second start
    feeds = _feeds(engine_dir, "decoder", 2)
    np.testing.assert_array_equal(first.run(feeds)["image"], second.run(feeds)["image"])


def test_default_cache_lies_beside_the_engine_dir(tmp_path):
    assert ov_backend.default_cache_dir(tmp_path / "engines") == tmp_path / "engines.openvino-cache"


def test_a_closed_runner_refuses_to_run(engine_dir):
    runner = _runner(engine_dir, "encoder", "fp32")
    runner.close()
    with pytest.raises(RuntimeError, match="closed"):
        runner.run(_feeds(engine_dir, "encoder", 1))


def test_bad_precision_is_one_line(engine_dir):
    with pytest.raises(ValueError, match="OpenVINO precision must be one of fp32, bf16, int8"):
        _runner(engine_dir, "encoder", "fp16")


def test_runners_dropped_in_any_order_leave_signals_safe(engine_dir, tmp_path):
    """Runners made and dropped in the same order, then a child process whose exit Python handles (SIGCHLD, as a
    DataLoader's workers): the process survives. With a Core per runner, each CPU plugin put back the alternate
    signal stack it found, the first one dropped left the second's unmapped stack in place, and the signal
    crashed the process (SIGSEGV; it took pytest down in CI). Run in a child process, so a crash fails this test."""
    import subprocess
    import sys

    script = tmp_path / "drop_then_signal.py"
    script.write_text(f"""
import signal, subprocess, sys
from movq_deploy.backends.openvino import OpenVinoRunner
first = OpenVinoRunner({str(_graph_path(engine_dir, "fp32", "decoder"))!r}, "decoder", "fp32")
second = OpenVinoRunner({str(_graph_path(engine_dir, "fp32", "encoder"))!r}, "encoder", "fp32")
del first
del second
signal.signal(signal.SIGCHLD, lambda *_: None)
subprocess.run([sys.executable, "-c", "pass"], check=True)
print("survived")
""")
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "survived" in result.stdout, (result.returncode, result.stderr[-2000:])
