"""The operators' page's charts: fixed-size rings of requests/s, errors, tokens/s, time to first token and queue
depth per model and overall (service/operations/history.py), on a clock the test moves."""
import threading

import pytest

from service.operations.history import ALL, TTFT_SAMPLE, WINDOWS, History, Ring
from tests.fakes import Clock

HOUR_STEP, HOUR_SIZE = WINDOWS["hour"]
DAY_STEP, DAY_SIZE = WINDOWS["day"]


def entry(model="chat", status=200, completion=5, ttft=None, **fields):
    shown = {"model": model, "status": status, "completion_tokens": completion, "prompt_tokens": 100, **fields}
    if ttft is not None:
        shown["ttft_ms"] = ttft
    return shown


def history(clock, models=("chat",), depths=None):
    return History(models=lambda: list(models), depths=lambda: dict(depths or {}), clock=clock, sample_s=None)


def test_requests_errors_and_tokens_land_in_the_bucket_of_their_end_per_model_and_overall():
    clock = Clock()
    kept = history(clock)
    kept.record(entry())
    kept.record(entry(status=503, completion=0))
    kept.record(entry(error="upstream_bad_response"))  # a stream that broke after its 200 is an error too
    kept.record(entry(model="made-up"))  # no such route: counted overall only
    shown = kept.series("hour")
    assert set(shown["series"]) == {ALL, "chat"} and shown["step_s"] == HOUR_STEP
    overall, chat = shown["series"][ALL], shown["series"]["chat"]
    assert (overall["requests_per_s"][-1], overall["errors"][-1]) == (4 / HOUR_STEP, 2)
    assert (chat["requests_per_s"][-1], chat["errors"][-1]) == (3 / HOUR_STEP, 2)
    assert chat["tokens_per_s"][-1] == 10 / HOUR_STEP  # tokens generated; prompt tokens are no throughput
    assert overall["requests_per_s"][:-1] == [0.0] * (HOUR_SIZE - 1)


def test_a_window_is_fixed_size_slides_with_the_clock_and_forgets_what_left_it():
    clock = Clock()
    kept = history(clock)
    kept.record(entry())
    first = kept.series("hour")
    series = first["series"]["chat"]
    assert len(series["t"]) == HOUR_SIZE and first["start"] == series["t"][0]
    assert all(later - earlier == HOUR_STEP for earlier, later in zip(series["t"], series["t"][1:]))
    assert series["t"][-1] <= clock.now < series["t"][-1] + HOUR_STEP
    clock.now += 3 * HOUR_STEP
    moved = kept.series("hour")["series"]["chat"]
    assert moved["requests_per_s"][-4] == 1 / HOUR_STEP and moved["requests_per_s"][-3:] == [0.0] * 3
    clock.now += HOUR_STEP * HOUR_SIZE  # a whole hour on: its slot is reused, the old count is gone
    kept.record(entry(completion=1))
    later = kept.series("hour")["series"]["chat"]
    assert sum(later["requests_per_s"]) == 1 / HOUR_STEP and later["tokens_per_s"][-1] == 1 / HOUR_STEP
    day = kept.series("day")["series"]["chat"]  # the day still has both, in 5-minute steps
    assert len(day["t"]) == DAY_SIZE and sum(day["requests_per_s"]) * DAY_STEP == pytest.approx(2)


def test_time_to_first_token_percentiles_per_bucket_from_a_bounded_sample():
    clock = Clock()
    kept = history(clock)
    for ttft in range(1, 21):
        kept.record(entry(ttft=float(ttft)))
    kept.record(entry())  # no first token known (not streamed): no sample
    chat = kept.series("hour")["series"]["chat"]
    assert (chat["ttft_p50_ms"][-1], chat["ttft_p95_ms"][-1]) == (10.0, 19.0)
    assert chat["ttft_p50_ms"][-2] is None  # a step without one shows none, not 0
    for _ in range(10 * TTFT_SAMPLE):
        kept.record(entry(ttft=1000.0))
    ring = kept._rings[("hour", "chat")]
    assert len(ring.bucket(clock.now).ttft) == TTFT_SAMPLE
    assert kept.series("hour")["series"]["chat"]["ttft_p50_ms"][-1] == 1000.0  # the sample follows the traffic


def test_queue_depth_is_the_deepest_sampled_in_a_step_and_none_where_never_sampled():
    clock, depths = Clock(), {}
    kept = History(models=lambda: ["chat", "other"], depths=lambda: dict(depths), clock=clock, sample_s=None)
    depths.update(chat=3, other=1, gone=2)
    kept.sample()
    depths.update(chat=1, other=0, gone=0)
    kept.sample()
    clock.now += HOUR_STEP
    depths.update(chat=0)
    series = kept.series("hour")["series"]  # a read samples too: the current step shows the queue as it is
    assert series[ALL]["queue_depth"][-2:] == [6, 0]  # every queue, a model of no route's included
    assert series["chat"]["queue_depth"][-2:] == [3, 0] and series["other"]["queue_depth"][-2] == 1
    assert "gone" not in series and series["chat"]["queue_depth"][0] is None


def test_a_model_a_reload_removed_takes_its_series_with_it():
    clock, models = Clock(), ["chat", "old"]
    kept = History(models=lambda: list(models), clock=clock, sample_s=None)
    kept.record(entry(model="old"))
    assert "old" in kept.series("hour")["series"]
    models.remove("old")
    assert set(kept.series("hour")["series"]) == {ALL, "chat"}
    assert all(name != "old" for _, name in kept._rings)


def test_the_sampler_notes_the_queue_with_no_request_ending_and_stops():
    sampled = threading.Event()

    def depths():
        sampled.set()
        return {"chat": 2}

    kept = History(models=lambda: ["chat"], depths=depths, sample_s=0.01)
    kept.series("hour")  # the first use starts the sampler
    sampled.clear()
    assert sampled.wait(5), "the sampler never sampled"
    assert kept.series("hour")["series"]["chat"]["queue_depth"][-1] == 2
    kept.stop()
    kept._sampler.join(5)
    assert not kept._sampler.is_alive()


def test_a_ring_reuses_its_slots():
    ring = Ring(10.0, 3)
    first = ring.bucket(0.0)
    assert ring.bucket(5.0) is first and ring.bucket(30.0) is not first
    assert len(ring._buckets) == 3
