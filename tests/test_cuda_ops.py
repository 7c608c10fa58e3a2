"""The CUDA kernels of catfast._C (csrc/cuda/) against the pure-torch references, in fp32 / bf16 / fp16,
and their bad-input messages. These need a CUDA device and a CUDA build of catfast._C: CI has no GPU, so
they are skipped there (marked ``cuda``; the skip reason says so) and run on a GPU machine with
``pytest -m cuda tests/test_cuda_ops.py``. Where a GPU is present and the extension lacks its CUDA
kernels, the module fails instead of skipping. CI still compiles every kernel (csrc/check_cuda_compile.sh)."""

import pytest
import torch
import torch.nn.functional as F

from catfast._ext import EXT, EXT_ERROR, build_info
from catfast.ops import cat_loss as loss_ops
from catfast.ops import groupnorm_silu as gn_ops
from catfast.ops import merge as merge_ops
from catfast.reference.cat_loss import cat_loss_ref
from catfast.reference.groupnorm_silu import group_norm_silu_backward_ref, group_norm_silu_ref
from catfast.reference.merge import merge_lora_ref_, swap_lora_ref_
from catfast.testing import FLOOR, assert_rel_close

HAVE_CUDA = torch.cuda.is_available()
if HAVE_CUDA and (EXT is None or not hasattr(EXT, "merge_lora_cuda_")):
    raise RuntimeError(
        "a CUDA device is present but catfast._C has no CUDA kernels "
        f"({EXT_ERROR or (build_info() or {}).get('cuda_skipped', 'built without CUDA')}); "
        "rebuild with `python setup.py build_ext --inplace` under a CUDA torch"
    )
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not HAVE_CUDA, reason="needs a CUDA device (not run in CI, which has no GPU)"),
]

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _ext_backend(monkeypatch):
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the references' GEMMs in full fp32, not TF32
    yield
    torch.set_float32_matmul_precision(precision)


def _close(got, exact, torch_val, what):
    """The kernel rule (at most twice the error of torch in the same precision, plus the fp32 floor), plus one
    rounding of the largest value to got's dtype: the kernels round once, and on a handful of values (C = 6
    channels of dweight) torch's own rounding may by chance land closer."""
    err = (got.double() - exact.double()).abs().max().item()
    torch_err = (torch_val.double() - exact.double()).abs().max().item()
    bound = 2 * torch_err + torch.finfo(got.dtype).eps * exact.abs().max().item() + FLOOR[torch.float32]
    assert err <= bound, f"{what}: error {err:.3e} > 2 x torch's {torch_err:.3e} + one rounding + floor"


# (weight shape, rank): SD1.5 attention / ff / conv shapes, odd sizes, ranks across the 32-wide rank chunks
MERGE_LAYERS = [
    ((320, 320), 4),
    ((1280, 768), 16),
    ((5120, 1280), 64),
    ((431, 123), 1),
    ((97, 64), 128),
    ((33, 65), 33),
    ((320, 320, 3, 3), 8),
    ((40, 24, 1, 1), 3),
]


def _merge_layers(w_dtypes, seed=0, rank_shift=0):
    g = torch.Generator().manual_seed(seed)
    weights, downs, ups = [], [], []
    for (shape, r), dt in zip(MERGE_LAYERS, w_dtypes):
        r = max(1, r + rank_shift)
        weights.append(torch.randn(shape, generator=g).to(dt).to(DEV))
        downs.append((torch.randn((r, *shape[1:]), generator=g) / shape[1] ** 0.5).to(DEV))
        ups.append(torch.randn((shape[0], r, *([1] * (len(shape) - 2))), generator=g).to(DEV))
    scales = [0.5, 2.0, -1.0, 1 / 16, 1.0, 3.0, 0.25, -2.0]
    return weights, downs, ups, scales


def _exact(w0, terms):
    """fp64 W + sum s B @ A, and |W| + sum |s| |B| @ |A| (bounds the fp32 summation error)."""
    exact, mag = w0.double(), w0.double().abs()
    for a, b, s in terms:
        b2, a2 = b.reshape(w0.shape[0], -1).double(), a.reshape(a.shape[0], -1).double()
        exact = exact + s * (b2 @ a2).view(w0.shape)
        mag = mag + abs(s) * (b2.abs() @ a2.abs()).view(w0.shape)
    return exact, mag


