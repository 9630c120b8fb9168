"""Bulk generation on Ray Data: image i is sample(seed, i) whatever the workers; a killed run continues and gives
the same images; a rerun with other parameters is refused."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("ray", reason="the serve extra is not installed (pip install -e .[serve])")
from movq_deploy.backends.onnxruntime import physical_cores  # noqa: E402
from movq_deploy.serving.bulk import BulkConfig, ShardWriter, generate  # noqa: E402

LABELS = [0, "blue", 1]


def _read_all(out: Path, count: int) -> np.ndarray:
    rows = list(csv.DictReader((out / "index.csv").open()))
    assert [int(row["image"]) for row in rows] == list(range(count))
    return np.stack([np.asarray(Image.open(out / row["file"])) for row in rows])


def _expected(generator, count: int, seed: int, steps: int) -> np.ndarray:
    labels = [LABELS[i % len(LABELS)] for i in range(count)]
    return generator.sample(n=count, seed=seed, steps=steps, class_labels=labels, output_type="np")


def test_images_equal_generator_sample_with_two_workers(tiny_engines, tiny_generator, ray_address, tmp_path):
    config = BulkConfig(str(tiny_engines.engine_dir), str(tmp_path / "out"), num_images=7, seed=4, steps=3,
                        class_labels=LABELS, shard_size=3, backend="onnxruntime-cpu")
    seen = []
    generate(config, workers=2, progress=lambda done, total: seen.append((done, total)))
    assert sorted(p.name for p in (tmp_path / "out").glob("shard-*")) == ["shard-00000", "shard-00001", "shard-00002"]
    assert np.array_equal(_read_all(tmp_path / "out", 7), _expected(tiny_generator, 7, seed=4, steps=3))
    assert seen[-1] == (3, 3)
    rows = list(csv.DictReader((tmp_path / "out" / "index.csv").open()))
    assert [row["class_label"] for row in rows[:4]] == ["0", "blue", "1", "0"]


def test_a_killed_run_continues_to_the_same_images(tiny_engines, tiny_generator, ray_address, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "movq_deploy.cli", "generate", "--engine-dir", str(tiny_engines.engine_dir),
               "--backend", "onnxruntime-cpu", "--num-images", "24", "--seed", "8", "--steps", "6", "--shard-size",
               "2", "--class-labels", *map(str, LABELS), "--out", str(out), "--workers", "1",
               "--address", ray_address]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "shard-00000").is_dir():  # killed as soon as its first shard is complete
            assert run.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
            time.sleep(0.01)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait(30)
    complete = sorted(p.name for p in out.glob("shard-*"))
    assert 1 <= len(complete) < 12 and not (out / "index.csv").exists(), complete
    first_written = (out / "shard-00000").stat().st_mtime_ns

    config = BulkConfig(str(tiny_engines.engine_dir), str(out), num_images=24, seed=8, steps=6, class_labels=LABELS,
                        shard_size=2, backend="onnxruntime-cpu")
    generate(config, workers=2)
    assert (out / "shard-00000").stat().st_mtime_ns == first_written  # complete shards are skipped
    assert not list(out.glob(".shard-*"))  # half-written shards are gone
    assert np.array_equal(_read_all(out, 24), _expected(tiny_generator, 24, seed=8, steps=6))


def test_a_rerun_with_other_parameters_is_refused(tiny_engines, tmp_path):
    config = BulkConfig(str(tiny_engines.engine_dir), str(tmp_path), num_images=4, seed=1, shard_size=2)
    (tmp_path / "generation.json").write_text('{"seed": 2}')
    with pytest.raises(ValueError, match="other parameters"):
        generate(config)
    with pytest.raises(ValueError, match="unknown class name 'purple'"):
        generate(BulkConfig(str(tiny_engines.engine_dir), str(tmp_path / "b"), 4, 1, class_labels=["purple"]))


def test_a_worker_runs_the_onnxruntime_threads_it_is_given(tiny_engines, tmp_path):
    threads = physical_cores() + 1  # not the default, so that the test sees it passed through
    config = BulkConfig(str(tiny_engines.engine_dir), str(tmp_path / "out"), num_images=1, seed=0,
                        backend="onnxruntime-cpu")
    writer = ShardWriter(asdict(config), threads=threads)
    for runner in writer.generator.backend.runners.values():
        assert runner.session.get_session_options().intra_op_num_threads == threads
