"""catfast.serve.Engine end to end on the tiny model: against diffusers' own pipeline with the adapters
loaded by diffusers (one adapter, two stacked with weights, LoCon convs, mixed ranks), a request's
result independent of what shares its batch, the pool's tiers and invariants, and every refusal."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from catfast.adapters.formats import read_adapter, write_adapter
from catfast.integrations.factory import build_base
from catfast.integrations.peft_adapters import add_lora, extract_adapter
from catfast.serve import Engine, GenerationRequest
from catfast.serve.errors import (
    AdapterLoadError,
    BadRequest,
    Cancelled,
    QueueFull,
    RequestTimeout,
    UnknownAdapter,
)
from catfast.testing import randomize_lora_

ATTN = ("to_q", "to_k", "to_v", "to_out.0")
LOCON = ATTN + ("conv1", "conv2", "proj_in", "time_emb_proj")  # 3x3 convs, 1x1 / linear projections


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """Three adapter files for the tiny base: a (rank 4, attention), b (rank 2, LoCon, alpha != rank),
    k (a's weights in kohya format)."""
    folder = tmp_path_factory.mktemp("adapters")
    src = build_base("tiny")
    add_lora(src.unet, rank=4, alpha=4.0, target_modules=ATTN, adapter_name="a")
    add_lora(src.unet, rank=2, alpha=3.0, target_modules=LOCON, adapter_name="b")
    randomize_lora_(src.unet, seed=1, std=0.3)
    for name in ("a", "b"):
        write_adapter(extract_adapter(src.unet, name), folder / f"{name}.safetensors")
    write_adapter(read_adapter(folder / "a.safetensors"), folder / "kohya" / "k.safetensors", format="kohya")
    return folder


def _engine(adapter_dir=None, **kw) -> Engine:
    return Engine(build_base("tiny"), adapters_dir=adapter_dir, **kw)


def _pipeline(adapter_dir, names_weights):
    """diffusers' StableDiffusionPipeline on a fresh tiny base with the adapters loaded by diffusers."""
    from catfast.integrations.models import diffusers_pipeline

    base = build_base("tiny")
    pipe = diffusers_pipeline(base)
    for name in names_weights:
        pipe.load_lora_weights(str(adapter_dir / f"{name}.safetensors"), adapter_name=name)
    if names_weights:
        pipe.set_adapters(list(names_weights), list(names_weights.values()))
    return pipe


def _diffusers_latents(pipe, prompt, *, steps, guidance, seed, n=1, negative_prompt=""):
    out = pipe(
        prompt,
        negative_prompt=negative_prompt,
        num_images_per_prompt=n,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
    )
    return out.images


def _max_diff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int32) - np.asarray(b, dtype=np.int32)).max())


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ------------------------------------------------------------------------------------- oracle


@pytest.mark.parametrize(
    "mix, guidance, n, sampler",
    [
        ({"a": 1.0}, 5.0, 1, "ddim"),
        ({"a": 0.8, "b": 1.0}, 7.5, 2, "ddim"),
        ({"b": -0.5}, 1.0, 1, "euler"),
        ({}, 5.0, 1, "dpmpp_2m"),
    ],
    ids=["one", "stacked-n2", "locon-no-cfg-euler", "base-dpmpp"],
)
def test_request_equals_diffusers_pipeline_with_its_adapters_loaded(adapter_dir, mix, guidance, n, sampler):
    import diffusers

    from catfast.serve.requests import SCHEDULERS

    request = GenerationRequest("a red car", adapters=mix, steps=3, guidance=guidance, seed=7, n=n, scheduler=sampler)
    with _engine(adapter_dir) as engine:
        handle = engine.submit(request)
        images = handle.result(timeout=120)
        ours = handle.latents
    pipe = _pipeline(adapter_dir, mix)
    pipe.scheduler = getattr(diffusers, SCHEDULERS[sampler]).from_config(pipe.scheduler.config)
    want = _diffusers_latents(pipe, "a red car", steps=3, guidance=guidance, seed=7, n=n)
    assert len(images) == n and images[0].size == (32, 32)
    assert _rel(ours, want) < 1e-4, _rel(ours, want)
    if mix:  # the adapters really change the result
        base = _diffusers_latents(_pipeline(adapter_dir, {}), "a red car", steps=3, guidance=guidance, seed=7, n=n)
        assert _rel(base, want) > 1e-2


