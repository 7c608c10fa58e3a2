"""`catfast bench serve`'s ``launch_ops``: what one serving UNet call issues (issue 23, "Serving gets the same
treatment"), counted by ``catfast.bench.launches`` (aten ops that launch work, views and bare allocations
excluded; host syncs apart): a segmented call of ``rows`` rows over N distinct resident adapters (one
segment each, a fresh plan as every engine step makes) against the same call on merged weights (one adapter
merged, no LoRA work). Counts are deterministic; on a GPU each launching op is a kernel launch."""

from __future__ import annotations

import torch

from catfast.adapters.formats import read_adapter
from catfast.adapters.merge import merge_adapter_, unmerge_adapter_
from catfast.bench.launches import count_step
from catfast.integrations.factory import build_base
from catfast.integrations.row_call import run_segmented
from catfast.ops.segmented import Segment, SegmentPlan
from catfast.serve.engine import Engine


@torch.no_grad()
def serve_launch_ops(model: str, paths, rows: int, *, log=print) -> dict:
    """Launching ops of one segmented call (``rows`` rows, one adapter file of ``paths`` per segment) and of
    the merged call, their ratio and the extra per LoRA layer; host syncs of the segmented call."""
    n = len(paths)
    if not 1 <= n <= rows:
        raise ValueError(f"{n} adapters on {rows} rows: need 1 <= adapters <= rows")
    engine = Engine(build_base(model), max_resident=n)
    try:
        unet, pool = engine.unet, engine.pool
        for i, path in enumerate(paths):
            engine.load_adapter(f"l{i}", path)
            pool.install(pool.lookup(f"l{i}"))
        cfg, device = unet.config, engine.device
        g = torch.Generator().manual_seed(0)
        x = torch.randn(rows, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(device)
        t = torch.full((rows,), 500, dtype=torch.int64, device=device)
        h = torch.randn(rows, 77, cfg.cross_attention_dim, generator=g).to(device)
        per = rows // n

        def plan(order):
            bounds = [(i * per, (i + 1) * per if i < n - 1 else rows) for i in range(n)]
            return SegmentPlan(rows, [Segment(a, b, ((s, 1.0),)) for (a, b), s in zip(bounds, order)], device=device)

        call = lambda p: run_segmented(unet, pool.holder, p, x, t, encoder_hidden_states=h)  # noqa: E731
        call(plan(range(n)))  # the first call after loading packs the slots (once, not per call)
        fresh = plan(list(reversed(range(n))))  # a new plan, slots out of segment order
        segmented = count_step(lambda: call(fresh))
        adapter = read_adapter(paths[0])
        merge_adapter_(unet, adapter)
        try:
            merged = count_step(lambda: unet(x, t, encoder_hidden_states=h, return_dict=False))
        finally:
            unmerge_adapter_(unet, adapter)
        layers = sum(1 for layer in pool.layers.values() if layer.holder is pool.holder)
    finally:
        engine.close()
    result = {
        "rows": rows,
        "adapters": n,
        "lora_layers": layers,
        "segmented": segmented.launch_ops,
        "merged": merged.launch_ops,
        "ratio": round(segmented.launch_ops / merged.launch_ops, 4),
        "extra_per_lora_layer": round((segmented.launch_ops - merged.launch_ops) / max(layers, 1), 3),
        "host_syncs": segmented.host_syncs,
    }
    log(f"launching ops, {rows} rows on {n} adapters: {result['segmented']} against {result['merged']} on merged "
        f"weights ({result['ratio']}x, {result['extra_per_lora_layer']} extra per LoRA layer), "
        f"{result['host_syncs']} host syncs")  # fmt: skip
    return result
