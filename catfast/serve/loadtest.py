"""A load test of the HTTP server on loopback (tests/test_serve_load.py runs it small, benchmarks/serve_load.py
large): concurrent clients send a random mix of requests to a server over the shipped demo model and adapters.

Kinds of request (drawn per request from ``seed``):
- "ok": a valid generation on the base, one adapter or two weighted adapters (answered 200, or 429 when
  the bounded queue is full);
- "cancel": a valid generation of 150 steps whose client gives up after 0.05-0.6 s (the server must cancel
  it: once every client is done, the engine must be idle within a few steps, "idle_after_s");
- "stream_close": a streamed 150-step generation whose client closes the stream after the first event;
- "unknown": an unknown adapter (must be 404); "bad": an invalid size (must be 400).

The report counts outcomes, lists any 5xx ("server_errors") and answers that do not fit their kind
("unexpected"), gives the wait of the requests that started (submission to start: p50, p99, max) and those
started after a later arrival ("overtaken"), and after the load checks that the engine is idle, no adapter is
held, a new request is answered, and how far the process's resident memory grew from after the warm-up.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import io
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from catfast.demo.adapters import CONCEPTS, adapters_dir
from catfast.serve.engine import Engine
from catfast.serve.http import Server, create_app

LONG_STEPS = 150  # steps of the requests whose clients leave early (the engine's maximum)
KINDS = (("ok", 0.55), ("cancel", 0.15), ("stream_close", 0.1), ("unknown", 0.1), ("bad", 0.1))


def copy_demo_adapters(folder: Path, source: Path | None = None) -> Path:
    """``folder`` with a copy of each shipped demo adapter (``<name>.safetensors``) in it; ``source``: the folder
    to copy them from (default: the UNet demo's; ``catfast.shipped.dit_adapters_path()``: the DiT demo's)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in CONCEPTS:
        shutil.copy((source or adapters_dir()) / f"{name}.safetensors", folder / f"{name}.safetensors")
    return folder


@contextlib.contextmanager
def demo_server(folder: Path, base: str = "demo", **engine_options):
    """(engine, server): an engine over a shipped demo model (``base``: "demo", or "demo-dit" for the Flux-style
    one) on the CPU with the adapters of ``folder``, behind the HTTP app on a free loopback port; both are closed
    when the block ends."""
    engine = Engine(base, adapters_dir=folder, device="cpu", **engine_options).start()
    try:
        with Server(create_app(engine, adapters_dir=folder)) as server:
            yield engine, server
    finally:
        engine.close()


def random_model(rng: random.Random, adapters: list[str]) -> str:
    """A request's ``model``: the base (1 in 4), one adapter (45%), or two with random weights."""
    pick = rng.random()
    if pick < 0.25:
        return "base"
    if pick < 0.7:
        return rng.choice(adapters)
    a, b = rng.sample(adapters, 2)
    return f"{a}:{rng.choice((0.5, 0.8, 1.0))}+{b}:{rng.choice((0.3, 0.6))}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_server(url: str, proc, within: float = 180.0) -> None:
    """Wait until the server at ``url`` answers ``/health`` with 200; AssertionError (with its output) when
    its process ``proc`` ends first or ``within`` seconds pass."""
    import httpx  # lazy: httpx

    deadline = time.monotonic() + within
    while True:
        assert proc.poll() is None, proc.communicate()
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{url} did not come up within {within} s"
        time.sleep(0.5)


def stop_server(proc, within: float = 60.0) -> tuple[str, str]:
    """Ctrl-C a ``catfast serve`` process (killed when it has not stopped ``within`` seconds); its
    (stdout, stderr)."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


def rss_mib() -> float:
    """This process's resident memory in MiB (Linux /proc; 0.0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def wait_idle(engine, within: float = 20.0) -> dict:
    """Wait up to ``within`` seconds until ``engine`` has nothing queued or running; its stats then."""
    deadline = time.monotonic() + within
    while True:
        stats = engine.stats()
        if (stats["queue_depth"] == 0 and stats["running"] == 0) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def _plan(n: int, seed: int, adapters: list[str], steps: tuple[int, int]) -> list[dict]:
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS)
    plans = []
    for i in range(n):
        kind = rng.choices(kinds, weights)[0]
        model = random_model(rng, adapters)
        body = {
            "model": model,
            "prompt": rng.choice(("a star", "sks, a star on a blue background", "tiger, a ball", "toy, a box")),
            "n": rng.choice((1, 1, 2)),
            "steps": rng.randint(*steps),
            "seed": rng.randrange(2**31),
        }
        if kind in ("cancel", "stream_close"):
            body["steps"] = LONG_STEPS  # certainly still running when the client leaves
        elif kind == "unknown":
            body["model"] = f"missing-{i}"
        elif kind == "bad":
            body["size"] = "33x33"
        plans.append({"i": i, "kind": kind, "body": body, "give_up_s": rng.uniform(0.05, 0.6)})
    return plans


