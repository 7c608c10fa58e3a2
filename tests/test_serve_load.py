"""A bounded load test of `catfast serve` on loopback (benchmarks/serve_load.py runs a larger one): concurrent
clients, random adapters, random cancellations (client timeouts, streams closed early) and bad requests,
a queue small enough to overflow. Every request must be answered or cleanly rejected (no 5xx), the engine
must end idle with no slot held, answer a request afterwards, and its memory must come back near the start."""

import time

import pytest

from catfast.demo.adapters import adapters_dir
from catfast.serve.loadtest import run_fairness, run_load
from catfast.serve.requests import GenerationRequest

pytestmark = pytest.mark.timeout(600)


def test_bounded_load_with_cancellations_and_disconnects():
    report = run_load(requests=40, clients=8, seed=0, max_batch=4, max_queue=6, steps=(2, 6))
    counts = report["outcomes"]
    assert sum(counts.values()) == 40
    assert report["server_errors"] == [], report["server_errors"]
    assert report["unexpected"] == [], report["unexpected"]
    # the mix really happened: answers, cancellations and rejections
    assert counts.get("ok", 0) >= 10, counts
    assert counts.get("cancelled", 0) + counts.get("stream_closed", 0) >= 1, counts
    # the clients that left had 150-step requests: had the server not cancelled them, it would still be busy
    assert report["idle_after_s"] < 2, report  # measured 0.0 s; 6.2 s with cancel() disabled
    assert counts.get("rejected_404", 0) >= 1, counts
    after = report["after"]
    assert after["queue_depth"] == 0 and after["running"] == 0, after
    assert after["held_entries"] == [], after  # no adapter still counted as in use
    assert report["final_request_ok"]
    # RSS after the load vs after the warm-up, same process; measured +10..40 MiB on the dev CPU
    assert report["rss_growth_mib"] < 150, report
    # no request started after one that arrived later (cancellations and rejections never start); the waits
    # are reported (p99 1.38-1.78 s, p50 0.88-1.08 s measured, 1 thread), not bounded: their ratio depends on the
    # order in which the clients' threads reach the server (test_mixed_burst_starts_in_order_of_arrival)
    assert report["overtaken"] == [], report


def test_a_request_waiting_for_a_device_slot_is_not_overtaken():
    """One device slot, room for two images: A (striped-star, 30 steps) runs and holds the slot; B
    (tiger-ball) needs it; C and D (striped-star, resident) arrive after B. B must start first (in order of
    arrival). On b9a3351 C and D were admitted past B, and a steady stream of striped-star requests would
    have kept B waiting until its timeout."""
    from catfast.serve.engine import Engine

    engine = Engine("demo", adapters_dir=adapters_dir(), device="cpu", max_batch=2, max_resident=1).start()
    try:
        a = engine.submit(GenerationRequest("sks, a star", adapters={"striped-star": 1.0}, steps=30, seed=1))
        deadline = time.monotonic() + 60
        while engine.stats()["running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        later = [
            engine.submit(GenerationRequest(prompt, adapters={name: 1.0}, steps=2, seed=2))
            for prompt, name in (("tiger, a ball", "tiger-ball"), ("sks", "striped-star"), ("sks", "striped-star"))
        ]
        finished = {}
        while len(finished) < 4:
            for key, h in zip("ABCD", [a, *later]):
                if h.done() and key not in finished:
                    finished[key] = time.monotonic()
            assert time.monotonic() < deadline + 60, finished
            time.sleep(0.005)
        for h in (a, *later):
            h.result(0)
        assert finished["B"] <= finished["C"] <= finished["D"], finished
    finally:
        engine.close()


def test_mixed_burst_starts_in_order_of_arrival():
    """32 requests at once (sizes 16, 32 and 64, base / one / two adapters, 2-4 steps) to a server with room
    for 4 images and 2 adapters on the device: every request starts in order of arrival (the adapters are in
    host memory from registration, so the one exception, a file still being read, does not arise). b9a3351
    started 2-6 requests per run before earlier ones of their size. The waits are reported, not bounded:
    the clients' threads reach the server in a random order, so which sizes come first, and with them the
    p99/p50 ratio, varies from run to run (1.76-2.24 on the dev CPU, 3.17 in one CI run, both in order)."""
    report = run_fairness(requests=32, seed=0)
    assert report["statuses"] == {"200": 32}, report
    assert report["started"] == 32, report
    assert report["overtaken"] == [], report
