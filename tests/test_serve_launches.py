"""What a serving UNet call issues (issue 23, "Serving gets the same treatment"): one segmented call of 16 rows
on 16 different adapters in slots issues at most 1.3x the launching ops of the same call on merged weights
(2 per LoRA layer, plus one gather of the plan's slots per call), reads nothing back from the device, and equals
the per-request reference; the slots' stacked buffers stay exact through puts, rank growth, weighted and
stacked mixes, unequal segments and convolutions; the Triton path issues its kernels and nothing per layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from catfast.bench.launches import count_step
from catfast.integrations.factory import build_unet
from catfast.integrations.row_call import run_segmented
from catfast.nn.slot_lora import SlotHolder, SlotLora
from catfast.ops.segmented import Segment, SegmentPlan
from catfast.reference.segmented import segmented_lora_conv2d_ref, segmented_lora_linear_ref
from catfast.targets import ATTENTION_PROJECTIONS
from catfast.testing import assert_rel_close, rel_err

pytestmark = pytest.mark.usefixtures("one_thread")

SLOTS = ROWS = 16
RANKS = (4, 2, 3)  # per adapter, cycled: the slots' R is 4, smaller ranks zero-padded


def _adapter(module, rank, g):
    """(down, up, scale) for one layer; B random (a zero B would pass anything)."""
    fan_in, out = module.weight[0].numel(), module.weight.shape[0]
    return torch.randn(rank, fan_in, generator=g) * 0.2, torch.randn(out, rank, generator=g) * 0.2, 0.5 + rank / 8


@pytest.fixture(scope="module")
def served():
    """The tiny UNet with 16 adapters in the slots of every attention projection, and one call's inputs."""
    unet = build_unet("tiny").eval()
    holder = SlotHolder()
    g = torch.Generator().manual_seed(0)
    adapters = {}  # module name -> [(down, up, scale) per slot]
    layers = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith("." + t) for t in ATTENTION_PROJECTIONS):
            layer = SlotLora(module, SLOTS, holder)
            adapters[name] = [_adapter(module, RANKS[s % len(RANKS)], g) for s in range(SLOTS)]
            for s, (down, up, scale) in enumerate(adapters[name]):
                layer.put(s, down, up, scale)
            layers.append(layer)
    cfg = unet.config
    x = torch.randn(ROWS, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    t = torch.randint(0, 1000, (ROWS,), generator=g)
    h = torch.randn(ROWS, 7, cfg.cross_attention_dim, generator=g)
    # the first call after loading packs the slots into the holder's stacked buffer (once, not per call)
    run_segmented(unet, holder, _one_each(list(range(SLOTS))), x, t, encoder_hidden_states=h)
    yield unet, holder, adapters, layers, (x, t, h)
    for layer in layers:
        layer.remove()


def _one_each(slots):
    """One row per request, each on its own adapter (the common serving batch)."""
    return SegmentPlan(len(slots), [Segment(i, i + 1, ((s, 1.0),)) for i, s in enumerate(slots)])


SLOT_OF_ROW = [(5 * i + 3) % SLOTS for i in range(ROWS)]  # 16 different adapters, not in slot order


def test_segmented_call_issues_at_most_1_3x_the_merged_calls_launches(served):
    unet, holder, adapters, layers, (x, t, h) = served
    plan = _one_each(SLOT_OF_ROW)  # a fresh plan: its per-call tensors and gather are counted
    seg = count_step(lambda: run_segmented(unet, holder, plan, x, t, encoder_hidden_states=h))
    with torch.no_grad():  # merged weights: slot 0's adapter in the weights, no hook at work (no plan)
        deltas = {}
        for name, (down, up, scale) in ((n, a[0]) for n, a in adapters.items()):
            deltas[name] = scale * up @ down
            unet.get_submodule(name).weight += deltas[name]
        merged = count_step(lambda: unet(x, t, encoder_hidden_states=h, return_dict=False))
        for name, delta in deltas.items():
            unet.get_submodule(name).weight -= delta
    extra = (seg.launch_ops - merged.launch_ops) / len(layers)
    print(f"\nserving call, {ROWS} rows on {ROWS} adapters: {seg.launch_ops} launching ops, merged weights "
          f"{merged.launch_ops} ({seg.launch_ops / merged.launch_ops:.3f}x), {extra:.2f} extra per LoRA layer "
          f"({len(layers)} layers)")  # fmt: skip
    assert seg.launch_ops <= 1.3 * merged.launch_ops, (seg.launch_ops, merged.launch_ops, seg.launches.most_common(12))
    assert seg.launch_ops <= merged.launch_ops + 2 * len(layers) + 1, seg.launches - merged.launches
    assert seg.host_syncs == 0 and merged.host_syncs == 0, (seg.syncs, merged.syncs)


def test_segmented_call_equals_the_per_request_reference(served):
    unet, holder, adapters, _, (x, t, h) = served
    with torch.no_grad():
        ours = run_segmented(unet, holder, _one_each(SLOT_OF_ROW), x, t, encoder_hidden_states=h)
        for n, slot in enumerate(SLOT_OF_ROW):  # each request alone, its adapter applied by the pure-torch spec
            handles = []
            for name, per_slot in adapters.items():
                down, up, scale = per_slot[slot]

                def ref(module, args, out, down=down, up=up, scale=scale):
                    pool = down[None], up[None], torch.tensor([scale])
                    y = segmented_lora_linear_ref(args[0], module.weight, module.bias, *pool, [(0, 1, ((0, 1.0),))])
                    return y.to(out.dtype)

                handles.append(unet.get_submodule(name).register_forward_hook(ref))
            try:
                want = unet(x[n : n + 1], t[n : n + 1], encoder_hidden_states=h[n : n + 1], return_dict=False)[0]
            finally:
                for handle in handles:
                    handle.remove()
            base = unet(x[n : n + 1], t[n : n + 1], encoder_hidden_states=h[n : n + 1], return_dict=False)[0]
            assert_rel_close(ours[n : n + 1], want, 1e-5, f"row {n} (slot {slot})")
            assert rel_err(base, want) > 1e-3  # the adapter really changes the output


def _modules():
    """Linear and Conv2d modules of different shapes sharing one holder (one stacked buffer)."""
    torch.manual_seed(0)
    return [
        torch.nn.Linear(13, 11),
        torch.nn.Conv2d(5, 7, 3, padding=1),
        torch.nn.Linear(9, 6, bias=False),
        torch.nn.Conv2d(7, 4, 1),
    ]


def _input(module, rows, g):
    if isinstance(module, torch.nn.Conv2d):
        return torch.randn(rows, module.in_channels, 5, 5, generator=g)
    return torch.randn(rows, 2, module.in_features, generator=g)


def _reference(module, x, pool, segments):
    if isinstance(module, torch.nn.Conv2d):
        return segmented_lora_conv2d_ref(x, module, *pool, segments)
    return segmented_lora_linear_ref(x, module.weight, module.bias, *pool, segments)


PLANS = {  # (rows, [(start, stop, mix)])
    "uniform-weighted": (8, [(0, 2, ((1, 0.5),)), (2, 4, ((3, -1.25),)), (4, 6, ((0, 0.75),)), (6, 8, ((2, 2.0),))]),
    "uniform-stacked": (9, [(3, 5, ((1, 0.5), (2, 1.0))), (5, 7, ((0, 1.0),)), (7, 9, ((2, 1.0), (3, -0.5)))]),
    "uneven": (9, [(0, 3, ((2, 1.0),)), (4, 5, ((0, 0.7), (3, 1.0))), (5, 9, ((1, 1.0),))]),
    "same-weight": (6, [(0, 3, ((3, 0.8),)), (3, 6, ((1, 0.8),))]),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_stacked_slots_stay_exact_through_puts_growth_and_mixes(name):
    g = torch.Generator().manual_seed(3)
    holder = SlotHolder()
    modules = _modules()
    layers = [SlotLora(m, 4, holder) for m in modules]
    pools = []  # per module: A [4, R, in] (unscaled), B [4, out, R], scales [4], as the reference takes them
    for m, layer in zip(modules, layers):
        fan_in, out = m.weight[0].numel(), m.weight.shape[0]
        a, b, scales = torch.zeros(4, 3, fan_in), torch.zeros(4, out, 3), torch.zeros(4)
        for s, r in enumerate((2, 3, 1, 3)):  # slot 1 grows the rank after slot 0 is in
            down, up, scale = torch.randn(r, fan_in, generator=g), torch.randn(out, r, generator=g), 0.25 * (s + 1)
            layer.put(s, down.view(r, *m.weight.shape[1:]), up, scale)
            a[s, :r], b[s, :, :r], scales[s] = down, up, scale
        pools.append((a, b, scales))
    rows, segments = PLANS[name]
    plan = SegmentPlan(rows, [Segment(*s) for s in segments])

    def check(what):
        holder.plan = plan
        try:
            for m, pool in zip(modules, pools):
                x = _input(m, rows, g)
                with torch.no_grad():
                    y = m(x)
                assert_rel_close(y, _reference(m, x, pool, segments).float(), 1e-5, f"{what}: {m}")
        finally:
            holder.plan = None

    check("fresh")
    check("packed")  # the same plan again: its gather is reused
    layers[0].put(2, *(torch.ones(1, 13), torch.ones(11, 1), 3.0))  # a put after packing: the plan regathers
    pools[0][0][2], pools[0][1][2], pools[0][2][2] = 0.0, 0.0, 3.0
    pools[0][0][2, :1], pools[0][1][2, :, :1] = 1.0, 1.0
    check("after a put")
    layers[2].clear(1)
    pools[2][0][1], pools[2][1][1] = 0.0, 0.0
    check("after a clear")


def test_triton_path_issues_its_kernels_and_nothing_per_layer(served, monkeypatch):
    """The launcher's arguments are made once per plan (int32 slots, tiles, weights): per layer, the two kernels
    only (stubbed here: the interpreter would run them in numpy; tests/kernels test them)."""
    pytest.importorskip("triton")
    import catfast.ops.segmented as segmented

    unet, holder, _, layers, (x, t, h) = served
    calls = []
    monkeypatch.setattr(segmented, "call_segmented_lora_linear_", lambda *args: calls.append(args))
    monkeypatch.setenv("CATFAST_BACKEND", "triton")
    plan = _one_each(SLOT_OF_ROW)
    seg = count_step(lambda: run_segmented(unet, holder, plan, x, t, encoder_hidden_states=h))
    with torch.no_grad():
        base = count_step(lambda: unet(x, t, encoder_hidden_states=h, return_dict=False))
    assert len(calls) == len(layers)
    assert seg.launch_ops - base.launch_ops <= 1, seg.launches - base.launches  # int32 slots, once per plan
    assert seg.host_syncs == 0


def test_triton_kernels_read_the_stacked_slots():
    """A Linear's slots are strided views of the holder's stacked buffer: the interpreted kernels take them."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(5)
    holder = SlotHolder()
    lin, other = torch.nn.Linear(37, 29), torch.nn.Linear(8, 5)
    layer, _ = SlotLora(lin, 3, holder), SlotLora(other, 3, holder)
    a, b, scales = torch.zeros(3, 4, 37), torch.zeros(3, 29, 4), torch.tensor([0.5, 2.0, 1.5])
    for s, r in enumerate((4, 1, 3)):
        a[s, :r], b[s, :, :r] = torch.randn(r, 37, generator=g), torch.randn(29, r, generator=g)
        layer.put(s, a[s, :r], b[s, :, :r], float(scales[s]))
    segments = [(2, 19, ((2, 1.0),)), (19, 20, ((0, 0.5), (1, -1.0)))]
    plan = SegmentPlan(23, [Segment(*s) for s in segments])
    holder.gathered(layer, plan)  # packs: the slots become views of the stacked buffer
    assert not layer.a.is_contiguous()
    x = torch.randn(23, 3, 37, generator=g)
    y = F.linear(x, lin.weight, lin.bias)
    from catfast.ops.segmented import segmented_lora_linear_

    with torch.no_grad():
        segmented_lora_linear_(y, x, layer.a, layer.b, None, plan, backend="triton")
    assert_rel_close(y, segmented_lora_linear_ref(x, lin.weight, lin.bias, a, b, scales, segments).float(), 1e-5,
                     "triton on stacked slots")  # fmt: skip


def test_bench_serve_reports_launch_ops(tmp_path):
    from catfast.adapters.formats import write_adapter
    from catfast.bench.serve_launches import serve_launch_ops
    from catfast.testing import random_adapter

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"a{i}.safetensors")
        write_adapter(random_adapter({"unet": build_unet("tiny")}, leaves=ATTENTION_PROJECTIONS, seed=i), paths[-1])
    lines = []
    out = serve_launch_ops("tiny", paths, 6, log=lines.append)
    assert out["lora_layers"] == 32 and out["adapters"] == 3 and out["host_syncs"] == 0
    assert out["ratio"] == round(out["segmented"] / out["merged"], 4) <= 1.3
    assert out["extra_per_lora_layer"] <= 2.1 and "extra per LoRA layer" in lines[-1]