def _one(url: str, plan: dict) -> dict:
    import httpx  # lazy: httpx

    kind, body = plan["kind"], plan["body"]
    t0 = time.perf_counter()
    out = {"i": plan["i"], "kind": kind}
    try:
        if kind == "stream_close":
            with httpx.Client(base_url=url, timeout=120) as c:
                with c.stream("POST", "/v1/images/generations", json={**body, "stream": True}) as r:
                    out["status"] = r.status_code
                    if r.status_code == 200:
                        for line in r.iter_lines():
                            if "image_generation.progress" in line or "image_generation.completed" in line:
                                break
                        out["outcome"] = "stream_closed"
        else:
            timeout = plan["give_up_s"] if kind == "cancel" else 300
            with httpx.Client(base_url=url, timeout=timeout) as c:
                r = c.post("/v1/images/generations", json=body)
            out["status"] = r.status_code
            if r.status_code == 200:
                from PIL import Image  # lazy: optional

                data = r.json()["data"]
                images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in data]
                out["outcome"] = "ok" if len(images) == body["n"] else "wrong_count"
    except httpx.TimeoutException:
        out["outcome"] = "cancelled"
    except httpx.HTTPError as e:
        out["outcome"] = f"transport_error: {type(e).__name__}"
    out.setdefault("outcome", f"rejected_{out.get('status')}")
    out["seconds"] = time.perf_counter() - t0
    return out


def _expected(result: dict) -> bool:
    kind, outcome = result["kind"], result["outcome"]
    if outcome == "rejected_429":
        return kind in ("ok", "cancel", "stream_close")
    return {
        "ok": outcome == "ok",
        "cancel": outcome in ("ok", "cancelled"),
        "stream_close": outcome == "stream_closed",
        "unknown": outcome == "rejected_404",
        "bad": outcome == "rejected_400",
    }[kind]


def run_load(
    requests: int = 40,
    clients: int = 8,
    *,
    seed: int = 0,
    max_batch: int = 4,
    max_queue: int = 8,
    steps: tuple[int, int] = (2, 6),
    settle_s: float = 30.0,
    rounds: int = 1,
) -> dict:
    """Run the load test (module docstring) in this process; returns the report dict. ``rounds``: send
    ``requests`` that many times (seeds seed, seed+1, ...), recording the memory after each round."""
    import httpx  # lazy: httpx

    with tempfile.TemporaryDirectory(prefix="catfast-load-") as tmp:
        folder = copy_demo_adapters(Path(tmp))
        with demo_server(folder, max_batch=max_batch, max_queue=max_queue) as (engine, server):
            url = server.url
            with httpx.Client(base_url=url, timeout=300) as c:  # warm-up: every adapter once, streamed once
                for model in ["base", *CONCEPTS]:
                    r = c.post("/v1/images/generations", json={"model": model, "prompt": "a star", "steps": 2})
                    r.raise_for_status()
            gc.collect()
            rss_start = rss_mib()
            engine.scheduler.admissions.clear()
            plans, results, rss_rounds = [], [], []
            t0 = time.perf_counter()
            for r in range(rounds):
                batch = _plan(requests, seed + r, list(CONCEPTS), steps)
                with ThreadPoolExecutor(clients) as pool:
                    results += list(pool.map(lambda p: _one(url, p), batch))
                plans += batch
                gc.collect()
                rss_rounds.append(round(rss_mib(), 1))
            wall = time.perf_counter() - t0
            t_idle = time.perf_counter()
            stats = wait_idle(engine, settle_s)
            idle_after = time.perf_counter() - t_idle
            with engine._lock:
                held = [e.name for e in engine.pool.entries.values() if e.running or e.queued]
                starts = list(engine.scheduler.admissions)
            with httpx.Client(base_url=url, timeout=300) as c:
                final = c.post(
                    "/v1/images/generations", json={"model": "striped-star", "prompt": "sks, a star", "steps": 2}
                )
            gc.collect()
            rss_end = rss_mib()
    outcomes: dict[str, int] = {}
    for r in results:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
    ok_s = sorted(r["seconds"] for r in results if r["outcome"] == "ok")
    images = sum(p["body"]["n"] for p, r in zip(plans, results) if r["outcome"] == "ok")
    return {
        "requests": requests * rounds,
        "rounds": rounds,
        "clients": clients,
        "seed": seed,
        "max_batch": max_batch,
        "max_queue": max_queue,
        "steps": list(steps),
        "outcomes": dict(sorted(outcomes.items())),
        "server_errors": [r for r in results if r.get("status", 0) >= 500],
        "unexpected": [r for r in results if not _expected(r)],
        "wall_s": round(wall, 2),
        "ok_images_per_s": round(images / wall, 2),
        "ok_latency_s": {
            "p50": round(statistics.median(ok_s), 3) if ok_s else None,
            "p95": round(ok_s[int(0.95 * (len(ok_s) - 1))], 3) if ok_s else None,
        },
        **_waits([w for _, _, w in starts]),
        "overtaken": overtaken([i for i, _, _ in starts]),
        "idle_after_s": round(idle_after, 2),
        "after": {"queue_depth": stats["queue_depth"], "running": stats["running"], "held_entries": held},
        "final_request_ok": final.status_code == 200,
        "rss_start_mib": round(rss_start, 1),
        "rss_end_mib": round(rss_end, 1),
        "rss_after_each_round_mib": rss_rounds,
        "rss_growth_mib": round(rss_end - rss_start, 1),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
    }


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0-100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def overtaken(order: list[int]) -> list[int]:
    """The requests (ids in order of arrival) that started after a request that arrived later; ``order``: the
    ids in order of their starts."""
    late, latest = [], -1
    for i in order:
        if i < latest:
            late.append(i)
        latest = max(latest, i)
    return sorted(late)


