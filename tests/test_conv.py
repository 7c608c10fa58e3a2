"""catfast/ops/conv.py: the im2col + GEMM convolution and its input gradient against torch's, the frozen
Conv2d that runs the faster algorithm per shape, the timed choice, CATFAST_CONV, and the fused CAT step
with every frozen convolution on the GEMM path against the reference step."""

import copy
import time

import pytest
import torch

import catfast
from catfast.integrations.factory import build_unet
from catfast.integrations.peft_adapters import add_lora
from catfast.integrations.schedulers import training_scheduler
from catfast.ops import conv as conv_ops
from catfast.testing import assert_close_to_ref, assert_rel_close, cat_batch, randomize_lora_

# (C_in, C_out, kernel, stride, padding, dilation, H, W): UNet 3x3 and 1x1, the stride-2 downsampler,
# dilation, odd sizes, and a stride that does not divide the padded size
CASES = [
    (8, 6, 3, 1, 1, 1, 7, 5),
    (8, 6, 1, 1, 0, 1, 4, 4),
    (8, 6, 3, 2, 1, 1, 9, 8),
    (5, 7, 3, 1, 2, 2, 6, 6),
    (4, 3, (3, 1), (2, 1), (0, 1), 1, 8, 5),
]


def _conv(c_in, c_out, k, stride, padding, dilation, bias=True, seed=0):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(c_in, c_out, k, stride=stride, padding=padding, dilation=dilation, bias=bias)
    if bias:
        torch.nn.init.normal_(conv.bias)  # nonzero, so a dropped bias shows
    return conv.requires_grad_(False)


