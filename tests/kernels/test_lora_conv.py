"""The row-planned LoRA Conv2d (k x k down projection, kohya's LoCon) against the pure-torch reference,
and the reference against peft's own lora.Conv2d: outputs and every gradient, several slots, strides,
teacher samples without an adapter and without grad."""

import pytest
import torch
from peft import LoraConfig, get_peft_model

from catfast.ops.lora_conv import lora_conv2d
from catfast.reference.lora import lora_conv2d_ref
from catfast.rows import NO_ADAPTER, RowPlan
from catfast.testing import assert_rel_close

# (slots, needs_grad, in, out, kernel, stride, padding, rank, S)
CASES = [
    ([0, 0, NO_ADAPTER], [True, True, False], 8, 12, 3, 1, 1, 4, 1),  # the CAT layout, B=1
    ([1, 0, NO_ADAPTER, 1, 0], [True, True, False, False, True], 6, 5, 3, 2, 1, 2, 2),  # mixed slots, stride 2
    ([0, 0], [True, True], 5, 7, 5, 1, 2, 8, 1),  # 5x5 kernel, every sample with grad
]


def _inputs(case, seed=0):
    slots, grad, c_in, c_out, k, stride, padding, r, s = case
    g = torch.Generator().manual_seed(seed)
    n = len(slots)
    base = torch.nn.Conv2d(c_in, c_out, k, stride, padding).requires_grad_(False)
    with torch.no_grad():
        base.weight.copy_(torch.randn(base.weight.shape, generator=g) / (c_in * k * k) ** 0.5)
        base.bias.copy_(torch.randn(c_out, generator=g))
    x = torch.randn(n, c_in, 9, 10, generator=g).requires_grad_()
    a = (torch.randn(s, r, c_in, k, k, generator=g) / (c_in * k * k) ** 0.5).requires_grad_()
    b = torch.randn(s, c_out, r, generator=g).requires_grad_()  # random B: a zero B passes any test
    plan = RowPlan.build(slots, [0.5 + 0.25 * i for i in range(n)], grad)
    return x, base, a, b, plan


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{len(c[0])}-k{c[4]}-s{c[5]}-r{c[7]}-S{c[8]}")
def test_matches_reference_outputs_and_gradients(case):
    x, base, a, b, plan = _inputs(case)
    want = lora_conv2d_ref(x, base.weight, base.bias, a, b, plan, stride=base.stride, padding=base.padding)
    got = lora_conv2d(x, base, a, b, plan)
    assert_rel_close(got.detach(), want.detach(), 1e-5, "y")
    # the teacher samples' outputs are detached in CAT: their dY is zero, as the fused pass assumes
    dy = torch.randn(want.shape, generator=torch.Generator().manual_seed(1)) * plan.needs_grad.view(-1, 1, 1, 1)
    want_grads = torch.autograd.grad(want, (x, a, b), dy)
    got_grads = torch.autograd.grad(got, (x, a, b), dy)
    for name, g_got, g_want in zip(("dx", "da", "db"), got_grads, want_grads):
        assert g_want.abs().sum() > 0
        assert_rel_close(g_got, g_want, 1e-5, name)


def test_reference_is_peft_conv2d_lora():
    """The spec agrees with peft's own lora.Conv2d (3x3 down, 1x1 up, scaling alpha / r)."""
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(6, 10, 3, 2, 1))
    model = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(generator=g)
    x = torch.randn(2, 6, 11, 11, generator=g)
    a = layer.lora_A["default"].weight[None]
    b = layer.lora_B["default"].weight.flatten(1)[None]
    plan = RowPlan.build([0, NO_ADAPTER], [2.0, 0.0], False)
    want = lora_conv2d_ref(x, layer.base_layer.weight, layer.base_layer.bias, a, b, plan, stride=2, padding=1)
    with torch.no_grad():
        assert_rel_close(want[:1], model(x[:1]), 1e-5, "adapter sample")
        with model.disable_adapter():
            assert_rel_close(want[1:], model(x[1:]), 1e-5, "base sample")


def test_bad_input_fails_before_any_kernel():
    x, base, a, b, plan = _inputs(CASES[0])
    with pytest.raises(ValueError, match="row plan has 3 rows but the batch has 2"):
        lora_conv2d(x[:2], base, a, b, plan)
    with pytest.raises(ValueError, match="do not fit the convolution"):
        lora_conv2d(x, base, a[:, :, :, :2], b, plan)
    with pytest.raises(ValueError, match="must be frozen"):
        lora_conv2d(x, base.requires_grad_(True), a, b, plan)
    base.requires_grad_(False)
    with pytest.raises(ValueError, match="lora_a is torch.float64"):
        lora_conv2d(x, base, a.double(), b, plan)
