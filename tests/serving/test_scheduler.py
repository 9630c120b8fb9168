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
    assert scheduler.stats()["refused_overload"] == 1
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


def _held_engine(generator, monkeypatch):
    """The prior runner blocks until the returned event is set: the engine is busy meanwhile."""
    runner = generator.backend.runners["prior"]
    real_run, release = runner.run, threading.Event()

    def held_run(feeds):
        release.wait(TIMEOUT)
        return real_run(feeds)

    monkeypatch.setattr(runner, "run", held_run)
    return release


def test_admission_by_deadline_refuses_at_once_with_the_estimated_retry_delay(tiny_generator):
    scheduler = Scheduler(tiny_generator, SchedulerConfig(capacity=2, max_queued_images=64, max_request_images=8,
                                                          max_queue_wait_s=2.0))
    # Measured costs, as the loop averages them: 1 s per prior step of 2 images, nothing for decoding; so an image of
    # 2 steps holds its slot for 2 s, and with 2 slots one image leaves a slot every 1 s.
    scheduler.costs.record_step(rows=2, seconds=1.0)
    scheduler.costs.record_decode(images=1, seconds=0.0)
    for _ in range(4):  # waits 0, 0, 1 and 2 s for their slots: within 2 s
        scheduler.submit_sample(n=1, steps=2)
    assert scheduler.estimated_wait(1) == pytest.approx(3.0)
    started = time.perf_counter()
    with pytest.raises(Overloaded, match="estimated wait of 3.0 s exceeds the server's limit of 2 s") as refused:
        scheduler.submit_sample(n=1, steps=2)
    assert time.perf_counter() - started < 1.0
    assert refused.value.reason == "deadline" and refused.value.retry_after_s == pytest.approx(1.0)
    with pytest.raises(Overloaded) as refused:  # its last image would wait 4 + 4 - 2 = 6 s: retry in 4 s
        scheduler.submit_sample(n=4, steps=2)
    assert refused.value.retry_after_s == pytest.approx(4.0)
    # A request's own timeout counts too: no wait, but 2 steps of 1 s do not fit in 1.5 s.
    idle = Scheduler(tiny_generator, SchedulerConfig(capacity=2))
    idle.costs.record_step(rows=2, seconds=1.0)
    with pytest.raises(Overloaded, match="exceed this request's timeout of 1.5 s"):
        idle.submit_sample(n=2, steps=2, timeout_s=1.5)
    idle.submit_sample(n=2, steps=2, timeout_s=5.0)
    stats = scheduler.stats()
    assert stats["refused_deadline"] == 2 and stats["requests"] == 4 and stats["queued_images"] == 4


def test_the_deadline_is_measured_on_the_running_engine(tiny_generator, monkeypatch):
    runner = tiny_generator.backend.runners["prior"]
    real_run = runner.run

    def slow_run(feeds):  # a slow engine: 20 ms per prior call
        time.sleep(0.02)
        return real_run(feeds)

    monkeypatch.setattr(runner, "run", slow_run)
    with Scheduler(tiny_generator, SchedulerConfig(capacity=2, max_queued_images=256, max_queue_wait_s=0.5)) as s:
        s.submit_sample(n=2, steps=4).future.result(TIMEOUT)  # measures the costs
        assert s.stats()["full_step_seconds"] >= 0.02
        jobs, refused = [], 0
        for _ in range(100):  # 100 images of 4 steps at about 20 ms per call of 2: far beyond 0.5 s of queue
            try:
                jobs.append(s.submit_sample(n=1, steps=4))
            except Overloaded as error:
                assert error.reason == "deadline"
                refused += 1
        assert refused > 0 and len(jobs) < 100
        for job in jobs:
            job.future.result(TIMEOUT)
        # What was admitted waited for its slot about as long as the estimate allowed (generous for a busy machine).
        assert max(job.started_at - job.submitted_at for job in jobs) < 0.5 * 4


