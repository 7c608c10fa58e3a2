"""The defaults a base trains with: the CAT paper's recipe, the shipped demo's, or the DiT recipe for a
diffusion transformer's pipeline folder, and which flow-matching family such a folder is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from catfast.errors import CatfastError

# Rank, lr, batch size, steps and mirror images left unset follow the base (`recipe_for`): the CAT paper's SD1.5
# values, or on the shipped demo model the demo's recipe (`catfast demo` trains with it: catfast/demo/run.py's
# TRAIN and UNET_EXTRA). The demo's is without mirror images: its objects have diagonal stripes, which a mirror
# turns the other way (the demo's CAT star read 0.075 identity accuracy with them, 0.65 without).
PAPER_RECIPE = dict(rank=1, lr=1e-4, batch_size=1, steps=900, random_flip=True)
DEMO_RECIPE = dict(rank=16, lr=1e-3, batch_size=4, steps=300, random_flip=False)
# A diffusion transformer (train/flow_trainer.py): diffusers' train_dreambooth_lora_flux.py README example's lr,
# batch and steps (1e-4, 1, 500), at rank 16 (its rank 4 is a smoke value; 16 is the common Flux LoRA rank)
DIT_RECIPE = dict(rank=16, lr=1e-4, batch_size=1, steps=500, random_flip=True)


def recipe_for(base: str | None) -> tuple[str, dict[str, Any]]:
    """(name, values) of the defaults of rank, lr, batch_size, steps and random_flip for ``base``: the demo's recipe on
    the shipped demo model (``demo``, or its folder), else the CAT paper's."""
    if base is not None:
        from catfast.integrations.models import is_demo_base  # lazy: startup

        if is_demo_base(base):
            return "the demo's recipe (--base demo)", dict(DEMO_RECIPE)
        family = dit_family(base)
        if family is not None:
            return f"the DiT recipe ({family.name})", dict(DIT_RECIPE)
    return "the CAT paper's SD1.5 recipe", dict(PAPER_RECIPE)


def dit_family(base: str | None):
    """The model family (``integrations.families``) of ``base`` when it is a diffusers pipeline folder of a
    diffusion transformer (Flux, SD3, Qwen-Image), which `catfast train` trains with train/flow_trainer.py;
    None for anything else (UNet folders, files, hub ids, demo, and pipeline classes no family knows: the UNet
    loader handles or names them, as before)."""
    if base is None or not (Path(base).expanduser() / "model_index.json").is_file():
        return None
    from catfast.integrations.families import family_of  # lazy: torch

    try:
        family = family_of(Path(base).expanduser())
    except CatfastError:
        return None
    return family if family.flow is not None else None
