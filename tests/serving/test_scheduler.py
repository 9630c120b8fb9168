"""The continuous-batching scheduler on ONNX Runtime CPU fp32: served images equal Generator.sample / edit bit for bit,
whatever shared their batches and whenever they arrived; bounded queue, FIFO, errors that do not stop the loop."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from movq_deploy.serving import Overloaded, Scheduler, SchedulerConfig

TIMEOUT = 120  # seconds: a bound for a busy shared machine, never reached when things work


def _wait_until(condition, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting for the engine loop"
        time.sleep(0.002)


# Mixed sizes, step counts, temperatures, confidence-noise temperatures, class labels (the tiny model has 3) and
# classifier-free guidance (guided and unguided rows share steps).
REQUESTS = [
    dict(n=3, steps=4, seed=1, class_labels=0, guidance_scale=3.0),
    dict(n=1, steps=2, seed=2, class_labels=None, temperature=0.7),
    dict(n=4, steps=6, seed=3, class_labels=[2, 1, None, 0], choice_temperature=2.0,
         temperature=[0.7, 1.3, 1.0, 0.9], guidance_scale=[0.0, 2.0, 1.0, 0.0]),  # one per image
    dict(n=2, steps=3, seed=4, class_labels="green", temperature=1.3, guidance_scale=1.5),
    dict(n=1, steps=1, seed=5, class_labels=1),
    dict(n=5, steps=5, seed=6, class_labels=None, temperature=0.7, choice_temperature=0.0),
]


def test_interleaved_requests_equal_generator_sample_bit_for_bit(tiny_generator):
    expected = [tiny_generator.sample(output_type="np", **kwargs) for kwargs in REQUESTS]
    # capacity 5 < the 16 images: images wait for freed slots, join batches mid-way, and decode in mixed batches.
    config = SchedulerConfig(capacity=5, decode_batch=3, max_decode_wait_steps=1)
    with Scheduler(tiny_generator, config) as scheduler:
        jobs = []
        for i, kwargs in enumerate(REQUESTS):
            if i % 2 == 1:  # arrive while earlier images are mid-way through their steps
                calls = scheduler.stats()["prior_calls"]
                _wait_until(lambda: scheduler.stats()["prior_calls"] >= calls + 1)
            jobs.append(scheduler.submit_sample(**kwargs))
        results = [job.future.result(TIMEOUT) for job in jobs]
        stats = scheduler.stats()
    for kwargs, got, want in zip(REQUESTS, results, expected):
        assert got.dtype == np.uint8 and got.shape == want.shape, kwargs
        assert np.array_equal(got, want), f"served images differ from Generator.sample for {kwargs}"
    assert stats["images"] == sum(r["n"] for r in REQUESTS)
    # Shared calls: far fewer prior calls than the requests' steps summed one request at a time.
    assert stats["prior_calls"] < sum(r["steps"] for r in REQUESTS)
    assert stats["queued_images"] == stats["active_images"] == stats["decoding_images"] == 0


def test_concurrent_submitters_get_their_own_images(tiny_generator):
    seeds = list(range(10, 16))
    expected = {seed: tiny_generator.sample(n=2, steps=3, seed=seed, output_type="np") for seed in seeds}
    results, errors = {}, []

    with Scheduler(tiny_generator, SchedulerConfig(capacity=4)) as scheduler:
        def client(seed):
            try:
                results[seed] = scheduler.submit_sample(n=2, steps=3, seed=seed).future.result(TIMEOUT)
            except Exception as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=client, args=(seed,)) for seed in seeds]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
    assert not errors
    for seed in seeds:
        assert np.array_equal(results[seed], expected[seed])


def test_edit_equals_generator_edit(tiny_generator):
    size = tiny_generator.image_size
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
    masks = np.zeros((3, size, size), dtype=bool)
    masks[0, : size // 2] = True  # top half
    masks[1] = True  # everything: equals sample
    # masks[2]: nothing masked, the reconstruction
    kwargs = dict(steps=4, seed=9, class_labels=[0, None, 2])
    want = tiny_generator.edit(images, masks, output_type="np", **kwargs)
    pasted = tiny_generator.edit(images, masks, output_type="np", paste_original=True, feather=1, **kwargs)
    with Scheduler(tiny_generator, SchedulerConfig(capacity=2, decode_batch=2)) as scheduler:
        other = scheduler.submit_sample(n=3, steps=5, seed=1)  # shares the batches
        job = scheduler.submit_edit(images, masks, **kwargs)
        job_pasted = scheduler.submit_edit(images, masks, paste_original=True, feather=1, **kwargs)
        got, got_pasted = job.future.result(TIMEOUT), job_pasted.future.result(TIMEOUT)
        other.future.result(TIMEOUT)
    assert np.array_equal(got, want)
    assert np.array_equal(got_pasted, pasted)


def test_full_queue_refuses_at_once_then_serves(tiny_generator):
    scheduler = Scheduler(tiny_generator, SchedulerConfig(capacity=2, max_queued_images=4, max_request_images=3))
    first = scheduler.submit_sample(n=3, steps=1, seed=0)
    started = time.perf_counter()
    with pytest.raises(Overloaded, match="overloaded"):
        scheduler.submit_sample(n=2, steps=1, seed=1)  # 3 + 2 > 4 queued images
    assert time.perf_counter() - started < 1.0  # refused at once, not after waiting
    second = scheduler.submit_sample(n=1, steps=1, seed=1)  # 4 fits
    assert scheduler.stats()["refused"] == 1
    with scheduler:
        first.future.result(TIMEOUT), second.future.result(TIMEOUT)
        assert scheduler.stats()["queued_images"] == 0
        scheduler.submit_sample(n=3, steps=1, seed=2).future.result(TIMEOUT)  # room again


def test_requests_are_served_first_in_first_out(tiny_generator):
    scheduler = Scheduler(tiny_generator, SchedulerConfig(capacity=1, decode_batch=1))
    order = []
    jobs = [scheduler.submit_sample(n=1, steps=2, seed=i) for i in range(4)]
    for i, job in enumerate(jobs):
        job.future.add_done_callback(lambda _, i=i: order.append(i))
    with scheduler:
        for job in jobs:
            job.future.result(TIMEOUT)
    assert order == [0, 1, 2, 3]


def test_bad_requests_are_refused_with_a_clear_error(tiny_generator):
    scheduler = Scheduler(tiny_generator, SchedulerConfig(max_request_images=8, max_queued_images=8))
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 8\]"):
        scheduler.submit_sample(n=0)
    with pytest.raises(ValueError, match=r"n must be an int in \[1, 8\]"):
        scheduler.submit_sample(n=9)
    with pytest.raises(ValueError, match="unknown class name"):
        scheduler.submit_sample(n=1, class_labels="purple")
    with pytest.raises(ValueError, match="temperature"):
        scheduler.submit_sample(n=1, temperature=0.0)
    with pytest.raises(ValueError, match="pixels"):
        scheduler.submit_edit(np.zeros((1, 8, 8, 3), np.uint8), np.ones((1, 8, 8), bool))
    assert scheduler.stats()["queued_images"] == 0


def test_cancelled_and_failed_requests_do_not_stop_the_loop(tiny_generator, monkeypatch):
    scheduler = Scheduler(tiny_generator, SchedulerConfig(capacity=2))
    cancelled = scheduler.submit_sample(n=2, steps=2, seed=0)
    assert cancelled.future.cancel()
    runner = tiny_generator.backend.runners["prior"]
    real_run = runner.run
    calls = {"n": 0}

    def failing_once(feeds):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("device lost")
        return real_run(feeds)

    monkeypatch.setattr(runner, "run", failing_once)
    failed = scheduler.submit_sample(n=1, steps=2, seed=1)
    with scheduler:
        with pytest.raises(RuntimeError, match="inference failed: device lost"):
            failed.future.result(TIMEOUT)
        served = scheduler.submit_sample(n=1, steps=2, seed=2).future.result(TIMEOUT)
    assert np.array_equal(served, tiny_generator.sample(n=1, steps=2, seed=2, output_type="np"))


def test_close_fails_what_is_left(tiny_generator):
    scheduler = Scheduler(tiny_generator)
    job = scheduler.submit_sample(n=1, steps=2, seed=0)
    scheduler.close()
    with pytest.raises(RuntimeError, match="stopped"):
        job.future.result(1)
    with pytest.raises(RuntimeError, match="stopped"):
        scheduler.submit_sample(n=1)
