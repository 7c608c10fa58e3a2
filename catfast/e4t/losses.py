"""E4T's two regularizers, shared by domain pre-training and personalization.

- Embedding: ``||v* - v_class||^2 / ||v_class||^2`` per concept (E4T's L2 on the predicted embedding,
  taken on the offset from the class word and relative to that word's norm, so the weight does not
  depend on the text encoder's embedding scale; the demo model's embeddings have norm ~0.16).
- Offsets: the mean over LoRA layers of ``||scale * B A||_F^2 / ||W||_F^2``, the squared relative size of
  each weight offset (computed as ``sum((A A^T) * (B^T B))`` without forming B A).
"""

from __future__ import annotations

import torch

from catfast.integrations.peft_adapters import adapter_lora_layers


def embedding_penalty(v: torch.Tensor, v_class: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ||v - v_class||^2 / ||v_class||^2; v, v_class: [N, D] (or [D])."""
    v, v_class = torch.atleast_2d(v), torch.atleast_2d(v_class)
    return ((v - v_class).pow(2).sum(-1) / v_class.pow(2).sum(-1)).mean()


def lora_parameters(model: torch.nn.Module, adapter_name: str) -> list[torch.nn.Parameter]:
    """The A and B weights of adapter ``adapter_name`` (made trainable)."""
    params = []
    for _, m in adapter_lora_layers(model, adapter_name):
        for p in (m.lora_A[adapter_name].weight, m.lora_B[adapter_name].weight):
            p.requires_grad_(True)
            params.append(p)
    return params


def offset_penalty(model: torch.nn.Module, adapter_name: str) -> torch.Tensor:
    """Mean over the adapter's layers of ||scale * B A||_F^2 / ||W||_F^2 (module docstring)."""
    terms = []
    for _, m in adapter_lora_layers(model, adapter_name):
        a = m.lora_A[adapter_name].weight.flatten(1)
        b = m.lora_B[adapter_name].weight.flatten(1)
        scale = m.scaling[adapter_name]
        w = m.get_base_layer().weight
        terms.append(scale**2 * ((a @ a.T) * (b.T @ b)).sum() / w.detach().float().pow(2).sum())
    return torch.stack(terms).mean()
