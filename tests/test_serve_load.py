"""A bounded load test of `catfast serve` on loopback (benchmarks/serve_load.py runs a larger one): concurrent
clients, random adapters, random cancellations (client timeouts, streams closed early) and bad requests,
a queue small enough to overflow. Every request must be answered or cleanly rejected (no 5xx), the engine
must end idle with no slot held, answer a request afterwards, and its memory must come back near the start."""

import pytest

from catfast.serve.loadtest import run_load

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