def test_sdxl_request_equals_diffusers_sdxl_pipeline(tmp_path):
    from catfast.integrations.models import diffusers_pipeline

    src = build_base("tiny-sdxl").unet
    add_lora(src, rank=4, alpha=2.0, target_modules=ATTN, adapter_name="x")
    randomize_lora_(src, seed=2, std=0.3)
    write_adapter(extract_adapter(src, "x"), tmp_path / "x.safetensors")
    with Engine(build_base("tiny-sdxl"), adapters_dir=tmp_path) as engine:
        with engine._lock:  # one call: the adapter request beside a base request
            handle = engine.submit(GenerationRequest("a cat", adapters={"x": 0.7}, steps=2, guidance=6.0, seed=4))
            engine.submit(GenerationRequest("a dog", steps=2, seed=5))
        handle.result(120)
    assert handle.peak_batch == 2
    base = build_base("tiny-sdxl")
    pipe = diffusers_pipeline(base)
    pipe.load_lora_weights(str(tmp_path / "x.safetensors"), adapter_name="x")
    pipe.set_adapters(["x"], [0.7])
    want = _diffusers_latents(pipe, "a cat", steps=2, guidance=6.0, seed=4, negative_prompt=None)
    assert _rel(handle.latents, want) < 1e-4, _rel(handle.latents, want)
    pipe.disable_lora()
    plain = _diffusers_latents(pipe, "a cat", steps=2, guidance=6.0, seed=4, negative_prompt=None)
    assert _rel(plain, want) > 1e-2  # the adapter really changes the result


def test_text_encoder_layers_apply_to_the_requests_prompts(tmp_path):
    from catfast.adapters.adapter import LoraAdapter

    src = build_base("tiny")
    add_lora(src.unet, rank=4, alpha=4.0, target_modules=ATTN, adapter_name="x")
    add_lora(src.text_encoder, rank=2, alpha=3.0, target_modules=("q_proj", "v_proj", "fc1"), adapter_name="x")
    randomize_lora_(src.unet, seed=3, std=0.3)
    randomize_lora_(src.text_encoder, seed=4, std=0.3)
    layers = {**extract_adapter(src.unet, "x").layers}
    layers.update(extract_adapter(src.text_encoder, "x", component="text_encoder").layers)
    write_adapter(LoraAdapter(layers=layers), tmp_path / "x.safetensors")
    write_adapter(LoraAdapter(layers=layers), tmp_path / "k" / "k.safetensors", format="kohya")
    kw = dict(steps=2, seed=4, negative_prompt="ugly")
    with _engine(tmp_path) as engine:
        engine.load_adapter("k", "k/k.safetensors")
        with engine._lock:  # beside a base request with the same prompt: the text LoRA is this request's only
            handle = engine.submit(GenerationRequest("a cat", adapters={"x": 0.6}, **kw))
            kohya = engine.submit(GenerationRequest("a cat", adapters={"k": 0.6}, **kw))
            engine.submit(GenerationRequest("a cat", steps=2, seed=4))
        handle.result(60), kohya.result(60)
    assert handle.peak_batch == 3
    assert _rel(kohya.latents, handle.latents) < 1e-6  # the same layers read from a kohya file
    pipe = _pipeline(tmp_path, {"x": 0.6})
    want = _diffusers_latents(pipe, "a cat", guidance=5.0, **kw)
    assert _rel(handle.latents, want) < 1e-4, _rel(handle.latents, want)
    # the UNet half alone gives another result: the text-encoder half really matters
    write_adapter(
        LoraAdapter(layers={k: v for k, v in layers.items() if k.startswith("unet.")}), tmp_path / "u" / "x.safetensors"
    )
    unet_only = _diffusers_latents(_pipeline(tmp_path / "u", {"x": 0.6}), "a cat", guidance=5.0, **kw)
    assert _rel(unet_only, want) > 1e-3


def test_kohya_file_serves_like_its_peft_twin(adapter_dir):
    with _engine(adapter_dir) as engine:
        info = engine.load_adapter("k", "kohya/k.safetensors")
        assert info.format == "kohya" and info.rank == 4
        a = engine.submit(GenerationRequest("a cat", adapters={"a": 1.0}, steps=2, seed=3))
        k = engine.submit(GenerationRequest("a cat", adapters={"k": 1.0}, steps=2, seed=3))
        assert _rel(k.result(60) and k.latents, a.result(60) and a.latents) < 1e-6


# ------------------------------------------------------------------------------------- batching


