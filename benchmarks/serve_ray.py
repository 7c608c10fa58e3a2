"""Ray Serve with 2 replicas of the catfast engine on a local Ray instance: does model multiplexing route a
request to the replica that already holds its adapters? (catfast/serve/ray_deployment.py; needs
``pip install catfast[ray]``; not in the CI suite: Ray takes ~1 min to start on the 2-core dev machine.)

One deployment, two phases over the same requests, each with its own copies of the three demo adapters
(so neither phase finds the other's adapters loaded):
- "unrouted": the requests carry no multiplexed model id: Ray's default routing spreads them;
- "multiplexed": each request carries its ``model`` as multiplexed model id
  (``handle.options(multiplexed_model_id=model)``).
For each phase: how many replicas served each model (each one had to register its adapters), the sum of
that over models ("model_replica_pairs"), the share of a model's requests on its most-used replica, and
how the requests split over the replicas.
Then through Ray's HTTP proxy: one request with the ``serve_multiplexed_model_id`` header, one unknown
adapter (must be 404) and one bad size (400).

    python benchmarks/serve_ray.py --out benchmarks/results/serve-ray-cpu-dev-2core.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=4, help="requests per model and phase")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import httpx
    import ray
    import torch
    from ray import serve

    from catfast.demo.adapters import CONCEPTS, adapters_dir
    from catfast.serve.ray_deployment import CatfastDeployment

    tmp = Path(tempfile.mkdtemp(prefix="catfast-ray-"))
    for phase in ("u", "m"):
        for name in CONCEPTS:
            shutil.copy(adapters_dir() / f"{name}.safetensors", tmp / f"{phase}-{name}.safetensors")
    port = _free_port()
    t0 = time.perf_counter()
    ray.init(num_cpus=args.replicas + 1, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = CatfastDeployment.options(num_replicas=args.replicas).bind(base="demo", adapters_dir=str(tmp), max_batch=4)
    handle = serve.run(app, name="catfast", route_prefix="/")
    started = time.perf_counter() - t0

    def models(phase):
        names = [f"{phase}-{n}" for n in CONCEPTS]
        return names + [f"{names[0]}:0.8+{names[2]}"]

    result = {
        "replicas": args.replicas,
        "rounds": args.rounds,
        "steps": args.steps,
        "startup_s": round(started, 1),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "commit": _commit(),
        "threads": torch.get_num_threads(),
        "machine": "shared 2-core dev CPU",
        "phases": {},
    }
    for phase, routed in (("u", False), ("m", True)):
        served: dict[str, list[str]] = {}
        t = time.perf_counter()
        for r in range(args.rounds):
            pending = []
            for model in models(phase):
                body = {"model": model, "prompt": "sks, a star", "steps": args.steps, "seed": r}
                h = handle.options(multiplexed_model_id=model) if routed else handle
                pending.append((model, h.generate.remote(body)))
            for model, resp in pending:
                out = resp.result(timeout_s=300)
                assert "error" not in out, out
                served.setdefault(model, []).append(out["replica"])
        loads = {m: len(set(v)) for m, v in served.items()}
        result["phases"]["multiplexed" if routed else "unrouted"] = {
            "replicas_per_model": loads,
            "model_replica_pairs": sum(loads.values()),
            "requests_per_replica": sorted(
                sum(v.count(rep) for v in served.values()) for rep in {x for v in served.values() for x in v}
            ),
            "same_replica_fraction": round(
                sum(v.count(max(set(v), key=v.count)) for v in served.values()) / sum(len(v) for v in served.values()),
                3,
            ),
            "wall_s": round(time.perf_counter() - t, 2),
        }

    url = f"http://127.0.0.1:{port}/v1/images/generations"
    http = {}
    with httpx.Client(timeout=300) as c:
        r = c.post(url, json={"prompt": "sks, a star", "steps": 2}, headers={"serve_multiplexed_model_id": "m-toy-box"})
        http["routed_header"] = {"status": r.status_code, "images": len(r.json().get("data", []))}
        r = c.post(url, json={"model": "nope", "prompt": "x"}, headers={"serve_multiplexed_model_id": "nope"})
        http["unknown_adapter"] = {"status": r.status_code, "message": r.json()["error"]["message"]}
        r = c.post(url, json={"prompt": "x", "size": "33x33"})
        http["bad_size"] = {"status": r.status_code, "message": r.json()["error"]["message"]}
    result["http"] = http
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    main()
