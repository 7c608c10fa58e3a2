"""Test helpers shared by catfast's tests and benchmarks: the one home of numerical tolerances, and
builders for non-vacuous LoRA fixtures (peft initialises lora_B to zero, which makes every output
test pass; these helpers randomise it)."""

from __future__ import annotations

import torch

# Floors added to the "at most twice torch's own error" rule (docs/design.md, "Adding a kernel").
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max(max|expected|, tiny), computed in fp64."""
    a, e = actual.double(), expected.double()
    return ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str = "tensor") -> None:
    """Assert ``rel_err(actual, expected) <= rtol`` with a message naming the worst element."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    err = rel_err(actual, expected)
    if not err <= rtol:
        diff = (actual.double() - expected.double()).abs()
        idx = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
        raise AssertionError(
            f"{what}: relative error {err:.3e} > {rtol:.1e} "
            f"(worst at {idx}: {actual[idx].item()} vs {expected[idx].item()})"
        )


def assert_close_to_ref(out: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor, what: str = "out") -> None:
    """Kernel rule: ``max|out - ref32| <= 2 * max|ref_lowp - ref32| + FLOOR[out.dtype]``."""
    err = (out.double() - ref_fp32.double()).abs().max().item()
    torch_err = (ref_lowp.double() - ref_fp32.double()).abs().max().item()
    bound = 2 * torch_err + FLOOR[out.dtype]
    if not err <= bound:
        raise AssertionError(f"{what}: error {err:.3e} > 2 x torch's {torch_err:.3e} + floor {FLOOR[out.dtype]:.0e}")


@torch.no_grad()
def randomize_lora_(module: torch.nn.Module, *, seed: int = 0, std: float = 0.1) -> int:
    """Fill every peft ``lora_A``/``lora_B`` weight with seeded N(0, std^2) values; returns how many."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for name, p in module.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            p.copy_(torch.randn(p.shape, generator=gen) * std)
            count += 1
    if count == 0:
        raise ValueError("no peft LoRA parameters found to randomise")
    return count


def flop_counter() -> "torch.utils.flop_counter.FlopCounterMode":
    """A silent ``FlopCounterMode`` that also counts the CPU flash-attention kernels (torch 2.13 has no
    formula for them, so on a CPU every attention core counted 0 FLOPs), with torch's own SDPA formulas."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward,
        },
    )