def _assert_one_rounding(w, exact, mag, what):
    fi = torch.finfo(w.dtype)
    spacing = fi.eps * exact.abs() + fi.eps * fi.tiny  # relative spacing, and the subnormals' absolute one
    fp32_sum_err = 16 * torch.finfo(torch.float32).eps * mag
    bad = (w.double() - exact).abs() > spacing + fp32_sum_err
    assert not bad.any(), f"{what}: {int(bad.sum())} elements further than one rounding from the exact value"


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_merge_matches_exact_and_reference(dtype):
    weights, downs, ups, scales = _merge_layers([dtype] * len(MERGE_LAYERS))
    before = [w.clone() for w in weights]
    ref = [w.clone() for w in weights]
    merge_lora_ref_(ref, downs, ups, scales)
    merge_ops.merge_lora_(weights, downs, ups, scales)
    for i, (w, w0, r) in enumerate(zip(weights, before, ref)):
        exact, mag = _exact(w0, [(downs[i], ups[i], scales[i])])
        _assert_one_rounding(w, exact, mag, f"layer {i}")
        if dtype == torch.float32:
            assert_rel_close(w, r, 2e-6, f"layer {i} vs reference")


def test_cuda_merge_mixed_dtypes_one_call_and_unmerge():
    dts = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16] * 2
    weights, downs, ups, scales = _merge_layers(dts[: len(MERGE_LAYERS)], seed=1)
    downs[1], ups[1] = downs[1].to(torch.bfloat16), ups[1].to(torch.bfloat16)  # low-precision LoRA factors too
    before = [w.clone() for w in weights]
    merge_ops.merge_lora_(weights, downs, ups, scales)
    for i, (w, w0) in enumerate(zip(weights, before)):
        exact, mag = _exact(w0, [(downs[i].float(), ups[i].float(), scales[i])])
        _assert_one_rounding(w, exact, mag, f"layer {i} ({w.dtype})")
    f32 = [i for i, w in enumerate(weights) if w.dtype == torch.float32]
    merge_ops.unmerge_lora_(weights, downs, ups, scales)
    for i in f32:
        assert_rel_close(weights[i], before[i], 1e-5, f"unmerged layer {i}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_swap_matches_reference(dtype):
    weights, downs, ups, scales = _merge_layers([dtype] * len(MERGE_LAYERS), seed=2)
    _, downs2, ups2, _ = _merge_layers([dtype] * len(MERGE_LAYERS), seed=3, rank_shift=3)
    scales2 = [0.7] * len(weights)
    merge_lora_ref_(weights, downs, ups, scales)  # adapter 1 is merged
    before = [w.clone() for w in weights]
    ref = [w.clone() for w in weights]
    swap_lora_ref_(ref, downs, ups, scales, downs2, ups2, scales2)
    merge_ops.swap_lora_(weights, downs, ups, scales, downs2, ups2, scales2)
    for i, (w, w0, r) in enumerate(zip(weights, before, ref)):
        exact, mag = _exact(w0, [(downs2[i], ups2[i], scales2[i]), (downs[i], ups[i], -scales[i])])
        _assert_one_rounding(w, exact, mag, f"layer {i}")
        if dtype == torch.float32:
            assert_rel_close(w, r, 2e-6, f"layer {i} vs reference")


def test_cuda_merge_bad_input_leaves_weights_untouched():
    weights, downs, ups, scales = _merge_layers([torch.float32] * len(MERGE_LAYERS))
    before = [w.clone() for w in weights]
    bad = list(downs)
    bad[-1] = torch.randn(3, 25, 1, 1, device=DEV)
    with pytest.raises(ValueError, match="layer 7"):
        merge_ops.merge_lora_(weights, bad, ups, scales)
    assert all(torch.equal(w, b) for w, b in zip(weights, before))
    with pytest.raises(RuntimeError, match="several devices"):
        merge_ops.merge_lora_(weights, [d.cpu() for d in downs], ups, scales)
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        EXT.merge_lora_cuda_(weights, [downs[0].cpu(), *downs[1:]], ups, scales, [], [], [])
    with pytest.raises(RuntimeError, match="layer 0: weight must be contiguous"):
        EXT.merge_lora_cuda_([weights[0].t(), *weights[1:]], downs, ups, scales, [], [], [])
    with pytest.raises(RuntimeError, match="weight must be float32, float16 or bfloat16"):
        EXT.merge_lora_cuda_([weights[0].double(), *weights[1:]], downs, ups, scales, [], [], [])
    with pytest.raises(RuntimeError, match="layer 0: weight must not be empty"):
        EXT.merge_lora_cuda_([weights[0][:0], *weights[1:]], downs, ups, scales, [], [], [])
    with pytest.raises(RuntimeError, match="second adapter"):
        EXT.merge_lora_cuda_(weights, downs, ups, scales, downs[:1], ups[:1], scales[:1])
    assert all(torch.equal(w, b) for w, b in zip(weights, before))
    merge_ops.merge_lora_([], [], [], [])  # nothing to do


GN_CASES = [((3, 12, 5, 7), 4), ((2, 64, 8, 8), 32), ((4, 6, 1), 3), ((2, 320, 64, 64), 32), ((3, 1280, 8, 8), 32)]


def _gn_inputs(shape, dtype, affine_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype).to(DEV).requires_grad_(True)
    w = torch.randn(shape[1], generator=g).to(affine_dtype).to(DEV).requires_grad_(True)
    b = torch.randn(shape[1], generator=g).to(affine_dtype).to(DEV).requires_grad_(True)
    dy = torch.randn(shape, generator=g).to(dtype).to(DEV)
    return x, w, b, dy


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,groups", GN_CASES)
def test_cuda_group_norm_silu(dtype, shape, groups):
    x, w, b, dy = _gn_inputs(shape, dtype, dtype)
    y = gn_ops.group_norm_silu(x, groups, w, b, 1e-5)
    assert y.dtype == dtype
    exact_y = group_norm_silu_ref(x.detach().double(), groups, w.detach().double(), b.detach().double())
    with torch.no_grad():
        torch_y = F.silu(F.group_norm(x, groups, w, b, 1e-5))  # torch in the same precision
    _close(y, exact_y, torch_y, "y")
    y.backward(dy)
    exact = group_norm_silu_backward_ref(dy.double(), x.double(), groups, w.double(), b.double(), 1e-5)
    xt, wt, bt = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    F.silu(F.group_norm(xt, groups, wt, bt, 1e-5)).backward(dy)
    for name, got, e, t in (("dx", x.grad, exact[0], xt.grad), ("dweight", w.grad, exact[1], wt.grad),
                            ("dbias", b.grad, exact[2], bt.grad)):  # fmt: skip
        _close(got, e, t, name)


def test_cuda_group_norm_silu_fp32_affine_on_bf16_and_row_mask():
    x, w, b, dy = _gn_inputs((4, 64, 16, 16), torch.bfloat16, torch.float32, seed=4)
    grad = torch.tensor([True, False, False, True])
    y = gn_ops.group_norm_silu(x, 32, w, b, grad_samples=grad.tolist())
    y.backward(dy)
    exact = group_norm_silu_backward_ref(dy.double(), x.double(), 32, w.double(), b.double(), 1e-5, grad)
    assert (x.grad[~grad.to(DEV)] == 0).all()
    xt, wt, bt = (t.detach().clone().requires_grad_(True) for t in (x, w, b))
    dyt = dy * grad.to(DEV, dy.dtype).view(-1, 1, 1, 1)
    F.silu(F.group_norm(xt.float(), 32, wt, bt, 1e-5)).to(torch.bfloat16).backward(dyt)
    for name, got, e, t in (("dx", x.grad, exact[0], xt.grad), ("dweight", w.grad, exact[1], wt.grad),
                            ("dbias", b.grad, exact[2], bt.grad)):  # fmt: skip
        _close(got, e, t, name)


def test_cuda_group_norm_silu_bad_input():
    x, w, b, _ = _gn_inputs((2, 12, 4, 4), torch.float32, torch.float32)
    xd = x.detach()
    with pytest.raises(ValueError, match="bias is on cpu"):
        gn_ops.group_norm_silu(x, 4, w, b.detach().cpu())
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        EXT.group_norm_silu_fwd_cuda(xd.transpose(2, 3), None, None, 4, 1e-5)
    with pytest.raises(RuntimeError, match=r"num_groups \(5\) must divide"):
        EXT.group_norm_silu_fwd_cuda(xd, None, None, 5, 1e-5)
    with pytest.raises(RuntimeError, match="weight must be a CUDA tensor"):
        EXT.group_norm_silu_fwd_cuda(xd, w.detach().cpu(), None, 4, 1e-5)
    _, mean, rstd = EXT.group_norm_silu_fwd_cuda(xd, None, None, 4, 1e-5)
    with pytest.raises(RuntimeError, match=r"row_mask must be a contiguous uint8 \[N\]"):
        EXT.group_norm_silu_bwd_cuda(xd, xd, None, None, mean, rstd, torch.ones(3, dtype=torch.uint8, device=DEV), 4)
    with pytest.raises(RuntimeError, match="grad_output must be a contiguous"):
        EXT.group_norm_silu_bwd_cuda(xd.half(), xd, None, None, mean, rstd, None, 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("shape", [(2, 4, 8, 8), (3, 4, 13, 11), (2, 4, 64, 64)])
def test_cuda_cat_loss(dtype, weighted, shape):
    g = torch.Generator().manual_seed(5)
    pred, stripped = (torch.randn(shape, generator=g).to(dtype).to(DEV).requires_grad_(True) for _ in range(2))
    target, teacher = (torch.randn(shape, generator=g).to(DEV) for _ in range(2))
    weights = (torch.rand(shape[0], generator=g) + 0.1).to(DEV) if weighted else None
    ref_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in (pred, target, stripped, teacher)]
    out = loss_ops.fused_cat_loss(pred, target, stripped, teacher, weights=weights, cat_weight=0.7)
    ref = cat_loss_ref(*ref_in, weights, 0.7)
    for name, a, r in zip(("total", "ldm", "cat"), out, ref):
        assert_rel_close(a, r, 2e-6, name)
    (out.total + 0.3 * out.ldm + 2.0 * out.cat).backward()
    (ref[0] + 0.3 * ref[1] + 2.0 * ref[2]).backward()
    tol = 2e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
    assert pred.grad.dtype == dtype
    assert_rel_close(pred.grad, ref_in[0].grad, tol, "d pred")
    assert_rel_close(stripped.grad, ref_in[2].grad, tol, "d pred_stripped")


def test_cuda_cat_loss_bad_input():
    p = torch.randn(2, 4, 6, 6, device=DEV)
    with pytest.raises(ValueError, match="target is on cpu"):
        loss_ops.fused_cat_loss(p, p.cpu())
    with pytest.raises(RuntimeError, match="target must be contiguous"):
        EXT.cat_loss_cuda(p, p.transpose(2, 3), None, None, None, 1.0)
    with pytest.raises(RuntimeError, match="weights must be a CUDA tensor"):
        EXT.cat_loss_cuda(p, p, None, None, torch.ones(2), 1.0)
    with pytest.raises(RuntimeError, match="teacher must be float32, float16 or bfloat16"):
        EXT.cat_loss_cuda(p, p, p, p.double(), None, 1.0)


def test_cuda_ops_choose_the_extension_by_default(monkeypatch):
    monkeypatch.delenv("CATFAST_BACKEND")
    x = torch.randn(2, 8, 4, 4, device=DEV, dtype=torch.bfloat16)
    assert gn_ops.ext_not_supported_reasons(x) == []
    assert loss_ops.ext_not_supported_reasons([x]) == []
    assert merge_ops.ext_not_supported_reasons([x[0, 0]], [x[0, :1, 0]], [x[0, 0, :, :1]]) == []
