"""The batched flow sampler (catfast/eval/flow_sampler.py) against diffusers' own pipelines on each tiny DiT:
a batch of rows [adapter a, adapter b, base] (peft LoRAs with random non-zero B, different ranks, alpha !=
rank) with different prompts and seeds, one row-planned transformer call per step; each row's final latents
equal FluxPipeline / StableDiffusion3Pipeline / QwenImagePipeline run for that row alone (``set_adapters`` /
``disable_lora``), and the row alone through the sampler. Measured max relative error (fp32, 1 thread): 4.2e-7
against the pipelines, 4.6e-7 alone against mixed."""

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline
from peft import LoraConfig

from catfast.errors import CatfastError
from catfast.eval.flow_sampler import sample_flow_images, sample_flow_latents
from catfast.integrations.factory_dit import init_dit_folder
from catfast.integrations.families import family_of
from catfast.integrations.patch import patch_report
from catfast.integrations.peft_adapters import randomize_lora_
from catfast.testing import assert_rel_close

pytestmark = pytest.mark.usefixtures("one_thread")

PIPELINES = {"tiny-flux": FluxPipeline, "tiny-sd3": StableDiffusion3Pipeline, "tiny-qwenimage": QwenImagePipeline}
PROMPTS = ["a photo of a cat", "a red dog in the forest", "sks toy on the beach"]
ADAPTERS = ["a", "b", None]
SEEDS = [11, 22, 33]
SIDE = 16  # pixels: 8 x 8 latents (the tiny VAEs' factor 2), 16 image tokens


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    """name -> the tiny pipeline with peft adapters "a" (rank 2) and "b" (rank 4), random A and B."""
    made = {}

    def get(name):
        if name not in made:
            folder = init_dit_folder(name, tmp_path_factory.mktemp("dit") / name)
            pipe = PIPELINES[name].from_pretrained(folder, local_files_only=True)
            pipe.set_progress_bar_config(disable=True)
            targets = list(family_of(pipe).default_targets)
            for adapter, rank in (("a", 2), ("b", 4)):
                pipe.transformer.add_adapter(LoraConfig(r=rank, lora_alpha=3.0, target_modules=targets), adapter)
            randomize_lora_(pipe.transformer, seed=1, std=0.3)
            made[name] = pipe
        return made[name]

    return get


