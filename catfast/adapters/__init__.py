"""LoRA adapters: in-memory form, safetensors formats (diffusers/peft, kohya), merge into weights.

Import-light: torch and safetensors only (peft/diffusers integration lives in
``catfast.integrations.peft_adapters``).
"""

from catfast.adapters.adapter import LoraAdapter, LoraLayer
from catfast.adapters.formats import detect_format, read_adapter, write_adapter
from catfast.adapters.merge import merge_adapter_, resolve_targets, unmerge_adapter_

__all__ = [
    "LoraAdapter",
    "LoraLayer",
    "detect_format",
    "merge_adapter_",
    "read_adapter",
    "resolve_targets",
    "unmerge_adapter_",
    "write_adapter",
]
