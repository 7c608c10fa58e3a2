"""The mixed precision a benchmark step runs at: whether this device has bf16 arithmetic, the dense GEMM rate it
measures, and ``--mixed-precision auto``'s choice between bf16 autocast and fp32."""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from catfast.errors import CatfastError

BF16_MARGIN = 1.2  # --mixed-precision auto takes bf16 only where its GEMM is this much faster than fp32's


def gemm_rate(dtype: torch.dtype, device: str, n: int | None = None, reps: int = 5) -> float:
    """Dense GEMM FLOP/s of this device at ``dtype`` and the current thread count: median of ``reps``
    square ``n x n`` matmuls (2 n^3 FLOPs each) after one warm-up. ``n`` defaults to 1024 on the CPU and 8192 on
    CUDA (a 1024 product takes microseconds on an H100-class GPU: launch overhead, not the GEMM rate)."""
    n = n or (8192 if device == "cuda" else 1024)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    times = []
    for i in range(reps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def bf16_support(device: str) -> tuple[bool, str]:
    """Whether this device has bf16 arithmetic (autocast then runs it natively, not emulated), and what says
    so. Whether it is also faster than fp32 is measured (``resolve_mixed_precision``)."""
    if device == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return ok, f"torch.cuda.is_bf16_supported() = {ok}"
    flags = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    have = sorted(flags & {"avx512_bf16", "amx_bf16"})
    if have:
        return True, f"CPU flags {', '.join(have)}"
    return False, "this CPU lists neither avx512_bf16 nor amx_bf16 (bf16 would be emulated, slower than fp32)"


def resolve_mixed_precision(request: str, device: str) -> tuple[str, str]:
    """("bf16" or "no", why) for ``request`` in {"no", "bf16", "auto"}; bf16 asked on a device without it
    raises (only ``auto`` falls back). ``auto`` on a CPU with bf16 instructions also times a bf16 and an fp32
    GEMM and keeps fp32 unless bf16 is ``BF16_MARGIN`` faster: the dev CPU lists avx512_bf16 but, its AMX
    hidden by the VM, ran a 1024^3 bf16 GEMM at about half the fp32 rate (68-83 against 111-159 GFLOP/s at
    1 thread); one check run while another process was busy measured fp32 at 72 and bf16 at 82, which the
    margin keeps from choosing the slower precision."""
    if request == "no":
        return "no", "fp32 (asked)"
    ok, why = bf16_support(device)
    if ok and request == "auto" and device == "cpu":
        fp32, bf16 = gemm_rate(torch.float32, device), gemm_rate(torch.bfloat16, device)
        rates = f"a bf16 GEMM ran at {bf16 / 1e9:.0f} GFLOP/s against fp32's {fp32 / 1e9:.0f}"
        if bf16 < BF16_MARGIN * fp32:
            return "no", f"fp32: {why}, but {rates}"
        why = f"{why}; {rates}"
    if ok:
        return "bf16", f"bf16 autocast: {why}"
    if request == "auto":
        return "no", f"fp32: {why}"
    raise CatfastError(f"--mixed-precision bf16 asked, but {why}; use --mixed-precision auto or no")


def _autocast_factory(precision: str, device: str):
    if precision == "bf16":
        return lambda: torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext
