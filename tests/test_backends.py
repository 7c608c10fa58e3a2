"""catfast.backends: CATFAST_BACKEND parsed in one place, every op routed through choose(), clear errors
when a forced backend cannot run, and the table `catfast env` prints."""

import json
import os
import subprocess
import sys

import pytest
import torch

from catfast import backends
from catfast.ops.cat_loss import fused_cat_loss
from catfast.ops.groupnorm_silu import group_norm_silu
from catfast.ops.lora import lora_linear
from catfast.ops.lora_conv import lora_conv2d
from catfast.ops.merge import merge_lora_, swap_lora_
from catfast.ops.segmented import Segment, SegmentPlan, segmented_lora_conv2d_, segmented_lora_linear_
from catfast.rows import RowPlan

OPS = {
    "lora_linear",
    "lora_conv2d",
    "segmented_lora_linear",
    "segmented_lora_conv2d",
    "merge_lora",
    "swap_lora",
    "cat_loss",
    "group_norm_silu",
}


def _linear_args(n=2, din=8, dout=6, r=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, din, generator=g)
    w, a = torch.randn(dout, din, generator=g), torch.randn(1, r, din, generator=g)
    b = torch.randn(1, dout, r, generator=g)
    return x, w, a, b, RowPlan.build([0] * n, 0.5, False)


def test_unknown_value_lists_the_valid_ones(monkeypatch):
    monkeypatch.setenv("CATFAST_BACKEND", "cuda")
    with pytest.raises(backends.BackendError, match="'cuda' is not a backend; valid: ext, triton, torch"):
        backends.forced()
    x, w, a, b, plan = _linear_args()
    with pytest.raises(backends.BackendError, match="is not a backend"):
        lora_linear(x, w, None, a, b, plan)
    monkeypatch.setenv("CATFAST_BACKEND", " Torch ")
    assert backends.forced() == "torch"
    monkeypatch.setenv("CATFAST_BACKEND", "")
    assert backends.forced() is None


def test_forced_ext_on_lora_linear_is_an_error_naming_the_op(monkeypatch):
    # it used to be ignored silently
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    x, w, a, b, plan = _linear_args()
    with pytest.raises(backends.BackendError, match="CATFAST_BACKEND=ext: op lora_linear has no ext backend"):
        lora_linear(x, w, None, a, b, plan)
    with pytest.raises(backends.BackendError, match="op lora_linear has no ext backend"):
        lora_linear(x, w, None, a, b, plan, backend="ext")


def test_forced_triton_without_the_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("CATFAST_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, w, a, b, plan = _linear_args()
    with pytest.raises(backends.BackendError, match="op lora_linear cannot run on triton here: .*TRITON_INTERPRET"):
        lora_linear(x, w, None, a, b, plan)


def test_every_op_routes_through_the_registry(monkeypatch):
    """An invalid value fails each op (each asks choose()); a forced backend an op with kernels
    lacks fails that op; the torch-only conv ops run under any valid value (a UNet with LoRA on convs and
    linears must train with CATFAST_BACKEND=triton)."""
    x, w, a, b, plan = _linear_args()
    conv = torch.nn.Conv2d(4, 5, 3, padding=1).requires_grad_(False)
    xc = torch.randn(2, 4, 6, 6)
    ca, cb = torch.randn(1, 2, 4, 3, 3), torch.randn(1, 5, 2)
    seg = SegmentPlan(2, [Segment(0, 2, ((0, 1.0),))])
    calls = {
        "lora_linear": lambda: lora_linear(x, w, None, a, b, plan),
        "segmented_lora_linear": lambda: segmented_lora_linear_(torch.zeros(2, 3, 6), x, a, b, torch.ones(1), seg),
        "lora_conv2d": lambda: lora_conv2d(xc, conv, ca, cb, plan),
        "segmented_lora_conv2d": lambda: segmented_lora_conv2d_(
            conv(xc), xc, conv, ca.flatten(2), cb, torch.ones(1), seg),
        "merge_lora": lambda: merge_lora_([torch.zeros(4, 4)], [torch.ones(1, 4)], [torch.ones(4, 1)], [1.0]),
        "swap_lora": lambda: swap_lora_([torch.zeros(4, 4)], [torch.ones(1, 4)], [torch.ones(4, 1)], [1.0],
                                        [torch.ones(2, 4)], [torch.ones(4, 2)], [0.5]),
        "cat_loss": lambda: fused_cat_loss(x, x + 1, x, x - 1),
        "group_norm_silu": lambda: group_norm_silu(torch.randn(2, 4, 32, 32), 2),
    }  # fmt: skip
    assert set(calls) == OPS
    monkeypatch.setenv("CATFAST_BACKEND", "bogus")
    for op, call in calls.items():
        with pytest.raises(backends.BackendError, match="'bogus' is not a backend"):
            call()
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    for op in ("lora_linear", "segmented_lora_linear"):
        with pytest.raises(backends.BackendError, match=f"op {op} has no ext backend"):
            calls[op]()
    calls["lora_conv2d"]()
    calls["segmented_lora_conv2d"]()
    for op in ("merge_lora", "swap_lora", "cat_loss", "group_norm_silu"):  # the extension has them on the CPU
        calls[op]()
    monkeypatch.setenv("CATFAST_BACKEND", "triton")
    for op in ("swap_lora", "cat_loss", "group_norm_silu"):
        with pytest.raises(backends.BackendError, match=f"op {op} has no triton backend"):
            calls[op]()
    wm = torch.zeros(4, 4)
    with pytest.raises(backends.BackendError, match="op merge_lora has no triton backend"):
        merge_lora_([wm], [torch.ones(1, 4)], [torch.ones(4, 1)], [1.0])
    assert torch.count_nonzero(wm) == 0  # nothing written
    assert backends.choose("lora_conv2d", "cpu") == "torch"
    with pytest.raises(backends.BackendError, match="op lora_conv2d has no triton backend"):
        backends.choose("lora_conv2d", "cpu", requested="triton")  # an explicit request is still checked


def test_automatic_choice_and_per_call_reasons(monkeypatch):
    monkeypatch.delenv("CATFAST_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    # the interpreter can run Triton on the CPU, but the automatic choice never takes it there
    assert backends.reasons("lora_linear", "cpu", torch.float32)["triton"] == []
    assert backends.choose("lora_linear", "cpu", torch.float32) == "torch"
    assert backends.choose("lora_linear", "cpu", torch.float32, requested="triton") == "triton"
    assert "float64" in backends.reasons("lora_linear", "cpu", torch.float64)["triton"][0]
    assert backends.choose("merge_lora", "cpu", torch.float32, why_not={"ext": ["not contiguous"]}) == "torch"
    monkeypatch.setenv("CATFAST_BACKEND", "ext")
    with pytest.raises(backends.BackendError, match="merge_lora cannot run on ext here: not contiguous"):
        backends.choose("merge_lora", "cpu", torch.float32, why_not={"ext": ["not contiguous"]})


def test_register_is_one_call_and_checks_its_backends():
    try:
        op = backends.register("demo_op", "a test op", torch=backends.torch_probe, ext=lambda d, t: "never built")
        assert op.backends == ("ext", "torch")  # ordered as BACKENDS, whatever the keyword order
        assert backends.choose("demo_op", "cpu") == "torch"
        with pytest.raises(ValueError, match="backends must be among"):
            backends.register("bad_op", "x", cuda=backends.torch_probe)
        with pytest.raises(ValueError, match="unknown catfast op 'nope'"):
            backends.choose("nope", "cpu")
    finally:
        backends._REGISTRY.pop("demo_op", None)


def test_env_prints_the_table_and_json_has_it():
    r = subprocess.run([sys.executable, "-m", "catfast.env", "--json"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CATFAST_BACKEND": ""})  # fmt: skip
    assert r.returncode == 0, r.stderr
    table = json.loads(r.stdout)["backends"]
    rows = {(row["op"], row["backend"]): row for row in table["ops"]}
    assert {op for op, _ in rows} == OPS
    assert rows["lora_linear", "torch"]["available"] and rows["lora_linear", "torch"]["chosen"]
    for row in rows.values():
        assert row["available"] or row["reason"], row
    assert sum(row["chosen"] for row in rows.values()) == len(OPS)  # one automatic choice per op
    r = subprocess.run([sys.executable, "-m", "catfast.env"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "CATFAST_BACKEND": "bogus"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "'bogus' is not a backend; valid: ext, triton, torch" in r.stdout
    assert "segmented_lora_linear" in r.stdout and "merge_lora" in r.stdout
