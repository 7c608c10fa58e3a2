"""GPU memory of a CAT step by the benchmark's accounting, COMPUTED from CPU measurements (no GPU was used).

Input: JSON lines of ``benchmarks/measure_saved.py`` (SD1.5 and SDXL UNets built in bf16, a rank-16 LoRA on the
attention projections, 2 grad rows = batch 1's trigger and stripped passes, 512 px, with and without gradient
checkpointing). Per configuration the step needs, in bytes:

  frozen weights      P x 2 (bf16)                     official CAT adds its second UNet in fp32: P x 4
  LoRA training state L_r x 16 (fp32 weight, grad, AdamW m and v; L_r = L_16 x r / 16)
  step working memory the measured forward + backward RSS high-water mark above the loaded model, scaled by
                      the latent's pixel count for other sizes (SDXL at 1024 px: x4)
  CUDA context        0.5 GiB (assumed, not measured)

  python benchmarks/memory_budget.py benchmarks/results/train-step-memory-cpu.jsonl
"""

from __future__ import annotations

import json
import sys

GIB = 2**30
CONTEXT = 0.5 * GIB
BUDGETS = (6, 8, 12, 24)
SIDES = {"sd15": 64, "sdxl": 128}  # native latent side (512 px, 1024 px)


def budget(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        scale = (SIDES[r["model"]] / r["side"]) ** 2
        step = r["step_peak_bytes"] * scale
        for contestant, extra in (("catfast", 0), ("official", r["frozen_params"] * 4)):
            for rank in (1, 16):
                total = r["frozen_params"] * 2 + extra + r["lora_params_r16"] * rank / 16 * 16 + step + CONTEXT
                out.append(
                    dict(
                        model=r["model"],
                        px=SIDES[r["model"]] * 8,
                        ckpt=r["ckpt"],
                        step=contestant,
                        rank=rank,
                        gib=round(total / GIB, 2),
                        scaled_from_px=r["side"] * 8,
                        fits=[b for b in BUDGETS if total <= b * GIB],
                    )
                )
    return out


def main() -> None:
    rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
    print("| model, px | gradient checkpointing | step | rank | GiB (computed) | fits in (GB) |")
    print("|---|---|---|---|---|---|")
    for b in budget(rows):
        fits = ", ".join(str(x) for x in b["fits"]) or "none of 6/8/12/24"
        ckpt = "on" if b["ckpt"] else "off"
        print(f"| {b['model']}, {b['px']} | {ckpt} | {b['step']} | {b['rank']} | {b['gib']} | {fits} |")


if __name__ == "__main__":
    main()
