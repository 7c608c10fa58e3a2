"""torch.compile over the row-planned UNet: the fused CAT step (both layouts) and the sampler's UNet call trace
with the LoRA layers as catfast:: custom ops (catfast/ops/library.py) and 0 graph breaks (``fullgraph=True``),
give the eager results; regional compilation (each repeated block compiled, ``compile_regions``) too (torch
2.13, tiny UNet, CPU).

Backend "eager" (dynamo's graphs run as they are): the test is about what dynamo can trace, and the CPU
time of inductor's code generation would dominate CI. The 11 graph breaks the fused step had came from
saved-tensor hooks that kept only the grad rows of what autograd saved; the one-call layout no longer uses
them (catfast/ops/grad_rows.py says why)."""

import pytest
import torch
from diffusers import DDPMScheduler
from peft import LoraConfig
from torch._dynamo.utils import counters

import catfast
from catfast.integrations.factory import build_unet
from catfast.integrations.row_call import planned_unet
from catfast.integrations.schedulers import SCHEDULER_CONFIG
from catfast.rows import NO_ADAPTER, RowPlan
from catfast.targets import ATTENTION_PROJECTIONS
from catfast.testing import assert_rel_close, cat_batch, randomize_lora_

pytestmark = pytest.mark.usefixtures("one_thread")

# every LoRA Linear of the tiny UNet's transformer blocks (40 layers)
ALL = [*ATTENTION_PROJECTIONS, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]

def _counting_compile(module, fullgraph: bool = False):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    return torch.compile(module, backend=backend, fullgraph=fullgraph), graphs


def _is_lora_op(node) -> bool:
    return node.op == "call_function" and "catfast.lora_linear" in str(node.target)


def _breaks() -> dict[str, int]:
    return {reason.split("\n")[0] + " | " + reason: n for reason, n in counters["graph_break"].items()}


def _fused_unet():
    unet = build_unet("tiny", seed=0).requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4.0, target_modules=ALL))
    randomize_lora_(unet, seed=1)
    return unet, DDPMScheduler(**SCHEDULER_CONFIG), cat_batch(2)


def _eager(unet, sched, batch, layout):
    eager = catfast.cat_loss(unet, sched, **batch, mode="fused", layout=layout)
    eager.total.backward()
    want = {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}
    unet.zero_grad(set_to_none=True)
    return eager, want


def _check_against(unet, out, eager, want):
    assert_rel_close(out.total.detach(), eager.total.detach(), 1e-6, "loss")
    for name, g in want.items():
        assert g.abs().sum() > 0
        assert_rel_close(unet.get_parameter(name).grad, g, 1e-5, name)


@pytest.mark.parametrize("layout", ["one-call", "teacher-first"])
def test_fused_cat_step_compiles_as_one_graph(layout):
    """fullgraph=True: any graph break raises. one-call is the layout the fused step takes on a GPU."""
    unet, sched, batch = _fused_unet()
    eager, want = _eager(unet, sched, batch, layout)
    compiled, graphs = _counting_compile(unet, fullgraph=True)
    out = catfast.cat_loss(compiled, sched, **batch, mode="fused", layout=layout)
    out.total.backward()
    _check_against(unet, out, eager, want)
    lora_ops = [n for gm in graphs for n in gm.graph.nodes if _is_lora_op(n)]
    # every LoRA Linear of the tiny UNet (ALL targets: 40) is one custom-op node; teacher-first's own call for the
    # teacher rows has no adapter sample, and its LoRA layers run their frozen layer alone
    assert len(lora_ops) == 40
    assert _breaks() == {}, _breaks()


def test_regional_compile_of_the_fused_step():
    """Each transformer block and resnet compiled on its own (fullgraph), as OneTrainer and ai-toolkit compile:
    the same results, no graph break."""
    from catfast.integrations.compile import compile_regions

    unet, sched, batch = _fused_unet()
    eager, want = _eager(unet, sched, batch, "one-call")
    torch._dynamo.reset()
    counters.clear()
    compiled = compile_regions(unet, backend="eager")
    assert compiled and all(name.split(".")[-2] in ("transformer_blocks", "resnets") for name in compiled)
    out = catfast.cat_loss(unet, sched, **batch, mode="fused", layout="one-call")
    out.total.backward()
    _check_against(unet, out, eager, want)
    assert _breaks() == {}, _breaks()


def test_sampler_unet_call_compiles_without_breaks():
    """The sampler's call: two adapters and base rows, CFG's identical halves, no grad."""
    unet = build_unet("tiny", seed=0).requires_grad_(False)
    attn = ["to_q", "to_k", "to_v", "to_out.0"]
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4.0, target_modules=attn))
    unet.add_adapter(LoraConfig(r=2, lora_alpha=4.0, target_modules=attn), adapter_name="b")
    unet.set_adapter(["default", "b"])
    randomize_lora_(unet, seed=3)
    g = torch.Generator().manual_seed(0)
    x, t, cond = torch.randn(6, 4, 16, 16, generator=g), torch.tensor(500), torch.randn(6, 7, 32, generator=g)
    adapters = ["default", "b", None] * 2
    with torch.no_grad(), planned_unet(unet, adapters, purpose="sample") as call:
        slots = call.slots(adapters)
        plan = RowPlan.build(slots, [0.0 if s == NO_ADAPTER else 1.0 for s in slots], needs_grad=False)
        with call.plan_rows(plan, identical_groups=2):
            want = call.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]
        compiled, graphs = _counting_compile(call.unet)
        with call.plan_rows(plan, identical_groups=2):
            got = compiled(x, t, encoder_hidden_states=cond, return_dict=False)[0]
    assert_rel_close(got, want, 1e-5, "sampler UNet call")
    assert len(graphs) == 1 and _breaks() == {}, _breaks()
    assert any(_is_lora_op(n) for n in graphs[0].graph.nodes)
