"""Hostile input to `catfast serve` (issue 27), over real loopback HTTP on the shipped demo model: what a
client sends never makes a 500, a bad adapter file is a 4xx for that request alone, and a result that is
not finite is an error rather than a black picture.

Each test names the defect of issue 27 it pins down; on b9a3351 each of them failed (a 503, a 500, a reset
connection, a 201, or a 200 with an all-black PNG)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import httpx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from catfast.demo.adapters import adapters_dir
from catfast.serve.loadtest import free_port, stop_server, wait_for_server

pytestmark = pytest.mark.timeout(300)
GOOD = "toy-box"


def variant(dst, *, tensors=None, metadata=None):
    """A copy of the good demo adapter at ``dst`` with its tensors passed through ``tensors`` (a function of
    the name -> tensor dict) and ``metadata`` entries added: a real safetensors file, written as a
    broken trainer or a hand edit would leave it."""
    with safe_open(str(adapters_dir() / f"{GOOD}.safetensors"), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    save_file(tensors(state) if tensors else state, str(dst), metadata={**meta, **(metadata or {})})
    return dst


def rank_zero(state):
    """One layer of rank 0: lora_A [0, in], lora_B [out, 0]."""
    a = next(k for k in state if k.endswith("lora_A.weight"))
    b = a.replace("lora_A", "lora_B")
    state[a] = torch.zeros(0, state[a].shape[1], dtype=state[a].dtype)
    state[b] = torch.zeros(state[b].shape[0], 0, dtype=state[b].dtype)
    return state


def huge(state):
    """Every weight 65000 (finite in fp16)."""
    return {k: torch.full_like(v, 65000, dtype=torch.float16) for k, v in state.items()}


DAMAGED_E4T = {"catfast.e4t.token": "sks", "catfast.integrations.word_embedding": "[1e999]"}


def assert_openai_error(r, status, words=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "code"} and isinstance(err["message"], str), err
    assert "\n" not in err["message"], err
    if words:
        assert words in err["message"], err
    return err


# -------------------------------------------------------------------------------- defect 1: lone surrogate


@pytest.mark.parametrize(
    "raw,words",
    [
        (b'{"prompt": "a \\ud800 star"}', "lone surrogate"),
        (b'{"prompt": "a star", "negative_prompt": "\\udfff"}', "lone surrogate"),
        (b'{"prompt": "a star", "size": "\\ud800"}', "size"),
        (b'{"prompt": "a star", "\\ud800": 1}', "unknown field"),
        (b'{"prompt": "a star", "model": "\\ud800"}', "invalid"),
    ],
)
def test_1_lone_surrogates_are_400(client, raw, words):
    r = client.post("/v1/images/generations", content=raw, headers={"Content-Type": "application/json"})
    assert_openai_error(r, 400, words)


def test_1_a_surrogate_pair_is_text_and_is_served(client):
    raw = b'{"prompt": "a star \\ud83d\\ude00", "steps": 1}'  # one character: U+1F600
    r = client.post("/v1/images/generations", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text


# -------------------------------------------------------------------------------- defect 2: deep nesting


def _exchange(sock, request: bytes) -> tuple[int, bytes]:
    """Send one HTTP/1.1 request on an open keep-alive socket; (status, body) of its response."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection; got {data[:200]!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(int(v) for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length")
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection mid-body"
        body += chunk
    return int(lines[0].split()[1]), body


def _post(path: str, payload: bytes) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    return f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload


@pytest.mark.parametrize("where", ["top", "unknown field", "adapters"])
def test_2_deeply_nested_json_is_400_and_the_connection_lives(server, where):
    deep = b"[" * 100_000 + b"]" * 100_000
    payload, path = {
        "top": (deep, "/v1/images/generations"),
        "unknown field": (b'{"prompt": "a star", "zzz": ' + deep + b"}", "/v1/images/generations"),
        "adapters": (b'{"name": "x", "path": ' + deep + b"}", "/v1/adapters"),
    }[where]
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        status, body = _exchange(sock, _post(path, payload))
        assert status == 400, body[:300]
        assert "nests deeper" in json.loads(body)["error"]["message"]
        # the same keep-alive connection answers the next request
        status, body = _exchange(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200 and json.loads(body)["status"] == "ok"


def test_2_nesting_just_past_the_bound_is_400(client):
    body = {"prompt": "a star", "user": "x"}
    nested: list = []
    for _ in range(20):
        nested = [nested]
    r = client.post("/v1/images/generations", json={**body, "quality": nested})
    assert_openai_error(r, 400, "nests deeper")


# -------------------------------------------------------------------------------- defects 3, 4, 5, 9: R


def test_3_symlink_loops_are_400(client, folder):
    os.symlink("loop.safetensors", folder / "loop.safetensors")  # itself
    os.symlink("pong.safetensors", folder / "ping.safetensors")
    os.symlink("ping.safetensors", folder / "pong.safetensors")
    try:
        for body in ({"name": "loop"}, {"name": "x", "path": "ping.safetensors"}):
            err = assert_openai_error(client.post("/v1/adapters", json=body), 400, "loop")
            assert err["code"] == "invalid_path"
        assert client.get("/v1/adapters").status_code == 200
    finally:
        for name in ("loop", "ping", "pong"):
            os.unlink(folder / f"{name}.safetensors")


@pytest.mark.parametrize(
    "kind,words",
    [
        ("rank0", "rank 0"),  # defect 4: was a ZeroDivisionError (500)
        ("e4t", "damaged E4T embedding"),  # defect 5: read outside the try (500)
        ("huge", "x the base weight it modifies"),  # defect 9: registered (201), every picture black
    ],
)
def test_bad_adapter_files_are_422_and_change_nothing(client, folder, kind, words):
    path = folder / f"bad-{kind}.safetensors"
    variant(path, tensors={"rank0": rank_zero, "huge": huge}.get(kind), metadata=DAMAGED_E4T if kind == "e4t" else None)
    before = client.get("/v1/adapters").json()["data"]
    try:
        err = assert_openai_error(client.post("/v1/adapters", json={"name": f"bad-{kind}"}), 422, words)
        assert err["code"] == "adapter_load_failed"
        if kind == "huge":  # names the layer and the ratio
            assert "layer down_blocks." in err["message"] or "layer up_blocks." in err["message"], err
            assert "e+" in err["message"], err
        assert client.get("/v1/adapters").json()["data"] == before
    finally:
        path.unlink()
    ok = client.post("/v1/images/generations", json={"model": GOOD, "prompt": "toy, a box", "steps": 1})
    assert ok.status_code == 200, ok.text


def test_9_a_strong_but_proportionate_adapter_still_registers(client, folder):
    """The ratio bound leaves room for strong adapters: the good one with every up weight x 5 (ratios up to
    about 2) registers and serves."""
    path = folder / "strong.safetensors"
    variant(path, tensors=lambda s: {k: v * 5 if "lora_B" in k else v for k, v in s.items()})
    try:
        assert client.post("/v1/adapters", json={"name": "strong"}).status_code == 201
        r = client.post("/v1/images/generations", json={"model": "strong", "prompt": "toy, a box", "steps": 1})
        assert r.status_code == 200, r.text
        assert client.delete("/v1/adapters/strong").status_code == 200
    finally:
        path.unlink()


# -------------------------------------------------------------------------------- defect 8: non-finite


@pytest.mark.parametrize("guidance", [1e308, 31, -1])
def test_8_guidance_out_of_bounds_is_400(client, guidance):
    r = client.post("/v1/images/generations", json={"prompt": "a star", "guidance_scale": guidance, "steps": 1})
    assert_openai_error(r, 400, "guidance")


def test_8_non_finite_latents_are_422_not_a_black_png(client, engine):
    """A model whose output turns NaN (here the base UNet's last bias, as a damaged checkpoint would) ends
    in latents that are not finite: the answer is a 422 that says so, plain and streamed."""
    bias = engine.unet.conv_out.bias
    saved = bias.detach().clone()
    body = {"model": GOOD, "prompt": "toy, a box", "steps": 2, "guidance_scale": 7.0}
    try:
        with torch.no_grad():
            bias[0] = float("nan")
        err = assert_openai_error(client.post("/v1/images/generations", json=body), 422, "NaN/Inf")
        assert err["code"] == "non_finite_output"
        assert "guidance_scale 7" in err["message"] and GOOD in err["message"], err
        with client.stream("POST", "/v1/images/generations", json={**body, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert events[-1]["type"] == "error" and events[-1]["error"]["status"] == 422, events[-1]
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert client.post("/v1/images/generations", json={**body, "steps": 1}).status_code == 200


# -------------------------------------------------------------------------------- defects 6, 7: start-up


def test_6_7_catfast_serve_starts_past_bad_files_and_refuses_links_that_leave(tmp_path):
    """`catfast serve --adapters DIR` with one good adapter and every kind of bad entry: it starts, serves
    the good one, and prints one warning line per bad entry (the same rule and checks as POST
    /v1/adapters). On b9a3351 the rank-0 file stopped it (exit 1, a traceback), and the links that leave
    the folder were registered."""
    folder, elsewhere = tmp_path / "loras", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    shutil.copy(adapters_dir() / f"{GOOD}.safetensors", folder / "good.safetensors")
    shutil.copy(adapters_dir() / f"{GOOD}.safetensors", elsewhere / "good.safetensors")
    variant(folder / "rank0.safetensors", tensors=rank_zero)
    variant(folder / "e4t.safetensors", metadata=DAMAGED_E4T)
    variant(folder / "huge.safetensors", tensors=huge)
    os.symlink(elsewhere / "good.safetensors", folder / "link_out.safetensors")
    os.symlink("/etc/passwd", folder / "passwd.safetensors")
    os.symlink("loop.safetensors", folder / "loop.safetensors")
    (folder / "dir.safetensors").mkdir()
    os.mkfifo(folder / "fifo.safetensors")
    (folder / "corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    bad = ["corrupt", "dir", "e4t", "fifo", "huge", "link_out", "loop", "passwd", "rank0"]

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CATFAST_API_KEY", None)
    cmd = [sys.executable, "-m", "catfast.cli", "serve", "--adapters", str(folder), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, proc)
        assert [a["id"] for a in httpx.get(url + "/v1/adapters").json()["data"]] == ["good"]
        r = httpx.post(url + "/v1/adapters", json={"name": "link_out"})  # R refuses it the same way
        assert_openai_error(r, 400, "resolves outside")
    finally:
        out, err = stop_server(proc)
    assert "Traceback" not in out + err, err
    warnings = [line for line in err.splitlines() if "skipping adapter" in line]
    assert sorted(line.split("skipping adapter ")[1].split(":")[0] for line in warnings) == sorted(
        str(folder / f"{name}.safetensors") for name in bad
    ), err
    for name, words in (
        ("rank0", "rank 0"),
        ("e4t", "damaged E4T"),
        ("huge", "x the base weight"),
        ("link_out", "resolves outside"),
        ("passwd", "resolves outside"),
        ("loop", "loop"),
        ("dir", "not a regular file"),
        ("fifo", "not a regular file"),
    ):
        line = next(w for w in warnings if f"/{name}.safetensors:" in w)
        assert words in line, line


def test_7_start_up_refuses_links_that_leave_the_folder(tmp_path):
    """Only links: on b9a3351 the engine started and registered link_out (and opened /etc/passwd)."""
    from catfast.serve.engine import Engine

    folder, elsewhere = tmp_path / "loras", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    shutil.copy(adapters_dir() / f"{GOOD}.safetensors", elsewhere / "good.safetensors")
    os.symlink(elsewhere / "good.safetensors", folder / "link_out.safetensors")
    os.symlink("/etc/passwd", folder / "passwd.safetensors")
    os.symlink("link_in_target.safetensors", folder / "link_in.safetensors")  # a link inside is fine
    shutil.copy(adapters_dir() / f"{GOOD}.safetensors", folder / "link_in_target.safetensors")
    engine = Engine("demo", adapters_dir=folder, device="cpu")
    try:
        assert sorted(a.name for a in engine.adapters()) == ["link_in", "link_in_target"]
    finally:
        engine.close()


def test_the_one_5xx_is_the_engine_failing_and_it_says_so(client, engine):
    """A model that breaks mid-step (here the UNet's last convolution given a weight of the wrong shape, as
    a damaged checkpoint would) is the engine's failure, not the request's: a 500 that says so, and the
    server goes on serving once the model is whole."""
    conv = engine.unet.conv_out
    saved = conv.weight
    try:
        conv.weight = torch.nn.Parameter(torch.zeros(1, 1, 1, 1), requires_grad=False)
        r = client.post("/v1/images/generations", json={"prompt": "a star", "steps": 1})
        err = assert_openai_error(r, 500, "the engine failed in a denoising step")
        assert err["code"] == "engine_failure" and "not a problem with the request" in err["message"], err
    finally:
        conv.weight = saved
    assert client.post("/v1/images/generations", json={"prompt": "a star", "steps": 1}).status_code == 200