def test_result_does_not_depend_on_what_shares_the_batch(adapter_dir):
    target = dict(prompt="a tree", adapters={"a": 0.7, "b": 1.0}, steps=4, guidance=6.0, seed=11, scheduler="euler")
    with _engine(adapter_dir, max_batch=8) as engine:
        alone = engine.submit(GenerationRequest(**target))
        alone.result(60)
        assert alone.peak_batch == 1
        with engine._lock:  # queue everything before the step loop sees any of it
            others = [
                engine.submit(GenerationRequest("a dog", adapters={"b": 1.0}, steps=2, seed=1)),
                engine.submit(GenerationRequest("a cat", adapters={"a": 1.0}, steps=6, guidance=1.0, seed=2, n=2)),
                engine.submit(GenerationRequest("a sky", steps=3, seed=3, scheduler="dpmpp_2m")),
            ]
            shared = engine.submit(GenerationRequest(**target))
            engine.submit(GenerationRequest("a boat", adapters={"a": 0.3}, steps=5, seed=4))
        shared.result(60)
        for h in others:
            h.result(60)
        assert shared.peak_batch >= 4  # it really shared calls with base, one-adapter and stacked requests
        stats = engine.stats()
    assert _rel(shared.latents, alone.latents) < 1e-3
    assert stats["queue_depth"] == 0 and stats["running"] == 0


def test_seedless_requests_differ_and_sizes_bucket(adapter_dir):
    with _engine(adapter_dir) as engine:
        h1 = engine.submit(GenerationRequest("a cat", steps=1))
        h2 = engine.submit(GenerationRequest("a cat", steps=1, size="16x24"))
        assert h1.result(60)[0].size == (32, 32) and h2.result(60)[0].size == (16, 24)
        assert h1.seed != h2.seed or h1.seed is not None


# ------------------------------------------------------------------------------------- pool


def test_pool_tiers_lru_and_in_use_adapters_are_never_evicted(adapter_dir):
    with _engine(adapter_dir, max_resident=1, host_cache=1) as engine:
        assert {i.name for i in engine.adapters()} == {"a", "b"}
        assert not any(i.resident for i in engine.adapters())
        # two requests, two adapters, one slot: the second waits for the first to finish (never evicted under it)
        first = engine.submit(GenerationRequest("x", adapters={"a": 1.0}, steps=3, seed=1))
        second = engine.submit(GenerationRequest("x", adapters={"b": 1.0}, steps=3, seed=1))
        first.result(60), second.result(60)
        assert first.peak_batch == 1 and second.peak_batch == 1
        s = engine.stats()
        assert s["resident"] == 1 and s["adapter_loads"] == 2 and s["adapter_evictions"] == 1
        # the adapter not resident now was dropped from the host tier (host_cache=1): it is read from disk
        # again and evicts the other; same result as before
        (cold,) = [i.name for i in engine.adapters() if not i.resident]
        earlier = first if cold == "a" else second
        again = engine.submit(GenerationRequest("x", adapters={cold: 1.0}, steps=3, seed=1))
        again.result(60)
        assert _rel(again.latents, earlier.latents) < 1e-5  # the slot rank may have grown since: not bit-equal
        assert engine.stats()["adapter_evictions"] == 2


def test_no_host_cache_still_serves_a_stacked_request(adapter_dir):
    # host_cache=0: every adapter is read from disk when a request needs it; a request needing two must
    # not have its loads evict each other
    with _engine(adapter_dir, host_cache=0) as engine:
        assert engine.generate("x", adapters={"a": 1.0, "b": 0.5}, steps=1, seed=1, timeout_s=60)


def test_unload_while_in_use_finishes_the_request_and_hides_the_name(adapter_dir):
    with _engine(adapter_dir) as engine:
        with engine._lock:
            handle = engine.submit(GenerationRequest("x", adapters={"a": 1.0}, steps=3, seed=1))
            engine.unload_adapter("a")
        assert len(handle.result(60)) == 1
        with pytest.raises(UnknownAdapter, match="'a'"):
            engine.submit(GenerationRequest("x", adapters={"a": 1.0}))
        with pytest.raises(UnknownAdapter):
            engine.unload_adapter("a")
        assert engine.stats()["resident"] == 0 and [i.name for i in engine.adapters()] == ["b"]
        engine.load_adapter("a")  # back from the adapters folder
        assert engine.generate("x", adapters={"a": 1.0}, steps=1, seed=1)


def test_bad_adapter_files_fail_their_own_load_only(adapter_dir, tmp_path):
    (tmp_path / "corrupt.safetensors").write_bytes(b"\x00" * 40)
    other = build_base("tiny-sdxl").unet  # a UNet with other shapes: a mismatched adapter
    add_lora(other, rank=2, alpha=2.0, target_modules=ATTN, adapter_name="x")
    randomize_lora_(other, seed=0)
    write_adapter(extract_adapter(other, "x"), tmp_path / "mismatch.safetensors")
    with _engine(adapter_dir) as engine:
        with pytest.raises(AdapterLoadError, match="corrupt"):
            engine.load_adapter("c", tmp_path / "corrupt.safetensors")
        with pytest.raises(AdapterLoadError, match="does not fit"):
            engine.load_adapter("m", tmp_path / "mismatch.safetensors")
        with pytest.raises(AdapterLoadError, match="no such file"):
            engine.load_adapter("n", tmp_path / "missing.safetensors")
        with pytest.raises(BadRequest, match="leaves the adapters folder"):
            engine.load_adapter("e", "../a.safetensors")
        with pytest.raises(BadRequest, match="invalid"):
            engine.load_adapter("../x", tmp_path / "x.safetensors")
        with pytest.raises(BadRequest, match="reserved"):
            engine.load_adapter("base", adapter_dir / "a.safetensors")
        assert [i.name for i in engine.adapters()] == ["a", "b"]
        assert engine.generate("x", adapters={"a": 1.0}, steps=1, seed=1)


