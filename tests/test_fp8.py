"""``--base-dtype fp8``: frozen weights stored as float8 e4m3 with per-output-channel scales.

The quantization against e4m3's rounding bound; ``fp8_linear`` (torch path, and the Triton kernel in the CPU
interpreter / on CUDA) against ``x @ dequant(W).T + b``; ``Fp8Linear`` against the ``nn.Linear`` holding the
dequantized weight (forward, input gradient, what autograd saves); a tiny-flux transformer with a random-B peft
LoRA, quantized, against the same model with its weights replaced by their dequantized values (LoRA gradients of
the CAT loss); parameter bytes; ``catfast train --base-dtype fp8`` on tiny-flux, and its refusals."""

import copy
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from catfast.cli import main
from catfast.errors import CatfastError
from catfast.integrations.factory_dit import FAMILY_OF_NAME, build_transformer, init_dit_folder
from catfast.integrations.families import family_of
from catfast.nn.fp8_linear import Fp8Linear, quantize_frozen_linears_, tensor_bytes
from catfast.ops.fp8 import dequantize_fp8, fp8_linear, quantize_fp8, require_fp8, rounding_bound
from catfast.testing import assert_close_to_ref, assert_rel_close, lora_transformer, make_data
from catfast.train.config import ConfigError, TrainConfig
from catfast.train.flow_objective import flow_cat_loss
from catfast.train.flow_trainer import check_supported

pytestmark = pytest.mark.usefixtures("one_thread")

TRITON_CPU = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="no interpreter: cuda variant runs")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: run on a GPU (benchmarks/gpu.sh)")
TRITON_DEVICES = [pytest.param("cpu", marks=TRITON_CPU), pytest.param("cuda", marks=[pytest.mark.cuda, CUDA])]


def _weight(out: int = 37, inp: int = 53, seed: int = 0) -> torch.Tensor:
    """Rows of very different magnitudes, a zero row, and values deep in e4m3's subnormal range of their row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * torch.logspace(-4, 2, out)[:, None]
    w[3] = 0
    w[5, :10] *= 1e-5  # |w| / scale below 2^-6: subnormal e4m3
    return w


def test_round_trip_is_within_e4m3_rounding():
    w = _weight()
    w8, scale = quantize_fp8(w)
    assert w8.dtype == torch.float8_e4m3fn and w8.shape == w.shape and scale.dtype == torch.float32
    assert scale[3] == 1 and (dequantize_fp8(w8, scale)[3] == 0).all()  # a zero row: scale 1, zeros back
    assert torch.equal(scale, w.abs().amax(1).where(w.abs().amax(1) > 0, torch.tensor(448.0)) / 448)
    err = (dequantize_fp8(w8, scale) - w).abs()
    bound = rounding_bound(w, scale)
    assert (err <= bound * (1 + 1e-6)).all(), (err / bound).max()
    assert (err / bound).max() > 0.5  # the bound is reached: it is e4m3's, not a loose one
    sub = (w[5, :10].abs() / scale[5]) < 2**-6
    assert sub.all() and (err[5, :10] <= 2**-10 * scale[5] * (1 + 1e-6)).all()
    # the row's largest value is 448 exactly: no saturation, no NaN
    assert torch.isfinite(w8.float()).all() and w8.float().abs().amax(1)[torch.arange(37) != 3].eq(448).all()
    # a weight larger than one CPU chunk (2^18 elements) dequantizes as in one piece
    big8, big_scale = quantize_fp8(torch.randn(700, 1000))
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize_fp8(big8, big_scale, dtype), (big8.float() * big_scale[:, None]).to(dtype))
    # a bf16 weight quantizes as its fp32 values
    w8_bf16, scale_bf16 = quantize_fp8(w.bfloat16())
    assert torch.equal(scale_bf16, quantize_fp8(w.bfloat16().float())[1])
    assert torch.equal(w8_bf16.view(torch.uint8), quantize_fp8(w.bfloat16().float())[0].view(torch.uint8))


def test_fp8_linear_against_the_dequantized_weight():
    w, b = _weight(), torch.randn(37)
    w8, scale = quantize_fp8(w)
    x = torch.randn(2, 19, 53)
    y = fp8_linear(x, w8, scale, b, backend="torch")
    ref = F.linear(x, dequantize_fp8(w8, scale), b)
    assert_rel_close(y, ref, 1e-5, "fp32 against dequant(W)")  # the same weights: fp32 rounding apart
    # against the unquantized weight: within 2x the e4m3 rounding bound carried through the GEMM
    bound = x.abs() @ rounding_bound(w, scale).T
    assert ((y - F.linear(x, w, b)).abs() <= 2 * bound + 1e-5).all()
    # bf16 / fp16 compute: catfast's error against the fp32 result is at most twice torch's own
    for dtype in (torch.bfloat16, torch.float16):
        xl = x.to(dtype)
        ref32 = F.linear(xl.float(), dequantize_fp8(w8, scale), b)
        lowp = F.linear(xl, dequantize_fp8(w8, scale, dtype), b.to(dtype))
        assert_close_to_ref(fp8_linear(xl, w8, scale, b.to(dtype), backend="torch"), ref32, lowp, f"{dtype}")


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_kernel_against_the_torch_path(device, dtype, bias):
    """The fused kernel (fp8 tiles loaded and converted in the K loop) against the torch path: odd shapes
    (38 rows, in 53, out 37: every tile masked), forward and input gradient."""
    from catfast.kernels import launched

    w8, scale = quantize_fp8(_weight().to(device))
    b = torch.randn(37, device=device).to(dtype) if bias else None
    x = torch.randn(2, 19, 53, device=device, dtype=dtype)
    dy = torch.randn(2, 19, 37, device=device, dtype=dtype)
    deq = dequantize_fp8(w8, scale)
    ref32 = F.linear(x.float(), deq, None if b is None else b.float())
    dx32 = dy.float() @ deq
    lowp = F.linear(x, dequantize_fp8(w8, scale, dtype), b)
    dx_lowp = dy @ dequantize_fp8(w8, scale, dtype)
    got = {}
    for backend in ("triton", "torch"):
        xg = x.clone().requires_grad_()
        before = launched["fp8_gemm"]
        y = fp8_linear(xg, w8, scale, b, backend=backend)
        y.backward(dy)
        assert launched["fp8_gemm"] - before == (2 if backend == "triton" else 0)  # forward and dX: one each
        got[backend] = (y.detach(), xg.grad)
    for backend, (y, dx) in got.items():
        assert y.dtype == dtype and dx.dtype == dtype
        if dtype == torch.float32:
            assert_rel_close(y, ref32, 1e-5, f"{backend} y")
            assert_rel_close(dx, dx32, 1e-5, f"{backend} dx")
        else:
            assert_close_to_ref(y, ref32, lowp, f"{backend} y")
            assert_close_to_ref(dx, dx32, dx_lowp, f"{backend} dx")


def test_the_interpreter_converts_every_e4m3_value():
    """Every finite e4m3 bit pattern (subnormals, +-448, both zeros) through the kernel's load-and-convert."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no interpreter")
    bits = torch.arange(256, dtype=torch.uint8)
    values = bits.view(torch.float8_e4m3fn)
    finite = torch.isfinite(values.float())
    w8 = values[finite].reshape(-1, 1)  # [254, 1]: one input feature, one output per pattern
    x = torch.ones(1, 1)
    y = fp8_linear(x, w8, torch.ones(w8.shape[0]), backend="triton")
    assert torch.equal(y[0], w8[:, 0].float())


