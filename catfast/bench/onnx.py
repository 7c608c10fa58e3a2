"""`catfast bench onnx`: UNet latency in ONNX Runtime against PyTorch with the same merged weights, in one
process, interleaved (each repetition times every contestant once, in turn), median of ``reps``.

Contestants, at batch ``batch`` (CFG-style: 2) and the model's native latent size:
  torch                     the diffusers UNet with the adapter merged (catfast's merge op), torch.no_grad, CPU
  torch:cuda                the same on the GPU, when torch sees one (ORT's CUDA provider is compared to it)
  ort:<provider>:merged     the merged export, on each execution provider that starts here
  ort:<provider>:adapter_inputs   the adapter-inputs export fed the same adapter's tensors

The adapter is a seeded random rank-``rank`` LoRA (B nonzero, alpha != rank) on every attention projection
(to_q/to_k/to_v/to_out.0), the most common SD LoRA target. Both exports are made with `export_onnx`, so their
parity against torch is checked as for any export; the errors are reported next to the times.
"""

from __future__ import annotations

import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file

from catfast.adapters.adapter import LoraAdapter, LoraLayer, layer_key
from catfast.adapters.merge import merge_adapter_
from catfast.bench.measure import cpu_name, flop_counter, git_commit
from catfast.export.onnx import AdapterSpec, export_onnx
from catfast.export.runner import session, usable_providers
from catfast.integrations.factory import build_base
from catfast.targets import ATTENTION_PROJECTIONS

TARGETS = tuple("." + t for t in ATTENTION_PROJECTIONS)


def attention_adapter(unet: torch.nn.Module, rank: int = 8, alpha: float = 6.0, seed: int = 0) -> LoraAdapter:
    """A random LoRA on every attention projection of ``unet`` (B nonzero; alpha != rank)."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and name.endswith(TARGETS):
            down = torch.randn(rank, m.in_features, generator=g) / m.in_features**0.5
            up = torch.randn(m.out_features, rank, generator=g) * 0.1
            layers[layer_key("unet", name)] = LoraLayer(down, up, alpha)
    return LoraAdapter(layers)


def bench_onnx(
    model: str = "tiny",
    *,
    reps: int = 10,
    batch: int = 2,
    rank: int = 8,
    threads: int | None = None,
    providers: list[str] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Build the named random-weight model, export it twice (merged, adapter inputs), time every contestant
    ``reps`` times interleaved after one warm-up round; one JSON-able dict with medians, ratios and parity."""

    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    log(f"building {model}")
    base = build_base(model)
    unet = base.unet
    adapter = attention_adapter(unet, rank=rank)
    providers = providers or list(usable_providers())
    with tempfile.TemporaryDirectory(prefix="catfast-bench-onnx-") as tmp:
        spec = AdapterSpec(path="bench-adapter", name="bench", adapter=adapter)
        merged = export_onnx(base, Path(tmp) / "merged", adapters=[spec], log=log)
        inputs = export_onnx(base, Path(tmp) / "inputs", adapters=[spec], adapter_inputs=True, log=log)
        errors = {
            "merged": merged["components"]["unet"]["validation"]["max_rel_err"],
            "adapter_inputs": inputs["components"]["unet"]["validation"]["max_rel_err"],
        }
        merge_adapter_(unet, adapter, "unet")  # torch contestant: the same merged weights
        feeds = load_file(Path(tmp) / "inputs" / inputs["adapters"][0]["weights"]["unet"]["safetensors"])
        g = torch.Generator().manual_seed(0)
        s = unet.config.sample_size
        x = torch.randn(batch, unet.config.in_channels, s, s, generator=g)
        t = torch.full((batch,), 500.0)
        c = torch.randn(batch, base.tokenizer.model_max_length, unet.config.cross_attention_dim, generator=g)
        np_in = {"sample": x.numpy(), "timestep": t.numpy(), "encoder_hidden_states": c.numpy()}

        contestants = _contestants(unet, (x, t, c), np_in, feeds, Path(tmp), providers, threads)
        with flop_counter() as flops:
            want = contestants["torch"]().double().numpy()
        parity = {}
        for name, run in contestants.items():
            if name.startswith("ort:"):
                got = np.asarray(run()[0], dtype=np.float64)
                parity[name] = float(np.abs(got - want).max() / np.abs(want).max())
        log(f"timing {len(contestants)} contestants x {reps} reps, interleaved")
        times = _time_interleaved(contestants, reps)
    median = {name: round(statistics.median(v), 2) for name, v in times.items()}
    import onnxruntime as ort  # lazy: onnxruntime

    result = {
        "bench": "onnx",
        "model": model,
        "device": f"cpu ({cpu_name()}, {threads} threads)",
        "providers": providers,
        "dtype": "fp32",
        "shapes": {"sample": list(x.shape), "timestep": list(t.shape), "encoder_hidden_states": list(c.shape)},
        "adapter": {"rank": rank, "alpha": 6.0, "layers": len(adapter.layers), "targets": list(TARGETS)},
        "reps": reps,
        "median_ms": median,
        "min_ms": {name: round(min(v), 2) for name, v in times.items()},
        "unet_gflop": round(flops.get_total_flops() / 1e9, 2),
        "torch_over_ort": {n: round(median["torch"] / ms, 3) for n, ms in median.items() if n.startswith("ort:")},
        "adapter_inputs_over_merged": {
            p: round(median[f"ort:{p}:adapter_inputs"] / median[f"ort:{p}:merged"], 3) for p in providers
        },
        "export_rel_err": errors,
        "timed_rel_err_vs_torch": parity,
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "git": git_commit() or "unknown",
        "cpu_count": os.cpu_count(),
    }
    return result


def _contestants(unet, args, np_in: dict, feeds: dict, tmp: Path, providers: list[str], threads: int) -> dict:
    """name -> zero-argument call: torch (CPU; and CUDA when torch sees a GPU) with the merged weights, and
    each provider's session on the merged export and on the adapter-inputs export fed ``feeds``."""
    x, t, c = args

    def torch_run():
        with torch.no_grad():
            return unet(x, t, c).sample

    contestants: dict[str, Callable] = {"torch": torch_run}
    if torch.cuda.is_available():  # on a GPU machine, compare CUDA providers with torch on the GPU too
        unet_gpu = copy.deepcopy(unet).cuda()
        xg, tg, cg = x.cuda(), t.cuda(), c.cuda()

        def torch_cuda_run():
            with torch.no_grad():
                out = unet_gpu(xg, tg, cg).sample
            torch.cuda.synchronize()
            return out

        contestants["torch:cuda"] = torch_cuda_run
    for provider in providers:
        for mode, folder, extra in (("merged", "merged", {}), ("adapter_inputs", "inputs", feeds)):
            sess = session(tmp / folder / "unet" / "model.onnx", provider, threads=threads)
            contestants[f"ort:{provider}:{mode}"] = lambda sess=sess, extra=extra: sess.run(None, {**np_in, **extra})
    return contestants


def _time_interleaved(contestants: dict, reps: int) -> dict[str, list[float]]:
    """ms of each call, ``reps`` rounds after one warm-up round, every contestant once per round in turn."""
    times: dict[str, list[float]] = {name: [] for name in contestants}
    for rep in range(reps + 1):  # rep 0 warms up
        for name, run in contestants.items():
            t0 = time.perf_counter()
            run()
            if rep:
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times
