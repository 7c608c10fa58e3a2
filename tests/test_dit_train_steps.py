"""A few flow-matching CAT steps on each tiny DiT pipeline, end to end through diffusers: captions encoded by
the family's encode_prompt (the pipeline's own text encoders, catfast's offline tokenizers), a fresh peft
LoRA on the family's targets, AdamW on the LoRA alone; the trained adapter, saved with the pipeline's own
``save_lora_weights`` under the family's ``denoiser_key``, loads into a fresh pipeline with
``load_lora_weights`` and predicts the same."""

import pytest
import torch
from diffusers import FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline
from peft.utils import get_peft_model_state_dict

from catfast.integrations.factory_dit import init_dit_folder
from catfast.integrations.families import family_of
from catfast.integrations.peft_adapters import add_lora
from catfast.testing import assert_rel_close
from catfast.train.flow_objective import flow_cat_loss, sample_flow_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

PIPELINES = {"tiny-flux": FluxPipeline, "tiny-sd3": StableDiffusion3Pipeline, "tiny-qwenimage": QwenImagePipeline}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_cat_steps_train_the_lora_and_diffusers_loads_it(tmp_path, name):
    folder = init_dit_folder(name, tmp_path / name)
    pipe = PIPELINES[name].from_pretrained(folder, local_files_only=True)
    family = family_of(folder)
    with torch.no_grad():
        length = None if name == "tiny-qwenimage" else 16
        cond = family.encode_prompt(pipe, ["sks, a photo of a cat"], max_sequence_length=length)
        stripped = family.encode_prompt(pipe, ["a photo of a cat"], max_sequence_length=length)
    model = pipe.transformer
    trainable = add_lora(model, rank=4, alpha=4.0, target_modules=family.default_targets)
    assert trainable and all("lora_" in n for n in trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 8, 8, generator=g)
    noise, sigmas = sample_flow_inputs(family, latents, generator=g)
    losses, cats = [], []
    for _ in range(6):  # one fixed batch: the loss must fall
        out = flow_cat_loss(family, model, latents, noise, sigmas, cond, stripped, cat_weight=1.0)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
        cats.append(float(out.cat))
    assert cats[0] == 0.0  # B = 0 at the start: the adapter equals the base
    assert losses[-1] < losses[0] and cats[-1] > 0

    # diffusers' own format and loader: the same predictions
    PIPELINES[name].save_lora_weights(tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(model))
    fresh = PIPELINES[name].from_pretrained(folder, local_files_only=True)
    fresh.load_lora_weights(tmp_path / "lora")
    with torch.no_grad():
        want = family.predict(model, latents, sigmas, cond)
        got = family.predict(fresh.transformer, latents, sigmas, cond)
        base = family.predict(PIPELINES[name].from_pretrained(folder).transformer, latents, sigmas, cond)
    assert_rel_close(got, want, 1e-5, f"{name} loaded adapter")
    assert not torch.allclose(got, base, atol=1e-4)  # the adapter changes the prediction