def _waits(waits: list[float]) -> dict:
    """p50 / p99 / max of the requests' waits (submission to start, seconds) and p99 / p50."""
    if not waits:
        return {"wait_s": None, "p99_over_p50": None}
    p50, p99 = percentile(waits, 50), percentile(waits, 99)
    return {
        "wait_s": {"p50": round(p50, 3), "p99": round(p99, 3), "max": round(max(waits), 3)},
        "p99_over_p50": round(p99 / p50, 2) if p50 > 0 else None,
    }


def run_fairness(
    requests: int = 32,
    *,
    seed: int = 0,
    max_batch: int = 4,
    max_resident: int = 2,
    sizes: tuple[str, ...] = ("32x32", "16x16", "64x64"),
    steps: tuple[int, int] = (2, 4),
) -> dict:
    """The fairness load: ``requests`` mixed requests (sizes, base / one adapter / two weighted adapters,
    steps), all sent at once by as many clients to a server with room for fewer (``max_batch`` images,
    ``max_resident`` adapters on the device, three adapters in use). The engine's record of each start
    (``StepScheduler.admissions``) gives the wait of every request (submission to start) and whether
    requests started in order of arrival. Report: outcomes, waits p50/p99/max, their ratio, and the
    requests ``overtaken`` (ids that started after a request that arrived later)."""
    import httpx  # lazy: httpx

    rng = random.Random(seed)
    adapters = list(CONCEPTS)
    bodies = []
    for i in range(requests):
        model = random_model(rng, adapters)
        size = rng.choice(sizes)
        bodies.append({"model": model, "prompt": "a star", "size": size, "steps": rng.randint(*steps), "seed": i})
    with tempfile.TemporaryDirectory(prefix="catfast-fair-") as tmp:
        folder = copy_demo_adapters(Path(tmp))
        options = dict(max_batch=max_batch, max_queue=requests + 1, max_resident=max_resident)
        with demo_server(folder, **options) as (engine, server):
            with httpx.Client(base_url=server.url, timeout=300) as c:  # warm-up: each size once
                for size in sizes:
                    c.post("/v1/images/generations", json={"prompt": "a star", "size": size, "steps": 1})
            engine.scheduler.admissions.clear()

            def send(body):
                with httpx.Client(base_url=server.url, timeout=300) as c:
                    return c.post("/v1/images/generations", json=body).status_code

            t0 = time.perf_counter()
            with ThreadPoolExecutor(requests) as pool:
                statuses = list(pool.map(send, bodies))
            wall = time.perf_counter() - t0
            starts = list(engine.scheduler.admissions)
    waits = [w for _, _, w in starts]
    return {
        "requests": requests,
        "max_batch": max_batch,
        "max_resident": max_resident,
        "sizes": list(sizes),
        "steps": list(steps),
        "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
        "started": len(starts),
        **_waits(waits),
        "overtaken": overtaken([i for i, _, _ in starts]),
        "wall_s": round(wall, 2),
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
    }
