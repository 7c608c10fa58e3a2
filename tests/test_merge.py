"""The C++ multi-layer LoRA merge against the pure-torch reference and against fp64 ground truth."""

import os

import pytest
import torch

from catfast._ext import EXT, EXT_ERROR
from catfast.ops import merge as merge_ops
from catfast.reference.merge import merge_lora_ref_
from catfast.testing import FLOOR, assert_rel_close

# CI builds the extension with CATFAST_REQUIRE_EXT=1; there its absence is a failure, not a skip.
if os.environ.get("CI") and EXT is None:
    raise RuntimeError(f"catfast._C must be built in CI: {EXT_ERROR}")
needs_ext = pytest.mark.skipif(EXT is None, reason=f"catfast._C not built: {EXT_ERROR}")

# (weight shape, rank): real SD1.5 attention/ff shapes, odd ones, and a 3x3 conv (LoCon)
LAYERS = [
    ((320, 320), 4),
    ((1280, 768), 16),
    ((431, 123), 1),
    ((97, 64), 128),
    ((64, 32, 3, 3), 8),
    ((40, 24, 1, 1), 3),
]


def _layers(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights, downs, ups = [], [], []
    for shape, r in LAYERS:
        weights.append(torch.randn(shape, generator=g).to(dtype))
        downs.append(torch.randn((r, *shape[1:]), generator=g) / shape[1] ** 0.5)
        ups.append(torch.randn((shape[0], r, *([1] * (len(shape) - 2))), generator=g))
    scales = [0.5, 2.0, -1.0, 1 / 16, 1.0, 3.0]
    return weights, downs, ups, scales


def _exact(weights, downs, ups, scales):
    """fp64 ground truth of W + s * B @ A, and the magnitude |W| + |s| |B| @ |A| that bounds fp32
    summation error (which dominates where the sum cancels to nearly zero)."""
    exact, magnitude = [], []
    for w, a, b, s in zip(weights, downs, ups, scales):
        b2, a2 = b.reshape(w.shape[0], -1).double(), a.reshape(a.shape[0], -1).double()
        exact.append(w.double() + s * (b2 @ a2).view(w.shape))
        magnitude.append(w.double().abs() + abs(s) * (b2.abs() @ a2.abs()).view(w.shape))
    return exact, magnitude


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_ext_merge_matches_reference(dtype, monkeypatch):
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    weights, downs, ups, scales = _layers(dtype)
    exact, magnitude = _exact(weights, downs, ups, scales)
    ref = [w.clone() for w in weights]
    naive = [w.clone() for w in weights]  # what a torch user writes in the weight dtype
    merge_lora_ref_(ref, downs, ups, scales)
    for w, a, b, s in zip(naive, downs, ups, scales):
        w += s * (b.reshape(w.shape[0], -1).to(dtype) @ a.reshape(a.shape[0], -1).to(dtype)).view(w.shape)
    merge_ops.merge_lora_(weights, downs, ups, scales)
    for i, (w, r, n, e, m) in enumerate(zip(weights, ref, naive, exact, magnitude)):
        if dtype == torch.float32:
            assert_rel_close(w, r, 1e-6, f"layer {i}")
        else:
            # one rounding of an fp32-accumulated value: the reference's value or its neighbour, up to
            # the fp32 summation error (the two sum in different orders), and never further from the
            # exact result than torch's naive merge
            spacing = torch.finfo(dtype).eps * torch.maximum(w.double().abs(), r.double().abs())
            fp32_sum_err = 4 * torch.finfo(torch.float32).eps * m
            assert ((w.double() - r.double()).abs() <= spacing + fp32_sum_err).all(), f"layer {i}"
            assert (w.double() - e).abs().max() <= (n.double() - e).abs().max() + FLOOR[torch.float32]


@needs_ext
def test_ext_unmerge_restores_weights(monkeypatch):
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    weights, downs, ups, scales = _layers(torch.float32, seed=3)
    before = [w.clone() for w in weights]
    merge_ops.merge_lora_(weights, downs, ups, scales)
    assert any((w - b).abs().max() > 1e-2 for w, b in zip(weights, before))
    merge_ops.unmerge_lora_(weights, downs, ups, scales)
    for i, (w, b) in enumerate(zip(weights, before)):
        assert_rel_close(w, b, 1e-5, f"layer {i}")


@pytest.mark.parametrize("backend", [pytest.param("ext", marks=needs_ext), "torch"])
def test_bad_layer_leaves_every_weight_untouched(backend, monkeypatch):
    monkeypatch.setenv("CATFAST_BACKEND", backend)
    weights, downs, ups, scales = _layers(torch.float32)
    downs[-1] = torch.randn(3, 25, 1, 1)  # wrong fan-in for the last layer
    before = [w.clone() for w in weights]
    with pytest.raises(ValueError, match="layer 5"):
        merge_ops.merge_lora_(weights, downs, ups, scales)
    assert all(torch.equal(w, b) for w, b in zip(weights, before))


def test_dispatch_falls_back_to_torch_with_reasons(monkeypatch):
    monkeypatch.delenv("CATFAST_BACKEND", raising=False)
    w = torch.randn(8, 8, dtype=torch.float64)  # the extension takes fp32/fp16/bf16 only
    a, b = torch.randn(2, 8, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64)
    reasons = merge_ops.ext_not_supported_reasons([w], [a], [b])
    assert any("float32/float16/bfloat16" in r for r in reasons)
    want = w + 0.5 * b @ a
    merge_ops.merge_lora_([w], [a], [b], [0.5])
    assert_rel_close(w, want, 1e-12, "fp64 via reference")
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    with pytest.raises(RuntimeError, match="CATFAST_BACKEND=ext"):
        merge_ops.merge_lora_([w], [a], [b], [0.5])


@needs_ext
def test_bench_merge_times_every_provider_on_real_attention_shapes():
    """The library part of benchmarks/bench_merge.py, on the tiny UNet's attention projections."""
    from catfast.bench.merge import bench_merge
    from catfast.integrations.factory import attention_weight_shapes

    shapes = attention_weight_shapes("tiny")
    result = bench_merge(rank=2, reps=1, model="tiny")
    assert result["layers"] == len(shapes) > 0
    assert result["weight_params"] == sum(a * b for a, b in shapes)
    assert set(result["median_ms"]) == {"ext", "reference", "naive"}
    assert result["speedup_vs_reference"] > 0 and result["speedup_vs_naive"] > 0