# ------------------------------------------------------------------------------------- requests


def test_bad_requests_say_what_to_change(adapter_dir):
    with _engine(adapter_dir) as engine:
        cases = [
            (dict(prompt=""), "prompt"),
            (dict(prompt="x", steps=0), "steps"),
            (dict(prompt="x", n=0), "n must be"),
            (dict(prompt="x", guidance=float("nan")), "guidance"),
            (dict(prompt="x", adapters={"a": float("inf")}), "weight"),
            (dict(prompt="x", size="big"), "size"),
            (dict(prompt="x", seed=-1), "seed"),
            (dict(prompt="x", scheduler="pndm"), "scheduler must be one of"),
        ]
        for kwargs, match in cases:
            with pytest.raises(BadRequest, match=match):
                GenerationRequest(**kwargs)
        for kwargs, match in [
            (dict(steps=1000), "steps must be at most"),
            (dict(n=100), "n must be at most"),
            (dict(size=33), "multiple of"),
            (dict(size="4096x4096"), "between"),
        ]:
            with pytest.raises(BadRequest, match=match):
                engine.submit(GenerationRequest("x", **kwargs))
        with pytest.raises(UnknownAdapter, match="'nope'"):
            engine.generate("x", adapters={"nope": 1.0})
    with _engine(adapter_dir, max_resident=1) as engine:
        with pytest.raises(BadRequest, match="max_resident"):
            engine.generate("x", adapters={"a": 1.0, "b": 1.0})
        assert engine.stats()["queue_depth"] == 0
        # "base" means no adapter
        assert engine.generate("x", adapters={"base": 1.0}, steps=1, seed=0)


def test_queue_full_cancel_and_timeout(adapter_dir):
    with _engine(adapter_dir, max_queue=2, max_batch=1) as engine:
        with engine._lock:
            running = engine.submit(GenerationRequest("x", steps=30, seed=1))
            queued = engine.submit(GenerationRequest("x", steps=30, seed=2))
            with pytest.raises(QueueFull):
                engine.submit(GenerationRequest("x", steps=1, seed=3))
        queued.cancel()
        with pytest.raises(Cancelled):
            queued.result(60)
        running.cancel()
        with pytest.raises(Cancelled):
            running.result(60)
        late = engine.submit(GenerationRequest("x", steps=150, seed=1, timeout_s=0.3))
        with pytest.raises(RequestTimeout):
            late.result(60)
        assert engine.generate("x", steps=1, seed=1)  # the engine is fine afterwards
        s = engine.stats()
        assert s["queue_depth"] == 0 and s["running"] == 0


def test_events_stream_progress_then_done(adapter_dir):
    async def collect(handle):
        return [ev async for ev in handle.events()]

    with _engine(adapter_dir) as engine:
        handle = engine.submit(GenerationRequest("x", adapters={"b": 1.0}, steps=3, seed=1))
        events = asyncio.run(collect(handle))
        kinds = [e.kind for e in events]
        assert kinds[0] == "queued" and kinds[-1] == "done" and "progress" in kinds
        assert events[-1].images and events[-1].step == 3
        # a finished handle replays its final event
        assert [e.kind for e in asyncio.run(collect(handle))][-1] == "done"


def test_close_cancels_waiting_requests_and_unhooks_the_unet(adapter_dir):
    base = build_base("tiny")
    engine = Engine(base, adapters_dir=adapter_dir, max_batch=1)
    with engine._lock:
        first = engine.submit(GenerationRequest("x", adapters={"a": 1.0}, steps=50, seed=1))
        second = engine.submit(GenerationRequest("x", steps=50, seed=1))
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(60)
    for h in (first, second):
        with pytest.raises(Cancelled):
            h.result(5)
    assert not any(m._forward_hooks for m in base.unet.modules())


def test_demo_engine_generates():
    with Engine("demo") as engine:
        assert engine.native_size == 32
        images = engine.generate("a star on a blue background", steps=2, seed=0)
    assert images[0].size == (32, 32)
