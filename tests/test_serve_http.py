"""`catfast serve`'s HTTP API on the shipped demo model and adapters, over real loopback HTTP: the official
OpenAI client, every 4xx/401 case of the API, adapter add/remove while serving, client disconnects."""

import base64
import io
import json
import os
import pickle
import shutil
import threading
import time

import httpx
import pytest
import torch
from PIL import Image

from catfast.serve.engine import Engine
from catfast.serve.http import Server, create_app, parse_model
from catfast.serve.loadtest import wait_idle

pytestmark = pytest.mark.timeout(300)
KEY = "test-key-123"
STEPS = 4


def _png(b64: str) -> Image.Image:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return Image.open(io.BytesIO(raw)).convert("RGB")


def _idle(engine, within: float = 20.0) -> None:
    """Fail unless the engine gets idle (nothing queued or running: no stuck slot) within ``within`` s."""
    stats = wait_idle(engine, within)
    assert stats["queue_depth"] == 0 and stats["running"] == 0, f"engine still busy after {within} s: {stats}"


def test_openai_client_gets_pngs_and_seeds_are_deterministic(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    extra = {"steps": STEPS, "seed": 7, "guidance_scale": 5.0}
    prompt = "sks, a star on a blue background"
    mixed = client.images.generate(
        model="striped-star:0.8+tiger-ball",
        prompt=prompt,
        n=2,
        size="32x32",
        response_format="b64_json",
        extra_body=extra,
    )
    assert len(mixed.data) == 2
    images = [_png(d.b64_json) for d in mixed.data]
    assert all(im.size == (32, 32) for im in images)
    assert images[0].tobytes() != images[1].tobytes()  # two noise draws of one seed
    again = client.images.generate(model="striped-star:0.8+tiger-ball", prompt=prompt, n=2, extra_body=extra)
    assert [d.b64_json for d in again.data] == [d.b64_json for d in mixed.data]
    dpm = client.images.generate(
        model="striped-star:0.8+tiger-ball", prompt=prompt, extra_body={**extra, "scheduler": "dpmpp_2m"}
    )
    assert _png(dpm.data[0].b64_json).tobytes() != images[0].tobytes()  # another sampler, another picture
    base = client.images.generate(model="base", prompt=prompt, n=2, response_format="b64_json", extra_body=extra)
    assert _png(base.data[0].b64_json).tobytes() != images[0].tobytes()  # the adapters change the picture


ERRORS = [
    ({"model": "no-such-adapter", "prompt": "a star"}, 404, "no-such-adapter"),
    ({"model": "striped-star+nope:0.5", "prompt": "a star"}, 404, "nope"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": "   "}, 400, "prompt"),
    ({"model": "base"}, 400, "prompt is required"),
    ({"prompt": "a star", "size": "33x33"}, 400, "size"),
    ({"prompt": "a star", "size": "big"}, 400, "size"),
    ({"prompt": "a star", "size": 32}, 400, "size"),
    ({"prompt": "a star", "steps": 100000}, 400, "steps"),
    ({"prompt": "a star", "steps": 0}, 400, "steps"),
    ({"prompt": "a star", "n": 1000}, 400, "n must be"),
    ({"prompt": "a star", "n": "2"}, 400, "n must be"),
    ({"prompt": "a star", "guidance_scale": "high"}, 400, "guidance"),
    ({"prompt": "a star", "response_format": "url"}, 400, "b64_json"),
    ({"prompt": "a star", "model": "striped-star:abc"}, 400, "finite number"),
    ({"prompt": "a star", "model": "striped-star:nan"}, 400, "finite number"),
    ({"prompt": "a star", "model": "striped-star+striped-star"}, 400, "twice"),
    ({"prompt": "a star", "model": "a++b"}, 400, "empty adapter name"),
    ({"prompt": "a star", "model": "../etc"}, 400, "invalid"),
    ({"prompt": "a star", "model": 3}, 400, "model must be"),
    ({"prompt": "a star", "guidance": 3}, 400, "unknown field"),
    ({"prompt": "a star", "stream": "yes"}, 400, "stream"),
    ({"prompt": "a star", "scheduler": "lms"}, 400, "scheduler"),
]


@pytest.mark.parametrize("body,status,words", ERRORS, ids=[f"{s}-{i}" for i, (_, s, _) in enumerate(ERRORS)])
def test_bad_requests_get_openai_shaped_errors(client, body, status, words):
    r = client.post("/v1/images/generations", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"], err
    assert set(err) >= {"message", "type", "code"}


@pytest.mark.parametrize(
    "content,status,words",
    [(b"{not json", 400, "not valid JSON"), (b"[1, 2]", 400, "JSON object"), (b"x" * (1 << 21), 413, "larger")],
)
def test_malformed_bodies(client, content, status, words):
    r = client.post("/v1/images/generations", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status and words in r.json()["error"]["message"]


def test_unknown_routes_and_methods_are_openai_shaped(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/images/generations")
    assert r.status_code == 405 and "error" in r.json()


def test_parse_model():
    assert parse_model("base") == {}
    assert parse_model("a+b:0.5") == {"a": 1.0, "b": 0.5}
    assert parse_model(" a:-1 + base ") == {"a": -1.0}


def test_api_key(engine, folder):
    from openai import AuthenticationError, OpenAI

    with Server(create_app(engine, api_key=KEY, adapters_dir=folder)) as srv:
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            body = {"prompt": "a star", "steps": 2}
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": KEY},
                {"Authorization": "Basic " + KEY},
            ):
                for method, path in (
                    ("POST", "/v1/images/generations"),
                    ("GET", "/v1/adapters"),
                    ("GET", "/metrics"),
                    ("DELETE", "/v1/adapters/striped-star"),
                ):
                    r = c.request(method, path, json=body if method == "POST" else None, headers=headers)
                    assert r.status_code == 401, (headers, path, r.text)
                    assert r.json()["error"]["type"] == "authentication_error"
                    assert r.headers["www-authenticate"] == "Bearer"
            assert c.get("/health").json()["auth"] is True  # health and the page stay open
            assert c.get("/").status_code == 200
            ok = c.post("/v1/images/generations", json=body, headers={"Authorization": f"Bearer {KEY}"})
            assert ok.status_code == 200 and len(ok.json()["data"]) == 1
            assert c.get("/v1/adapters", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="a star")
        good = OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0)
        assert len(good.images.generate(prompt="a star", extra_body={"steps": 2}).data) == 1


def test_adapter_paths_cannot_leave_the_folder(client, folder, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(folder / "toy-box.safetensors", outside)
    os.symlink(outside, folder / "link.safetensors")
    try:
        cases = [
            ({"name": "x", "path": "../outside.safetensors"}, "leaves the adapters folder"),
            ({"name": "x", "path": str(outside)}, "leaves the adapters folder"),
            ({"name": "x", "path": "link.safetensors"}, "resolves outside"),
            ({"name": "x", "path": "sub/../../outside.safetensors"}, "leaves the adapters folder"),
            ({"name": "../x"}, "invalid"),
            ({"name": ".."}, "invalid"),
            ({"name": "a/b"}, "invalid"),
            ({"name": "base"}, "reserved"),
            ({"name": "x", "path": "toy-box.pt"}, ".safetensors"),
            ({"name": "x", "url": "http://example.com/a.safetensors"}, "unknown field"),
        ]
        for body, words in cases:
            r = client.post("/v1/adapters", json=body)
            assert r.status_code == 400, (body, r.text)
            assert words in r.json()["error"]["message"], (body, r.text)
        assert "x" not in [a["id"] for a in client.get("/v1/adapters").json()["data"]]
    finally:
        os.unlink(folder / "link.safetensors")


class _Trap:
    """Unpickling this creates a marker file: proves whether the server unpickled a payload."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_corrupt_or_pickled_adapter_fails_alone(client, folder, tmp_path):
    marker = tmp_path / "unpickled"
    (folder / "pickled.safetensors").write_bytes(pickle.dumps({"w": _Trap(marker)}))
    (folder / "truncated.safetensors").write_bytes((folder / "toy-box.safetensors").read_bytes()[:5000])
    (folder / "empty.safetensors").write_bytes(b"")
    before = client.get("/v1/adapters").json()["data"]
    assert {a["format"] for a in before} == {"diffusers"}  # one name per format, as `catfast adapter info` says
    for name in ("pickled", "truncated", "empty"):
        r = client.post("/v1/adapters", json={"name": name})
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "adapter_load_failed"
    r = client.post("/v1/adapters", json={"name": "missing"})
    assert r.status_code == 422 and "no such file" in r.json()["error"]["message"]
    assert not marker.exists()
    assert client.get("/v1/adapters").json()["data"] == before  # nothing else changed
    ok = client.post("/v1/images/generations", json={"model": "toy-box", "prompt": "toy, a box", "steps": 2})
    assert ok.status_code == 200


def test_adapters_added_and_removed_while_serving(client, engine, folder):
    shutil.copy(folder / "tiger-ball.safetensors", folder / "sub-tiger.safetensors")
    r = client.post("/v1/adapters", json={"name": "tiger2", "path": "sub-tiger.safetensors"})
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["id"] == "tiger2" and info["rank"] == 16 and info["path"] == "sub-tiger.safetensors"
    assert info["triggers"] == ["tiger"]
    assert "tiger2" in [a["id"] for a in client.get("/v1/adapters").json()["data"]]

    # a long request on tiger2 runs while tiger2 is removed: it finishes, new requests get 404
    result = {}

    def long_request():
        with httpx.Client(base_url=str(client.base_url), timeout=120) as c:
            result["r"] = c.post(
                "/v1/images/generations", json={"model": "tiger2", "prompt": "tiger, a ball", "steps": 40, "seed": 1}
            )

    t = threading.Thread(target=long_request)
    t.start()
    deadline = time.monotonic() + 30
    while engine.stats()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.stats()["running"] >= 1
    gone = client.delete("/v1/adapters/tiger2")
    assert gone.status_code == 200 and gone.json()["deleted"] is True
    assert client.delete("/v1/adapters/tiger2").status_code == 404
    r = client.post("/v1/images/generations", json={"model": "tiger2", "prompt": "x", "steps": 2})
    assert r.status_code == 404
    t.join(120)
    assert result["r"].status_code == 200, result["r"].text
    assert "tiger2" not in [a["id"] for a in client.get("/v1/adapters").json()["data"]]
    _idle(engine)


def test_disconnect_cancels_the_request(server, engine):
    _idle(engine)
    body = {"prompt": "a star", "steps": 150, "n": 2}
    with httpx.Client(base_url=server.url, timeout=1.0) as c:
        with pytest.raises(httpx.ReadTimeout):
            c.post("/v1/images/generations", json=body)
    t0 = time.monotonic()
    _idle(engine, within=10)  # well before 150 steps end
    # streamed: closing the stream after the first progress event cancels too
    with httpx.Client(base_url=server.url, timeout=60) as c:
        with c.stream("POST", "/v1/images/generations", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and "progress" in line:
                    break
    _idle(engine, within=10)
    assert time.monotonic() - t0 < 20
    metrics = httpx.get(server.url + "/metrics").text
    assert "catfast_cancelled_requests_total 2.0" in metrics


def test_stream_events_and_metrics(client, engine):
    events = []
    with client.stream(
        "POST",
        "/v1/images/generations",
        json={"model": "striped-star", "prompt": "sks, a star", "n": 2, "steps": 3, "stream": True, "seed": 5},
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    kinds = [e["type"] for e in parsed]
    assert kinds.count("image_generation.completed") == 2
    steps = [e["step"] for e in parsed if e["type"] == "image_generation.progress"]
    assert steps == [1, 2, 3]
    done = [e for e in parsed if e["type"] == "image_generation.completed"]
    plain = client.post(
        "/v1/images/generations", json={"model": "striped-star", "prompt": "sks, a star", "n": 2, "steps": 3, "seed": 5}
    ).json()
    assert [d["b64_json"] for d in done] == [d["b64_json"] for d in plain["data"]]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["native_size"] == 32
    text = client.get("/metrics").text
    for name in (
        "catfast_queue_depth",
        "catfast_batch_size",
        "catfast_step_latency_seconds",
        "catfast_adapter_hits_total",
        "catfast_adapter_loads_total",
        "catfast_adapter_evictions_total",
    ):
        assert f"\n{name} " in text, name
    loads = float(text.split("\ncatfast_adapter_loads_total ")[1].split()[0])
    assert loads >= 1
    assert 'catfast_http_requests_total{route="/v1/images/generations",status="200"}' in text


def test_playground_page_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "catfast playground" in page.text
    assert client.get("/static/playground.js").status_code == 200


def test_kohya_copy_of_an_adapter_serves_the_same_pictures(client, folder):
    from catfast.adapters.formats import read_adapter, write_adapter

    write_adapter(read_adapter(folder / "toy-box.safetensors"), folder / "toy-kohya.safetensors", format="kohya")
    r = client.post("/v1/adapters", json={"name": "toy-kohya"})
    assert r.status_code == 201 and r.json()["format"] == "kohya", r.text
    body = {"prompt": "toy, a box on a grey background", "steps": 4, "seed": 11, "n": 2}
    kohya = client.post("/v1/images/generations", json={**body, "model": "toy-kohya"}).json()["data"]
    peft = client.post("/v1/images/generations", json={**body, "model": "toy-box"}).json()["data"]
    base = client.post("/v1/images/generations", json=body).json()["data"]
    for a, b, c in zip(kohya, peft, base):
        ka, pb, bc = (torch.tensor(list(_png(x["b64_json"]).tobytes()), dtype=torch.int16) for x in (a, b, c))
        assert (ka - pb).abs().max() <= 1  # the same LoRA in another file format
        assert (ka - bc).abs().float().mean() > 5  # and it does change the picture
    assert client.delete("/v1/adapters/toy-kohya").status_code == 200


def test_queue_full_is_429_and_timeouts_are_504():
    engine = Engine("demo", device="cpu", max_batch=1, max_queue=1, timeout_s=3.0).start()
    try:
        with Server(create_app(engine)) as srv:
            answers = {}

            def post(key):
                with httpx.Client(base_url=srv.url, timeout=120) as c:
                    body = {"prompt": "a star", "steps": 150, "size": "64x64"}
                    answers[key] = c.post("/v1/images/generations", json=body)

            first = threading.Thread(target=post, args=("running",))
            first.start()
            deadline = time.monotonic() + 30
            while engine.stats()["running"] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            second = threading.Thread(target=post, args=("queued",))
            second.start()
            while engine.stats()["queue_depth"] == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                full = c.post("/v1/images/generations", json={"prompt": "a star", "steps": 2})
            assert full.status_code == 429, full.text
            assert full.json()["error"]["code"] == "queue_full"
            first.join(60)
            second.join(60)
            for key in ("running", "queued"):  # 150 steps at 64x64 (0.09 s a step at 32x32 here) outlast 3 s
                assert answers[key].status_code == 504, (key, answers[key].text)
                assert answers[key].json()["error"]["type"] == "timeout_error"
            _idle(engine)
    finally:
        engine.close()