def _pipeline(pipe, prompt: str, adapter: str | None, seed: int, guidance: float) -> torch.Tensor:
    """diffusers' own run of one row: final latents [C, h, w] (Flux and Qwen-Image's packed output unpacked)."""
    family = family_of(pipe)
    if family.name == "qwenimage":
        kwargs = dict(true_cfg_scale=guidance, negative_prompt=" ")  # the sampler's default negative prompt
    else:
        kwargs = dict(guidance_scale=guidance)
    if adapter is None:
        pipe.disable_lora()
    else:
        pipe.set_adapters([adapter])
    try:
        out = pipe(prompt, generator=torch.Generator().manual_seed(seed), num_inference_steps=3, output_type="latent",
                   height=SIDE, width=SIDE, **kwargs).images  # fmt: skip
    finally:
        pipe.enable_lora()
    if family.packs_latents:
        out = family.unpack(out, SIDE // pipe.vae_scale_factor, SIDE // pipe.vae_scale_factor)
    return out[0]


def _sample(pipe, rows, guidance: float) -> torch.Tensor:
    prompts, adapters, seeds = [PROMPTS[i] for i in rows], [ADAPTERS[i] for i in rows], [SEEDS[i] for i in rows]
    return sample_flow_latents(pipe, prompts, adapters=adapters, seeds=seeds, steps=3, guidance=guidance,
                               height=SIDE, width=SIDE)  # fmt: skip


@pytest.mark.parametrize(
    "name, guidance",
    [("tiny-flux", 3.0), ("tiny-sd3", 3.0), ("tiny-sd3", 1.0), ("tiny-qwenimage", 3.0), ("tiny-qwenimage", 1.0)],
)
def test_each_row_equals_the_pipeline_alone(pipes, name, guidance):
    """Flux 3.0: guidance embedding (not the family's training value 3.5); SD3 / Qwen-Image 3.0: CFG rows
    (Qwen-Image's norm rescale), 1.0: cond rows only."""
    pipe = pipes(name)
    got = _sample(pipe, [0, 1, 2], guidance)
    assert got.shape == (3, 16, 8, 8)
    assert patch_report(pipe.transformer) is None  # the temporary patch was undone
    for i in range(3):
        assert_rel_close(got[i], _pipeline(pipe, PROMPTS[i], ADAPTERS[i], SEEDS[i], guidance), 1e-4, f"row {i}")
    # the adapters matter: row 0 without its adapter is another picture
    base = _pipeline(pipe, PROMPTS[0], None, SEEDS[0], guidance)
    assert (got[0] - base).abs().max() > 1e-2 * base.abs().max()


@pytest.mark.parametrize("name", list(PIPELINES))
def test_a_row_alone_equals_the_row_in_the_mixed_batch(pipes, name):
    pipe = pipes(name)
    mixed = _sample(pipe, [0, 1, 2], 3.0)
    for i in range(3):
        assert_rel_close(_sample(pipe, [i], 3.0)[0], mixed[i], 1e-4, f"row {i} alone")
    # the same adapter on every row (no base row: CFG's two halves in the same order)
    same = sample_flow_latents(pipe, PROMPTS[:2], adapters=["b", "b"], seeds=SEEDS[1::-1], steps=3, guidance=3.0,
                               height=SIDE, width=SIDE)  # fmt: skip
    for i in range(2):
        alone = sample_flow_latents(pipe, [PROMPTS[i]], adapters=["b"], seeds=[SEEDS[1 - i]], steps=3, guidance=3.0,
                                    height=SIDE, width=SIDE)  # fmt: skip
        assert_rel_close(same[i], alone[0], 1e-4, f"adapter b, row {i}")


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-qwenimage"])
def test_images_are_the_decoded_latents(pipes, name):
    pipe = pipes(name)
    images, latents = sample_flow_images(pipe, PROMPTS[:2], adapters=["a", None], seeds=SEEDS[:2], steps=2,
                                         height=SIDE, width=SIDE)  # fmt: skip
    assert [im.size for im in images] == [(SIDE, SIDE)] * 2 and latents.shape == (2, 16, 8, 8)
    with torch.no_grad():
        pixels = family_of(pipe).decode_latents(pipe.vae, latents[1:])
    want = pipe.image_processor.postprocess(pixels, output_type="np")
    got = torch.from_numpy(np.asarray(images[1], dtype=np.float32) / 255)
    assert (got - torch.from_numpy(want[0])).abs().max() <= 1 / 255 + 1e-6


def test_bad_input_is_one_line(pipes):
    pipe = pipes("tiny-flux")
    with pytest.raises(CatfastError, match=r"no adapter named 'c' \(it has \['a', 'b'\]\)") as e:
        sample_flow_latents(pipe, ["x"], adapters=["c"], seeds=[0], steps=1, height=SIDE, width=SIDE)
    assert "\n" not in str(e.value)
    with pytest.raises(CatfastError, match="multiples of 4") as e:
        sample_flow_latents(pipe, ["x"], adapters=[None], seeds=[0], steps=1, height=18, width=SIDE)
    assert "\n" not in str(e.value) and "18 x 16" in str(e.value)
    with pytest.raises(CatfastError, match="equal length"):
        sample_flow_latents(pipe, ["x", "y"], adapters=[None], seeds=[0], steps=1, height=SIDE, width=SIDE)
    pipe.disable_lora()  # disabled adapters would ignore the row plan: refused, not silently the base model
    try:
        with pytest.raises(CatfastError, match="disabled"):
            sample_flow_latents(pipe, ["x"], adapters=["a"], seeds=[0], steps=1, height=SIDE, width=SIDE)
    finally:
        pipe.enable_lora()
    assert patch_report(pipe.transformer) is None
