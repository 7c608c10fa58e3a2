"""`catfast serve --base <tiny-flux folder> --adapters DIR` (catfast/serve/dit.py) over real loopback HTTP with
the official OpenAI client: adapters listed, b64 PNGs per adapter, requests for different adapters in ONE batch
(one transformer call per Euler step over all their rows) equal to each request alone, resident adapters not
re-attached, stacked weighted adapters ("star:0.8+ball") equal to diffusers' FluxPipeline with both loaded by
``load_lora_weights`` and weighted by ``set_adapters``, and every bad input a 4xx (a UNet LoRA: 400 naming both
families; a size off the patch grid: 400 naming the multiple; what the UNet server refuses: the same status)."""

import base64
import contextlib
import io
import shutil
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel
from PIL import Image

from catfast.adapters.formats import write_adapter
from catfast.integrations.factory_dit import build_transformer, init_dit_folder
from catfast.serve.cli import build_app
from catfast.serve.http import Server
from catfast.serve.requests import GenerationRequest
from catfast.testing import assert_rel_close, random_adapter

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.timeout(300)]
SIDE = 16  # pixels: 8 x 8 latents (the tiny VAE's factor 2), 16 image tokens
EXTRA = {"steps": 2, "seed": 7}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(engine, server, adapters folder, tiny-flux folder): what `catfast serve --base <tiny-flux> --adapters DIR`
    builds, on the CPU; "star" targets the attention's q/k/v, "ball" q and the output projection (so attaching
    the second widens the zero padding of the first)."""
    root = tmp_path_factory.mktemp("dit-serve")
    flux = init_dit_folder("tiny-flux", root / "tiny-flux")
    folder = root / "adapters"
    folder.mkdir()
    transformer = build_transformer("tiny-flux")
    for name, seed, leaves in (("star", 1, ("to_q", "to_k", "to_v")), ("ball", 2, ("to_q", "to_out.0"))):
        adapter = random_adapter({"transformer": transformer}, seed=seed, leaves=leaves)
        write_adapter(adapter, folder / f"{name}.safetensors")
    engine, app = build_app(str(flux), str(folder), device="cpu", max_batch=8)
    try:
        with Server(app) as server:
            yield engine, server, folder, flux
    finally:
        engine.close()


@pytest.fixture(scope="module")
def engine(served):
    return served[0]


@pytest.fixture(scope="module")
def openai_client(served):
    from openai import OpenAI

    return OpenAI(base_url=served[1].url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def client(served):
    with httpx.Client(base_url=served[1].url, timeout=120) as c:
        yield c


def _pixels(b64: str) -> np.ndarray:
    raw = base64.b64decode(b64)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), dtype=np.int16)


def _generate(openai_client, model: str, n: int = 1, **extra) -> list[np.ndarray]:
    out = openai_client.images.generate(
        model=model, prompt="a photo of sks toy", n=n, size=f"{SIDE}x{SIDE}", response_format="b64_json",
        extra_body={**EXTRA, **extra},
    )  # fmt: skip
    return [_pixels(d.b64_json) for d in out.data]


def test_adapters_are_listed_and_the_openai_client_gets_pngs(served, client, openai_client):
    engine = served[0]
    listed = client.get("/v1/adapters").json()["data"]
    assert sorted(a["id"] for a in listed) == ["ball", "star"] and engine.skipped == []
    assert client.get("/health").json()["defaults"]["schedulers"] == ["euler"]
    star = _generate(openai_client, "star", n=2)
    assert [im.shape for im in star] == [(SIDE, SIDE, 3)] * 2
    assert (star[0] != star[1]).any()  # seeds 7 and 8
    assert all((a == b).all() for a, b in zip(star, _generate(openai_client, "star", n=2)))  # deterministic
    base = _generate(openai_client, "base")[0]
    half = _generate(openai_client, "star:0.5")[0]
    assert (base != star[0]).any() and (half != star[0]).any() and (half != base).any()  # the adapter and its weight
    assert [a["resident"] for a in client.get("/v1/adapters").json()["data"] if a["id"] == "star"] == [True]


@contextlib.contextmanager
def paused(engine, waiting: int):
    """The step loop sees no work until ``waiting`` requests are queued, then all of them at once."""
    engine.scheduler.has_work = lambda: False
    try:
        yield
        deadline = time.monotonic() + 30
        while len(engine.scheduler.queue) < waiting and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(engine.scheduler.queue) == waiting
    finally:
        del engine.scheduler.has_work
        with engine._cond:
            engine._cond.notify_all()


def test_different_adapters_share_one_transformer_call_per_step_and_equal_each_alone(engine, openai_client):
    calls = []

    def count(module, args, kwargs):
        calls.append(len(args[0] if args else kwargs["hidden_states"]))

    hook = engine.unet.register_forward_pre_hook(count, with_kwargs=True)
    requests = [("star", 1), ("ball", 2), ("base", 1)]
    results: dict = {}
    try:
        before = _generate(openai_client, "star")[0]  # star alone on the device: padded to its own modules
        _generate(openai_client, "ball")  # ball targets to_out.0 too: star is attached again with zeros there
        assert (_generate(openai_client, "star")[0] == before).all()
        loads = engine.stats()["adapter_loads"]
        calls.clear()
        threads = [
            threading.Thread(target=lambda m=m, n=n: results.__setitem__(m, _generate(openai_client, m, n)))
            for m, n in requests
        ]
        with paused(engine, 3):
            for t in threads:
                t.start()
        for t in threads:
            t.join(60)
        assert calls == [4, 4], calls  # two Euler steps, each one call over 1 + 2 + 1 rows
        assert engine.stats()["adapter_loads"] == loads  # switching adapters re-attached nothing
        for model, n in requests:
            alone = _generate(openai_client, model, n)
            for got, want in zip(results[model], alone):
                assert np.abs(got - want).max() <= 1, model  # PNG rounding of latents equal within 1e-6
    finally:
        hook.remove()


def test_a_request_in_a_mixed_batch_equals_it_alone_on_latents(engine):
    def submit(model, n=1, seed=5):
        adapters = {} if model == "base" else {model: 1.0}
        return engine.submit(GenerationRequest("a red dog", adapters=adapters, n=n, size=SIDE, steps=3, seed=seed))

    with engine._lock:
        mixed = [submit("ball", 2), submit("star", 1, seed=9), submit("base")]
    for h in mixed:
        h.result(60)
    assert [h.peak_batch for h in mixed] == [3, 3, 3]
    for h, (model, n, seed) in zip(mixed, [("ball", 2, 5), ("star", 1, 9), ("base", 1, 5)]):
        alone = submit(model, n, seed)
        alone.result(60)
        assert alone.peak_batch == 1
        assert_rel_close(h.latents, alone.latents, 1e-3, model)


def _flux_pipeline(served, loras: dict[str, float], prompt: str, seed: int, steps: int) -> torch.Tensor:
    """diffusers' FluxPipeline on the served folder with ``loras`` {file stem: weight} loaded by
    ``load_lora_weights`` and weighted by ``set_adapters``: final latents [1, C, h, w] (unpacked)."""
    from diffusers import FluxPipeline

    from catfast.integrations.families import family_of

    pipe = FluxPipeline.from_pretrained(served[3], local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    for name in loras:
        pipe.load_lora_weights(str(served[2] / f"{name}.safetensors"), adapter_name=name)
    pipe.set_adapters(list(loras), adapter_weights=list(loras.values()))
    out = pipe(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, height=SIDE,
               width=SIDE, guidance_scale=3.5, output_type="latent").images  # fmt: skip
    side = SIDE // pipe.vae_scale_factor
    return family_of(pipe).unpack(out, side, side)


def test_stacked_and_weighted_adapters_share_a_batch_and_equal_diffusers(served, engine, openai_client):
    """"star:0.8+ball" (one composite adapter of both, exact), "star:0.5", "ball" and the base in ONE batch;
    each equals it alone, and the stacked and the weighted ones equal FluxPipeline with set_adapters weights."""
    asks = [({"star": 0.8, "ball": 1.0}, 9), ({"star": 0.5}, 5), ({"ball": 1.0}, 5), ({}, 5)]

    def submit(adapters, seed):
        return engine.submit(GenerationRequest("a red dog", adapters=adapters, size=SIDE, steps=3, seed=seed,
                                               guidance=3.5))  # fmt: skip

    with engine._lock:
        mixed = [submit(a, s) for a, s in asks]
    for h in mixed:
        h.result(60)
    assert [h.peak_batch for h in mixed] == [4] * 4  # weights and stacks no longer split a batch
    for h, (adapters, seed) in zip(mixed, asks):
        alone = submit(adapters, seed)
        alone.result(60)
        assert_rel_close(h.latents, alone.latents, 1e-3, str(adapters))
    assert_rel_close(mixed[0].latents, _flux_pipeline(served, asks[0][0], "a red dog", 9, 3), 1e-4, "stacked")
    assert_rel_close(mixed[1].latents, _flux_pipeline(served, asks[1][0], "a red dog", 5, 3), 1e-4, "weighted")
    stacked = _generate(openai_client, "star:0.8+ball")[0]  # the same through the official client
    for single in ("star", "ball"):
        assert (stacked != _generate(openai_client, single)[0]).any(), single
    assert len(engine.scheduler.pool.stacks) >= 1  # the composite stays attached for the next request of that mix


def test_more_stacks_in_one_batch_than_the_cache_keeps(engine, monkeypatch):
    """Three stacked mixes in one batch with room for two composites: none is dropped while its batch needs it;
    each request equals it alone; the cache is back to its size after the next batch."""
    monkeypatch.setattr("catfast.serve.dit.STACK_CACHE", 2)
    mixes = [{"star": w, "ball": 1.0} for w in (0.3, 0.6, 0.9)]

    def submit(adapters):
        return engine.submit(GenerationRequest("a red dog", adapters=adapters, size=SIDE, steps=2, seed=4))

    with engine._lock:
        batch = [submit(m) for m in mixes]
    for h in batch:
        h.result(60)
    assert [h.peak_batch for h in batch] == [3, 3, 3]
    for h, mix in zip(batch, mixes):
        alone = submit(mix)
        alone.result(60)
        assert_rel_close(h.latents, alone.latents, 1e-3, str(mix))
    assert len(engine.scheduler.pool.stacks) <= 2


# what the UNet server refuses, refused the same way; and what only a DiT base refuses
REFUSED = [
    ({"prompt": ""}, 400, "prompt"),
    ({"model": "base"}, 400, "prompt is required"),
    ({"prompt": "x" * 5000}, 400, "at most 4000"),
    ({"prompt": "a star", "size": "big"}, 400, "size"),
    ({"prompt": "a star", "steps": 100000}, 400, "steps"),
    ({"prompt": "a star", "steps": 0}, 400, "steps"),
    ({"prompt": "a star", "n": 1000}, 400, "n must be"),
    ({"prompt": "a star", "guidance_scale": 31}, 400, "guidance"),
    ({"prompt": "a star", "guidance_scale": "high"}, 400, "guidance"),
    ({"prompt": "a star", "response_format": "url"}, 400, "b64_json"),
    ({"prompt": "a star", "model": "no-such-adapter"}, 404, "no-such-adapter"),
    ({"prompt": "a star", "model": "star:abc"}, 400, "finite number"),
    ({"prompt": "a star", "model": "star:11"}, 400, "within"),
    ({"prompt": "a star", "model": "../etc"}, 400, "invalid"),
    ({"prompt": "a star", "guidance": 3}, 400, "unknown field"),
    ({"prompt": "a star", "size": "18x16"}, 400, "multiple of 4: the VAE's factor 2 x the flux transformer's 2x2"),
    ({"prompt": "a star", "size": "1024x1024"}, 400, "between 4 and 512"),
    ({"prompt": "a star", "scheduler": "ddim"}, 400, "flow-matching Euler"),
    ({"prompt": "a star", "scheduler": "lms"}, 400, "scheduler"),
]


@pytest.mark.parametrize("body,status,words", REFUSED, ids=[f"{s}-{i}" for i, (_, s, _) in enumerate(REFUSED)])
def test_bad_requests_are_refused_like_the_unet_server(client, body, status, words):
    r = client.post("/v1/images/generations", json={"size": f"{SIDE}x{SIDE}", "steps": 2, **body})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"], r.json()


def test_an_adapter_of_another_family_is_a_400_naming_both(served, client, tiny, tmp_path):
    engine, _, folder, _ = served
    unet = UNet2DConditionModel.from_pretrained(tiny, subfolder="unet")
    write_adapter(random_adapter({"unet": unet}, leaves=("to_q",)), folder / "unet-lora.safetensors")
    try:
        r = client.post("/v1/adapters", json={"name": "unet-lora"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "adapter_family_mismatch" and "\n" not in error["message"]
        assert "a UNet" in error["message"] and "flux transformer (FluxTransformer2DModel)" in error["message"]
        r = client.post("/v1/images/generations", json={"prompt": "a star", "model": "unet-lora", **EXTRA})
        assert r.status_code == 404  # never registered
        # an adapter of the right family that does not fit this transformer: 422 as on a UNet server
        wide = build_transformer("tiny-flux")
        layer = next(m for n, m in wide.named_modules() if n.endswith("attn.to_q"))
        layer.weight = torch.nn.Parameter(torch.zeros(layer.weight.shape[0], layer.weight.shape[1] + 2))
        write_adapter(random_adapter({"transformer": wide}, leaves=("attn.to_q",)), folder / "wide.safetensors")
        r = client.post("/v1/adapters", json={"name": "wide"})
        assert r.status_code == 422 and "does not fit" in r.json()["error"]["message"], r.text
    finally:
        for name in ("unet-lora", "wide"):
            (folder / f"{name}.safetensors").unlink(missing_ok=True)
    assert sorted(a.name for a in engine.adapters()) == ["ball", "star"]


def test_registering_and_removing_an_adapter_while_serving(served, client, openai_client):
    engine, _, folder, _ = served
    shutil.copy(folder / "star.safetensors", folder / "star2.safetensors")
    try:
        assert client.post("/v1/adapters", json={"name": "star2"}).status_code == 201
        same = _generate(openai_client, "star2")[0]
        assert (same == _generate(openai_client, "star")[0]).all()  # the same file: the same picture
        assert client.delete("/v1/adapters/star2").status_code == 200
        r = client.post("/v1/images/generations", json={"prompt": "a star", "model": "star2", **EXTRA})
        assert r.status_code == 404
    finally:
        (folder / "star2.safetensors").unlink(missing_ok=True)


def test_one_device_slot_evicts_and_reattaches(served, engine):
    """max_resident 1: each switch evicts the other adapter (peft delete) and attaches again; the pictures
    stay those of the server with room for both."""
    small, _ = build_app(str(served[3]), str(served[2]), device="cpu", max_resident=1)
    try:
        for model in ("star", "ball", "star"):
            request = GenerationRequest("a red dog", adapters={model: 1.0}, size=SIDE, steps=2, seed=3)
            got = small.submit(request).result(60)
            want = engine.submit(GenerationRequest("a red dog", adapters={model: 1.0}, size=SIDE, steps=2, seed=3))
            want.result(60)
            assert np.array_equal(np.asarray(got[0]), np.asarray(want.result(1)[0])), model
        stats = small.stats()
        assert (stats["adapter_loads"], stats["adapter_evictions"], stats["resident"]) == (3, 2, 1)
    finally:
        small.close()


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-qwenimage"])
def test_sd3_and_qwenimage_serve_mixed_batches_like_flux(tmp_path, name):
    """The same code serves SD3 and Qwen-Image (CFG rows at guidance 3): adapters of different targets and the
    base in one batch, each request equal to it alone."""
    pipeline = init_dit_folder(name, tmp_path / name)
    folder = tmp_path / "adapters"
    folder.mkdir()
    transformer = build_transformer(name)
    for adapter, seed, leaves in (("a", 1, ("to_q", "to_k")), ("b", 2, ("to_v",))):
        write_adapter(
            random_adapter({"transformer": transformer}, seed=seed, leaves=leaves), folder / f"{adapter}.safetensors"
        )
    engine, _ = build_app(str(pipeline), str(folder), device="cpu")
    try:

        def submit(adapters):
            return engine.submit(
                GenerationRequest("a cat", adapters=adapters, size=SIDE, steps=2, seed=4, guidance=3.0)
            )

        models = [{"a": 1.0}, {"b": 1.0}, {}]
        with engine._lock:
            mixed = [submit(m) for m in models]
        for handle, model in zip(mixed, models):
            assert len(handle.result(60)) == 1 and handle.peak_batch == 3
            alone = submit(model)
            alone.result(60)
            assert_rel_close(handle.latents, alone.latents, 1e-3, f"{name} {model}")
    finally:
        engine.close()