def test_fp8linear_forward_input_gradient_and_saved_tensors():
    torch.manual_seed(0)
    linear = torch.nn.Linear(53, 37).requires_grad_(False)
    linear.weight.copy_(_weight())
    fp8 = Fp8Linear.from_linear(linear)
    assert not any(p.requires_grad for p in fp8.parameters()) and fp8.weight_fp8.dtype == torch.float8_e4m3fn
    ref = torch.nn.Linear(53, 37).requires_grad_(False)
    ref.weight.copy_(fp8.dequantized())
    ref.bias.copy_(linear.bias)
    x = torch.randn(3, 11, 53, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fp8(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    ref(xr).backward(dy)
    assert_rel_close(y, ref(xr), 1e-5, "forward")
    assert_rel_close(x.grad, xr.grad, 1e-5, "input gradient")
    # autograd keeps the fp8 weight and its scales only: no full-precision weight, no activation
    assert sorted((str(t.dtype), tuple(t.shape)) for t in saved) == [("torch.float32", (37,)),
                                                                      ("torch.float8_e4m3fn", (37, 53))]  # fmt: skip
    # .to(dtype) casts the bias only; the fp8 weight and the fp32 scales keep their dtypes
    fp8.to(torch.bfloat16)
    assert fp8.bias.dtype == torch.bfloat16 and fp8.weight_fp8.dtype == torch.float8_e4m3fn
    assert fp8.weight_scale.dtype == torch.float32
    assert tensor_bytes(fp8) == 37 * 53 + 4 * 37 + 2 * 37


def _count_linears(model) -> tuple[int, int]:
    """(frozen nn.Linear outside lora_A / lora_B, peft LoRA layers)."""
    frozen = sum(
        type(m) is torch.nn.Linear and not any(p.startswith("lora_") for p in n.split("."))
        for n, m in model.named_modules()
    )
    return frozen, sum(hasattr(m, "lora_A") and hasattr(m, "base_layer") for m in model.modules())


def _cat_gradients(family, model, seed: int = 0):
    """The CAT loss (reference mode) of one tiny-flux batch and the LoRA parameters' gradients."""
    g = torch.Generator().manual_seed(seed)
    latents, noise = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    sigmas = torch.tensor([0.3, 0.8])

    def cond():
        return {
            "prompt_embeds": torch.randn(2, 7, 32, generator=g),
            "pooled_prompt_embeds": torch.randn(2, 32, generator=g),
        }

    c, c_stripped = cond(), cond()
    model.zero_grad(set_to_none=True)
    out = flow_cat_loss(family, model, latents, noise, sigmas, c, c_stripped, cat_weight=1.0, mode="reference")
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_quantized_lora_transformer_matches_its_dequantized_twin():
    family, model, _ = lora_transformer("tiny-flux")  # B random (std 0.3)
    frozen, peft_layers = _count_linears(model)
    twin, unquantized = copy.deepcopy(model), copy.deepcopy(model)
    report = quantize_frozen_linears_(model)
    assert len(report.quantized) == frozen and peft_layers > 0
    assert _count_linears(model)[0] == 0  # every frozen Linear went, the peft layers' base layers included
    bases = [m.base_layer for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert len(bases) == peft_layers and all(isinstance(b, Fp8Linear) for b in bases)
    assert all(type(m.lora_B["default"]) is torch.nn.Linear for m in model.modules() if hasattr(m, "lora_B"))
    with torch.no_grad():
        for name in report.quantized:
            twin.get_submodule(name).weight.copy_(model.get_submodule(name).dequantized())
    loss, grads = _cat_gradients(family, model)
    loss_twin, grads_twin = _cat_gradients(family, twin)
    assert grads and grads.keys() == grads_twin.keys()
    assert_rel_close(loss, loss_twin, 1e-5, "CAT loss")
    assert (loss - _cat_gradients(family, unquantized)[0]).abs() > 1e-4 * loss.abs()  # the weights did change
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        assert_rel_close(grad, grads_twin[name], 1e-5, name)


def test_parameter_bytes_halve_bf16():
    """tiny-flux (bf16) holds exactly 1 byte a weight plus a 4-byte scale per output; at FLUX.1's widths
    (flux-narrow and FLUX.1-dev, shapes only, on the meta device) the quantized layers are <= 0.55x of bf16."""
    model = build_transformer("tiny-flux").to(torch.bfloat16).requires_grad_(False)
    want = sum(m.weight.numel() + 4 * m.out_features + (2 * m.out_features if m.bias is not None else 0)
               for m in model.modules() if type(m) is torch.nn.Linear)  # fmt: skip
    report = quantize_frozen_linears_(model)
    assert report.layer_bytes_after == want and report.model_bytes_after == tensor_bytes(model)
    assert report.layer_bytes_after < 0.56 * report.layer_bytes_before  # 32-wide: the scales are 6 % more
    for name in ("flux-narrow", "flux-dev"):
        meta = build_transformer(name, device="meta").to(torch.bfloat16).requires_grad_(False)
        report = quantize_frozen_linears_(meta)
        assert report.layer_bytes_after <= 0.55 * report.layer_bytes_before, (name, report.line())
        assert report.model_bytes_after <= 0.55 * report.model_bytes_before, (name, report.line())
    assert FAMILY_OF_NAME["flux-dev"] == "flux" and report.model_bytes_before > 23e9  # FLUX.1-dev: 11.9 B in bf16


@pytest.fixture(scope="module")
def flux_folder(tmp_path_factory):
    return init_dit_folder("tiny-flux", tmp_path_factory.mktemp("dits") / "tiny-flux")


def test_train_two_steps_with_an_fp8_base(flux_folder, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="catfast.train")
    data = make_data(tmp_path / "data", n=2)
    out = tmp_path / "out"
    args = ["train", "--base", flux_folder, "--data", data, "--trigger", "sks", "--out", out, "--steps", "2"]
    args += ["--base-dtype", "fp8", "--mixed-precision", "bf16", "--rank", "4", "--resolution", "32"]
    result = CliRunner().invoke(main, [*map(str, args), "--no-progress", "--threads", "1"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2] and all(r["mode"] == "reference" for r in lines)
    assert "fp8 base" in lines[0]["mode_reason"]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["ldm"], r["cat"]])).all() for r in lines)
    quantized = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("fp8 base:"))
    assert "30 frozen Linears" in quantized, quantized
    assert json.loads((out / "config.json").read_text())["base_dtype"] == "fp8"
    assert (out / "adapter.safetensors").is_file()


def test_fp8_refusals(flux_folder, tiny, tmp_path, monkeypatch):
    values = dict(data=str(tmp_path), trigger="sks", out=str(tmp_path / "out"), base_dtype="fp8")
    with pytest.raises(ConfigError, match="fp8 is for DiT bases") as e:
        TrainConfig(base=str(tiny), **values).validate()  # a UNet base
    assert "\n" not in str(e.value)
    config = TrainConfig(base=str(flux_folder), mode="fused", **values)
    config.validate()
    with pytest.raises(CatfastError, match="--mode fused with --base-dtype fp8"):
        check_supported(config, family_of(flux_folder), 1)
    monkeypatch.delattr(torch, "float8_e4m3fn")  # a torch without float8 (before 2.1)
    for call in (require_fp8, TrainConfig(base=str(flux_folder), **values).validate):
        with pytest.raises(CatfastError, match="needs torch.float8_e4m3fn") as e:
            call()
        assert "\n" not in str(e.value)
