"""Regional compilation of a diffusers UNet: each repeated block compiled in place, not the whole model.

A UNet repeats a few block classes (SD1.5: 16 ``BasicTransformerBlock`` and 22 ``ResnetBlock2D``); compiling
each block on its own lets dynamo reuse one traced graph per class and shape instead of tracing the whole UNet
as one program, which is what OneTrainer and ai-toolkit do to keep compile time low. The row-planned stand-ins
of ``patch_unet`` trace inside these blocks without a graph break (tests/test_compile.py, ``fullgraph=True``).
"""

from __future__ import annotations

import torch

REGIONS = ("transformer_blocks", "resnets")  # the ModuleLists whose items are the repeated blocks


def compile_regions(
    unet: torch.nn.Module, *, backend: str = "inductor", fullgraph: bool = True, **options
) -> list[str]:
    """Compile, in place (``Module.compile``), every block of ``unet`` that is an item of a ``REGIONS`` list;
    returns their names. ``backend`` / ``fullgraph`` / ``options``: as ``torch.compile`` takes them."""
    compiled = []
    for name, module in unet.named_modules():
        parent, _, index = name.rpartition(".")
        if index.isdigit() and parent.rpartition(".")[2] in REGIONS:
            module.compile(backend=backend, fullgraph=fullgraph, **options)
            compiled.append(name)
    return compiled