def _args(conv):
    return conv.stride, conv.padding, conv.dilation


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_gemm_convolution_and_input_gradient_equal_torch(case, bias):
    c_in, c_out, k, stride, padding, dilation, h, w = case
    conv = _conv(c_in, c_out, k, stride, padding, dilation, bias)
    x = torch.randn(3, c_in, h, w)
    y = conv_ops.conv2d_gemm(x, conv.weight, conv.bias, *_args(conv))
    want = conv(x)
    assert y.is_contiguous()
    assert_rel_close(y, want, 1e-6, "forward")
    dy = torch.randn_like(want)
    dx = conv_ops.conv2d_input_gemm(x.shape, conv.weight, dy, *_args(conv))
    assert_rel_close(dx, torch.nn.grad.conv2d_input(x.shape, conv.weight, dy, *_args(conv)), 1e-6, "input grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemm_convolution_in_half_precision_is_as_close_as_torchs(dtype):
    conv = _conv(32, 48, 3, 1, 1, 1)
    low = copy.deepcopy(conv).to(dtype)
    x = torch.randn(2, 32, 6, 6)
    ref = conv(x)
    out = conv_ops.conv2d_gemm(x.to(dtype), low.weight, low.bias, *_args(low))
    assert_close_to_ref(out, ref, low(x.to(dtype)), "forward")
    dy = torch.randn_like(ref)
    ref_dx = torch.nn.grad.conv2d_input(x.shape, conv.weight, dy, *_args(conv))
    torch_dx = torch.nn.grad.conv2d_input(x.shape, low.weight, dy.to(dtype), *_args(low))
    dx = conv_ops.conv2d_input_gemm(x.shape, low.weight, dy.to(dtype), *_args(low))
    assert_close_to_ref(dx, ref_dx, torch_dx, "input grad")


@pytest.mark.parametrize("setting", ["gemm", "native", "auto"])
def test_conv2d_by_shape_equals_the_module_forward_and_backward(setting, monkeypatch):
    monkeypatch.setenv(conv_ops.ENV_VAR, setting)
    conv = _conv(8, 6, 3, 2, 1, 1)
    x = torch.randn(3, 8, 9, 9, requires_grad=True)
    y = conv_ops.conv2d_by_shape(x, conv)
    dy = torch.randn_like(y)
    y.backward(dy)
    x2 = x.detach().clone().requires_grad_()
    want = conv(x2)
    want.backward(dy)
    assert_rel_close(y.detach(), want.detach(), 1e-6, "forward")
    assert_rel_close(x.grad, x2.grad, 1e-6, "dx")
    with torch.no_grad():
        assert_rel_close(conv_ops.conv2d_by_shape(x, conv), want.detach(), 1e-6, "no_grad forward")


def test_conv2d_by_shape_saves_only_the_weight(monkeypatch):
    monkeypatch.setenv(conv_ops.ENV_VAR, "gemm")
    conv = _conv(8, 6, 3, 1, 1, 1)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        conv_ops.conv2d_by_shape(x, conv)
    assert len(saved) == 1 and saved[0] is conv.weight  # torch's convolution also saves x


def test_conv2d_by_shape_leaves_trainable_and_unusual_convolutions_to_torch(monkeypatch):
    monkeypatch.setenv(conv_ops.ENV_VAR, "gemm")
    calls = []
    real = conv_ops.conv2d_forward
    monkeypatch.setattr(conv_ops, "conv2d_forward", lambda *a: calls.append(1) or real(*a))
    trainable = _conv(4, 4, 3, 1, 1, 1).requires_grad_(True)
    x = torch.randn(1, 4, 5, 5)
    conv_ops.conv2d_by_shape(x, trainable).sum().backward()
    assert trainable.weight.grad is not None and trainable.weight.grad.abs().sum() > 0
    grouped = torch.nn.Conv2d(4, 4, 3, padding=1, groups=2).requires_grad_(False)
    assert_rel_close(conv_ops.conv2d_by_shape(x, grouped), grouped(x), 1e-6, "grouped")
    reflect = torch.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect").requires_grad_(False)
    assert_rel_close(conv_ops.conv2d_by_shape(x, reflect), reflect(x), 1e-6, "reflect padding")
    assert calls == []  # none of them went through catfast's routed forward (grouped: torch inside it)


def test_timed_choice_takes_gemm_only_when_clearly_faster():
    def slow():
        time.sleep(0.004)

    def fast():
        pass

    assert conv_ops._timed_choice(slow, fast) == "gemm"
    assert conv_ops._timed_choice(fast, slow) == "native"


def test_each_shape_is_timed_once_and_reused(monkeypatch):
    monkeypatch.setenv(conv_ops.ENV_VAR, "auto")
    conv_ops.clear_choices()
    timed = []
    real = conv_ops._timed_choice
    monkeypatch.setattr(conv_ops, "_timed_choice", lambda n, g: timed.append(1) or real(n, g))
    conv = _conv(8, 6, 3, 1, 1, 1)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    for _ in range(3):
        conv_ops.conv2d_by_shape(x, conv).sum().backward()
    assert len(timed) == 2  # the forward and the input gradient, once each
    kinds = sorted(key[0] for key in conv_ops.choices())
    assert kinds == ["forward", "input_grad"] and set(conv_ops.choices().values()) <= {"native", "gemm"}
    conv_ops.conv2d_by_shape(torch.randn(3, 8, 6, 6), conv)  # another batch is another shape
    assert len(timed) == 3
    conv_ops.clear_choices()


def test_large_maps_run_natively_without_timing(monkeypatch):
    monkeypatch.setenv(conv_ops.ENV_VAR, "gemm")  # even forced: the GEMM path is for small maps only
    conv_ops.clear_choices()
    calls = []
    monkeypatch.setattr(conv_ops, "conv2d_gemm", lambda *a: calls.append(1))
    conv = _conv(4, 4, 3, 1, 1, 1)
    x = torch.randn(1, 4, 33, 32, requires_grad=True)  # 1056 positions > 32 x 32
    y = conv_ops.conv2d_by_shape(x, conv)
    y.sum().backward()
    assert calls == [] and conv_ops.choices() == {}
    assert_rel_close(y.detach(), conv(x.detach()), 1e-6, "forward")


def test_bad_setting_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv(conv_ops.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="CATFAST_CONV='fast' is not valid; use one of auto, native, gemm"):
        conv_ops.conv2d_by_shape(torch.randn(1, 4, 5, 5), _conv(4, 4, 3, 1, 1, 1))


@pytest.mark.parametrize("layout", ["one-call", "teacher-first"])
def test_fused_step_with_gemm_convolutions_equals_reference(layout, monkeypatch):
    monkeypatch.setenv("CATFAST_BACKEND", "torch")
    unet = build_unet("tiny", seed=0)
    add_lora(unet, rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"])
    randomize_lora_(unet, seed=1, std=0.1)
    sched, batch = training_scheduler(), cat_batch(2)

    def run(mode, setting, **kw):
        monkeypatch.setenv(conv_ops.ENV_VAR, setting)
        unet.zero_grad(set_to_none=True)
        out = catfast.cat_loss(unet, sched, **batch, mode=mode, **kw)
        out.total.backward()
        return out, {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}

    ref, ref_grads = run("reference", "native")
    fused, grads = run("fused", "gemm", layout=layout)
    assert_rel_close(fused.total.detach(), ref.total.detach(), 1e-5, "loss")
    for name, g in ref_grads.items():
        assert g.abs().sum() > 0
        assert_rel_close(grads[name], g, 1e-4, name)
