"""catfast: a kernel-optimized engine for LoRA adapters on Stable-Diffusion-family UNets.

Public API (importing catfast loads only torch; diffusers, peft, triton and onnx load on first use):
  cat_loss(unet, scheduler, ...)       the CAT objective; mode "auto" (default), "reference" or "fused" (one UNet call)
  merge_lora_ / unmerge_lora_ / swap_lora_   in-place multi-layer LoRA merge (C++ / CUDA extension when built)
  group_norm_silu, fused_cat_loss      fused GroupNorm+SiLU (row-aware backward) and the fused CAT loss
  read_adapter / write_adapter         LoRA safetensors in diffusers/peft and kohya formats
  RowPlan, lora_linear                 the row plan and the row-planned LoRA op (Triton or torch)
  patch_unet / unpatch_unet / row_plan swap a UNet's peft LoRA layers for row-planned ones, and back
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "cat_loss": "catfast.train.objective",
    "CatLossOutput": "catfast.train.objective",
    "merge_lora_": "catfast.ops.merge",
    "unmerge_lora_": "catfast.ops.merge",
    "swap_lora_": "catfast.ops.merge",
    "group_norm_silu": "catfast.ops.groupnorm_silu",
    "fused_cat_loss": "catfast.ops.cat_loss",
    "read_adapter": "catfast.adapters.formats",
    "write_adapter": "catfast.adapters.formats",
    "detect_format": "catfast.adapters.formats",
    "LoraAdapter": "catfast.adapters.adapter",
    "LoraLayer": "catfast.adapters.adapter",
    "RowPlan": "catfast.rows",
    "lora_linear": "catfast.ops.lora",
    "patch_unet": "catfast.integrations.patch",
    "unpatch_unet": "catfast.integrations.patch",
    "row_plan": "catfast.integrations.patch",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib  # lazy: startup

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'catfast' has no attribute {name!r}")
