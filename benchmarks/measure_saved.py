"""Bytes autograd saves for backward in one LoRA UNet forward with grad (measured on the CPU, real tensors),
for the GPU memory accounting of benchmarks/README.md ("Memory"): a UNet of the factory's shape built directly
in ``dtype`` (no fp32 copy first), a rank-16 LoRA on the attention projections (fp32), ``rows`` rows at a
``side`` x ``side`` latent, 77 tokens; with ``ckpt`` diffusers' gradient checkpointing is on. Prints one JSON line.

  python benchmarks/measure_saved.py sd15 2 bf16 64 [ckpt]
"""

import json
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from catfast.integrations.factory import unet_config

model, rows, dt, side = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
t0 = time.time()
cfg = unet_config(model)
torch.set_default_dtype(dtype)
unet = UNet2DConditionModel(**cfg).requires_grad_(False)
torch.set_default_dtype(torch.float32)
ckpt = len(sys.argv) > 5 and sys.argv[5] == "ckpt"
if ckpt:
    unet.enable_gradient_checkpointing()
    unet.train()
unet.add_adapter(LoraConfig(r=16, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
for n, p in unet.named_parameters():
    if "lora" in n:
        p.data = p.data.float()
        p.requires_grad_(True)
params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
kw = {}
if cfg.get("addition_embed_type") == "text_time":
    kw["added_cond_kwargs"] = {
        "text_embeds": torch.zeros(rows, 1280, dtype=dtype),
        "time_ids": torch.zeros(rows, 6, dtype=dtype),
    }
st = {}
big = [0]


def pack(t):
    s = t.untyped_storage()
    if s.data_ptr() not in params:
        st[s.data_ptr()] = s.nbytes()
        big[0] = max(big[0], s.nbytes())
    return t


x = torch.randn(rows, 4, side, side, dtype=dtype)
c = torch.randn(rows, 77, cfg["cross_attention_dim"], dtype=dtype)


def vm(key):
    with open("/proc/self/status", encoding="utf-8") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


rss = vm("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM (peak RSS) to the current RSS
    f.write("5")
with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    out = unet(x, torch.zeros(rows, dtype=torch.long), encoder_hidden_states=c, **kw).sample
nparams = sum(p.numel() for p in unet.parameters() if not p.requires_grad)
nlora = sum(p.numel() for p in unet.parameters() if p.requires_grad)
out.float().square().mean().backward()  # the checkpointed blocks recompute here
step_peak = vm("VmHWM") - rss  # forward + backward working memory above the loaded model and inputs
print(
    json.dumps(
        dict(
            model=model,
            rows=rows,
            dtype=dt,
            side=side,
            ckpt=ckpt,
            saved_bytes=sum(st.values()),
            step_peak_bytes=step_peak,
            rss_before=rss,
            largest_saved=big[0],
            frozen_params=nparams,
            lora_params_r16=nlora,
            seconds=round(time.time() - t0, 1),
        )
    )
)
