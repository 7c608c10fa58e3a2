"""`catfast demo --model dit`: the demo's CAT-vs-plain comparison on its Flux-style DiT base.

``catfast.demo.run.run_demo(model_kind="dit")`` runs the comparison of ``run.py`` unchanged (the same concept,
captions, prompts, training budget through ``catfast.train.trainer.train``, which sends a FluxPipeline
folder to the DiT trainer, scores and grid); this module holds what differs for the DiT base
(catfast/demo/assets/dit_model, ``catfast.demo.dit_pretrain``): sampling. The adapters are loaded by the
pipeline's own ``load_lora_weights`` and every row is sampled in one batched run of catfast's flow sampler
(``catfast.eval.flow_sampler``: flow-matching Euler with the flux family's resolution shift; the model has
no guidance embedding, so no guidance and no CFG rows), at the world's 32 x 32 pixels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from catfast.demo import world
from catfast.integrations.factory_demo_dit import load_flux

SAMPLE = dict(steps=20, guidance=None)  # None: the DiT has no guidance embedding and the flux family no CFG


def sample_blocks(model: Path, adapters: dict[str, Path], rows, sample_steps: int, progress: bool) -> list:
    """PIL images (32 x 32) of ``rows`` (adapter name or None, prompt, seed), in one flow-sampler run over the
    DiT base ``model`` with each adapter file of ``adapters`` (name -> path) loaded under its name."""
    from catfast.eval.flow_sampler import sample_flow_images  # lazy: the flow sampler

    pipe = load_flux(model)
    with warnings.catch_warnings():  # peft warns that a second adapter makes the model multi-adapter: intended
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        for name, path in adapters.items():
            pipe.load_lora_weights(str(path), adapter_name=name)
    images, _ = sample_flow_images(
        pipe,
        [r[1] for r in rows],
        adapters=[r[0] for r in rows],
        seeds=[r[2] for r in rows],
        steps=sample_steps,
        height=world.SIDE,
        width=world.SIDE,
        progress=progress,
    )
    return images
