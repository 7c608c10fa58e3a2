"""``--base-dtype fp8`` against a bf16 base: parameter bytes and the peak RSS of CAT training steps (CPU), and the
real FLUX.1-dev transformer's weight bytes computed on the meta device.

Each variant runs in a fresh process (the peak RSS is a process's): ``flux-narrow`` (FLUX.1's widths, one double
and one single block) built in bf16, a rank-16 LoRA (fp32, random A and B) on the Flux targets, then for ``fp8``
every other frozen Linear quantized (``quantize_frozen_linears_``); then the high-water mark is reset
(``/proc/self/clear_refs``) and two reference-mode CAT steps run (bf16 compute, batch 1, 16x16 latents, 32 text
tokens, AdamW on the LoRA), as ``catfast train --base-dtype fp8 --mixed-precision bf16`` runs them.

  OMP_NUM_THREADS=1 python benchmarks/fp8_memory.py >> benchmarks/results/fp8-cpu-dev-2core.jsonl
"""

from __future__ import annotations

import ctypes
import gc
import json
import subprocess
import sys
import time

import torch

from catfast.bench.measure import cpu_name

MIB = 2**20


def _status(key: str) -> int:
    """A /proc/self/status value in bytes (VmRSS, VmHWM)."""
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def _settle() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages, so the RSS is what is held
    except OSError:
        pass


def run_variant(variant: str, steps: int = 2) -> dict:
    from catfast.integrations.factory_dit import build_transformer
    from catfast.integrations.families import FAMILIES
    from catfast.integrations.peft_adapters import add_lora, randomize_lora_
    from catfast.nn.fp8_linear import quantize_frozen_linears_, tensor_bytes
    from catfast.train.flow_objective import flow_cat_loss, sample_flow_inputs

    torch.set_num_threads(1)
    family = FAMILIES["flux"]
    model = build_transformer("flux-narrow", dtype=torch.bfloat16)
    add_lora(model, rank=16, alpha=16, target_modules=family.default_targets)
    randomize_lora_(model, seed=0)
    lora = [p for p in model.parameters() if p.requires_grad]
    for p in lora:
        p.data = p.data.float()
    report = quantize_frozen_linears_(model) if variant == "fp8" else None
    optimizer = torch.optim.AdamW(lora, lr=1e-4, foreach=True)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 16, 16, generator=g).bfloat16()
    conds = [
        {"prompt_embeds": torch.randn(1, 32, 4096, generator=g).bfloat16(),
         "pooled_prompt_embeds": torch.randn(1, 768, generator=g).bfloat16()}
        for _ in range(2)
    ]  # fmt: skip
    _settle()
    held = _status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        noise, sigmas = sample_flow_inputs(family, latents, generator=g)
        out = flow_cat_loss(family, model, latents, noise, sigmas, *conds, cat_weight=1.0, mode="reference")
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        times.append(time.perf_counter() - t0)
    peak = _status("VmHWM")
    return {
        "variant": variant,
        "param_bytes": tensor_bytes(model),
        "lora_bytes": sum(p.numel() * p.element_size() for p in lora),
        "quantized_linears": len(report.quantized) if report else 0,
        "rss_before_step_mib": round(held / MIB, 1),
        "peak_rss_mib": round(peak / MIB, 1),
        "step_rise_mib": round((peak - held) / MIB, 1),
        "step_seconds": [round(t, 2) for t in times],
        "losses": losses,
    }


def real_weights() -> dict:
    """FLUX.1-dev's transformer (factory_dit's real config, meta device): weight bytes in bf16 and as fp8."""
    from catfast.integrations.factory_dit import build_transformer
    from catfast.nn.fp8_linear import quantize_frozen_linears_

    model = build_transformer("flux-dev", device="meta").to(torch.bfloat16).requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    report = quantize_frozen_linears_(model)
    before, after = report.model_bytes_before, report.model_bytes_after
    return {"model": "flux-dev", "computed": True, "params": params, "bf16_bytes": before, "fp8_bytes": after,
            "ratio": round(after / before, 4), "quantized_linears": len(report.quantized)}  # fmt: skip


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--variant":
        print(json.dumps(run_variant(sys.argv[2])))
        return
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    common = {"bench": "fp8-base", "device": "cpu", "cpu": cpu_name(), "threads": 1, "torch": torch.__version__,
              "commit": commit}  # fmt: skip
    variants = {}
    for variant in ("bf16", "fp8"):
        done = subprocess.run([sys.executable, __file__, "--variant", variant], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr)
        variants[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    setup = {"model": "flux-narrow", "dtype": "bf16", "rank": 16, "batch": 1, "latent_side": 16, "text_tokens": 32,
             "mode": "reference", "steps": 2}  # fmt: skip
    ratio = {k: round(variants["fp8"][k] / variants["bf16"][k], 4) for k in ("param_bytes", "peak_rss_mib")}
    print(json.dumps({**common, **setup, "variants": variants, "fp8_vs_bf16": ratio}))
    print(json.dumps({**common, **real_weights()}))


if __name__ == "__main__":
    main()