def test_a_request_whose_timeout_passed_uses_no_engine_call(tiny_generator, monkeypatch):
    release = _held_engine(tiny_generator, monkeypatch)
    with Scheduler(tiny_generator, SchedulerConfig(capacity=1, decode_batch=1)) as scheduler:
        first = scheduler.submit_sample(n=1, steps=2, seed=0)
        _wait_until(lambda: scheduler.stats()["active_images"] == 1)  # in the (held) engine
        late = scheduler.submit_sample(n=1, steps=2, seed=1, timeout_s=0.05)
        gone = scheduler.submit_sample(n=1, steps=2, seed=2)
        assert gone.future.cancel()  # its client disconnected
        time.sleep(0.1)
        release.set()
        first.future.result(TIMEOUT)
        with pytest.raises(TimeoutError, match="timeout passed"):
            late.future.result(TIMEOUT)
        stats = scheduler.stats()
    assert stats["prior_rows"] == 2  # the first request's two steps only
    assert stats["expired"] == 1 and stats["queued_images"] == 0


def test_the_step_cost_is_kept_per_batch_size_and_interpolated():
    from movq_deploy.serving.scheduler import SMOOTHING, EngineCosts

    costs = EngineCosts()
    assert costs.step_seconds(64) == 0.0 and costs.seconds_per_image(8, 64) == 0.0  # nothing measured: no refusal
    costs.record_step(rows=1, seconds=0.001)
    assert costs.step_seconds(64) == 0.001  # beyond what was measured: the largest size's cost (errs to admit)
    costs.record_step(rows=64, seconds=0.020)
    assert costs.step_seconds(1) == 0.001 and costs.step_seconds(64) == 0.020
    assert costs.step_seconds(32) == pytest.approx(0.001 + 0.019 * 31 / 63)  # between: linear
    costs.record_step(rows=64, seconds=0.030)  # averaged: the newest call weighs SMOOTHING
    assert costs.step_seconds(64) == pytest.approx(0.020 + SMOOTHING * 0.010)
    assert costs.step_seconds(1) == 0.001  # other sizes keep theirs
    costs.record_decode(images=16, seconds=0.032)
    assert costs.seconds_per_image(steps=8, capacity=64) == pytest.approx(8 * costs.step_seconds(64) / 64 + 0.002)


def test_the_early_refusal_holds_while_the_queue_drains(tiny_generator, monkeypatch):
    """Past its deadline the queue refuses every new request for at least a tenth of max_queue_wait_s, even when its
    estimate falls back under the limit at once; then it admits again."""
    from movq_deploy.serving import scheduler as scheduler_module

    clock = [100.0]
    monkeypatch.setattr(scheduler_module.time, "monotonic", lambda: clock[0])
    scheduler = Scheduler(tiny_generator, SchedulerConfig(capacity=2, max_queued_images=64, max_request_images=8,
                                                          max_queue_wait_s=2.0))
    scheduler.costs.record_step(rows=2, seconds=1.0)
    scheduler.costs.record_decode(images=1, seconds=0.0)
    for _ in range(3):  # waits 0, 0 and 1 s: the next image would wait 2.0 s, just at the limit
        scheduler.submit_sample(n=1, steps=2)
    assert scheduler.refusal() is None
    scheduler.submit_sample(n=1, steps=2)  # now 3.0 s for the next: refused, for 1 s by the estimate
    refused = scheduler.refusal()
    assert refused is not None and refused.retry_after_s == pytest.approx(1.0)
    for _ in range(50):  # the averaged estimate drops far under the limit ...
        scheduler.costs.record_step(rows=2, seconds=0.01)
    clock[0] += 0.5
    held = scheduler.refusal()  # ... but the refusal holds for the rest of its window
    assert held is not None and held.retry_after_s == pytest.approx(0.5) and "draining" in str(held)
    clock[0] += 0.6
    assert scheduler.refusal() is None
    # At the limit by a hair, the window is a tenth of max_queue_wait_s, not the hair
    just_over = Scheduler(tiny_generator, SchedulerConfig(capacity=2, max_queued_images=64, max_request_images=8,
                                                          max_queue_wait_s=2.0))
    just_over.costs.record_step(rows=2, seconds=1.0)
    just_over.costs.record_decode(images=1, seconds=0.0)
    for _ in range(3):
        just_over.submit_sample(n=1, steps=2)
    just_over.costs.record_step(rows=2, seconds=1.01)  # the next image would wait a little over 2 s
    assert just_over.refusal().retry_after_s == pytest.approx(0.2)
