"""The one backend registry: which implementations ("backends") each catfast op has, whether each can
run on a device and why not, and the one place ``CATFAST_BACKEND`` is read.

Backends, in the order the automatic choice tries them:

- ``ext``: the compiled extension ``catfast._C`` (C++ on the CPU, CUDA where built);
- ``triton``: Triton kernels (``catfast/kernels/``); on CUDA, or on the CPU under ``TRITON_INTERPRET=1``;
- ``torch``: pure-torch code, on every device.

The automatic choice (``CATFAST_BACKEND`` unset) takes the first backend of the op, in that order,
that can run, except Triton under the CPU interpreter: the interpreter is a debugging tool (a tiny-UNet
CAT step took ~10 s with it on the dev CPU, well under 1 s on the torch backend), so it is used only
when asked for. ``CATFAST_BACKEND=ext|triton|torch`` forces one backend for every op with kernels (more
than one backend): such an op that does not have it, or whose probe says it cannot run on these
tensors, raises ``BackendError`` naming the op and the reason. Ops registered with the torch backend
only (``lora_conv2d``: torch's convolutions, no kernel of ours) run as they are under any valid value:
forcing ``triton`` for the LoRA Linears of a UNet whose convolutions carry LoRA too must not fail the
convolutions. Any other value raises ``BackendError`` listing the valid ones, in every op.

Adding an op (one call, at the import of the op's module; then add the module to ``OP_MODULES`` so
``catfast env`` lists it)::

    from catfast.backends import ext_probe, register, torch_probe, triton_probe

    register("group_norm_silu", "fused GroupNorm + SiLU", ext=ext_probe, torch=torch_probe)

and in the op: ``backend = choose("group_norm_silu", x.device, x.dtype, requested=backend)``. A probe is
``probe(device, dtype) -> str | None``: None when the backend can run there, else the reason. Reasons
that depend on the call's tensors (contiguity, a mix of devices) are passed to ``choose`` as
``why_not={"ext": [...]}``. This module imports nothing heavy (torch only inside functions).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from catfast.errors import CatfastError

ENV_VAR = "CATFAST_BACKEND"
BACKENDS = ("ext", "triton", "torch")  # also the automatic choice's order
# the modules whose import registers the ops (``table`` imports them)
OP_MODULES = (
    "catfast.ops.lora",
    "catfast.ops.lora_conv",
    "catfast.ops.segmented",
    "catfast.ops.merge",
    "catfast.ops.cat_loss",
    "catfast.ops.groupnorm_silu",
)

Probe = Callable[..., "str | None"]


class BackendError(CatfastError, RuntimeError):
    """``CATFAST_BACKEND`` (or a ``backend=`` argument) names a backend that is unknown, or that an op
    does not have or cannot run on the given tensors."""


@dataclass(frozen=True)
class Op:
    """One registered op: its name, a one-line description and its probes by backend (in ``BACKENDS`` order)."""

    name: str
    doc: str
    probes: tuple[tuple[str, Probe], ...]

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(b for b, _ in self.probes)


_REGISTRY: dict[str, Op] = {}
# choose()'s answers by (op, device, dtype, requested, CATFAST_BACKEND, TRITON_INTERPRET) for calls without
# per-call reasons: the probes cost ~30 us a call on the loaded dev CPU, and lora_linear asks once per layer
_CHOSEN: dict[tuple, str] = {}


def register(op: str, doc: str, **probes: Probe) -> Op:
    """Declare ``op``'s backends: ``ext=``, ``triton=``, ``torch=`` probes (at least one). Registering a
    name again replaces it (module reloads)."""
    unknown = sorted(set(probes) - set(BACKENDS))
    if unknown or not probes:
        raise ValueError(f"register({op!r}): backends must be among {BACKENDS}, got {sorted(probes)}")
    entry = Op(op, doc, tuple((b, probes[b]) for b in BACKENDS if b in probes))
    _REGISTRY[op] = entry
    _CHOSEN.clear()
    return entry


def get(op: str) -> Op:
    """The registered op ``op`` (importing ``OP_MODULES`` first if it is not registered yet)."""
    if op not in _REGISTRY:
        _import_ops()
    try:
        return _REGISTRY[op]
    except KeyError:
        raise ValueError(f"unknown catfast op {op!r}; registered: {', '.join(sorted(_REGISTRY))}") from None


def _import_ops() -> None:
    import importlib

    for name in OP_MODULES:
        importlib.import_module(name)


def forced() -> str | None:
    """The backend ``CATFAST_BACKEND`` forces, or None when it is unset or empty (the automatic choice)."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        valid = ", ".join(BACKENDS)
        raise BackendError(f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a backend; valid: {valid} (or unset)")
    return value


def reasons(op: str, device, dtype=None, why_not: Mapping[str, Iterable[str]] | None = None) -> dict[str, list[str]]:
    """For each backend of ``op``: the reasons it cannot run on ``device``/``dtype`` (empty: it can)."""
    import torch

    device = torch.device(device)
    out = {}
    for backend, probe in get(op).probes:
        found = probe(device, dtype)
        out[backend] = ([found] if found else []) + list((why_not or {}).get(backend, ()))
    return out


def choose(op: str, device, dtype=None, *, requested: str | None = None,
           why_not: Mapping[str, Iterable[str]] | None = None) -> str:  # fmt: skip
    """The backend ``op`` runs on for tensors on ``device`` of ``dtype``: ``requested`` (a ``backend=``
    argument) if given, else ``CATFAST_BACKEND`` if set, else the automatic choice (module docstring).
    Raises ``BackendError`` when the requested or forced backend cannot run, naming the op and why."""
    key = None
    if why_not is None:
        key = (op, device, dtype, requested, os.environ.get(ENV_VAR), os.environ.get("TRITON_INTERPRET"))
        hit = _CHOSEN.get(key)
        if hit is not None:
            return hit
    chosen = _choose(op, device, dtype, requested, why_not)
    if key is not None:
        _CHOSEN[key] = chosen
    return chosen


def _choose(op, device, dtype, requested, why_not) -> str:
    import torch

    device = torch.device(device)
    entry = get(op)
    source = "backend=" if requested else f"{ENV_VAR}="
    wanted = requested if requested else forced()
    if wanted is not None and not requested and entry.backends == ("torch",):
        wanted = None  # a torch-only op: nothing to force (the value was checked by forced())
    if wanted is not None:
        if wanted not in BACKENDS:
            raise BackendError(f"backend={wanted!r} is not a backend; valid: {', '.join(BACKENDS)}")
        if wanted not in entry.backends:
            has = ", ".join(entry.backends)
            raise BackendError(f"{source}{wanted}: op {op} has no {wanted} backend (it has {has})")
        why = reasons(op, device, dtype, why_not)[wanted]
        if why:
            raise BackendError(f"{source}{wanted}: op {op} cannot run on {wanted} here: {'; '.join(why)}")
        return wanted
    why = reasons(op, device, dtype, why_not)
    for backend in entry.backends:
        if why[backend] or (backend == "triton" and device.type != "cuda"):
            continue
        return backend
    raise BackendError(f"op {op}: no backend can run on {device} / {dtype}: " + "; ".join(
        f"{b}: {', '.join(r)}" for b, r in why.items()))  # fmt: skip


def table(device=None) -> list[dict]:
    """One row per (op, backend) for ``device`` (default: cuda when available, else cpu): whether it can
    run, why not, and whether the automatic choice takes it. Imports the op modules (``OP_MODULES``)."""
    import torch

    _import_ops()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for op in sorted(_REGISTRY):
        why = reasons(op, device)
        try:
            chosen = choose(op, device)
        except BackendError as e:
            chosen = f"error: {e}"
        for backend in _REGISTRY[op].backends:
            rows.append(dict(op=op, backend=backend, device=str(torch.device(device)), available=not why[backend],
                             reason="; ".join(why[backend]) or None, chosen=chosen == backend))  # fmt: skip
    return rows


# -- shared probes --------------------------------------------------------------------------------------

_HALF_AND_FULL = ("float32", "float16", "bfloat16")


def _dtype_reason(dtype) -> str | None:
    if dtype is not None and str(dtype).removeprefix("torch.") not in _HALF_AND_FULL:
        return f"dtype {dtype} is not float32/float16/bfloat16"
    return None


def torch_probe(device, dtype=None) -> str | None:
    """The pure-torch backend runs everywhere torch does."""
    return None


def triton_probe(device, dtype=None) -> str | None:
    """Triton runs on CUDA devices, and on the CPU under TRITON_INTERPRET=1, for fp32/fp16/bf16."""
    cap = has_triton()
    if not cap.available and not (device.type == "cpu" and cap.version and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"triton unavailable: {cap.detail}"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "tensors on cpu, and TRITON_INTERPRET=1 is not set"
    if device.type not in ("cpu", "cuda"):
        return f"tensors on {device.type}: triton runs on cuda (or the cpu interpreter)"
    return _dtype_reason(dtype)


def ext_probe(device, dtype=None) -> str | None:
    """The extension's ops run on CPU tensors (CUDA ones where the CUDA part was built), fp32/fp16/bf16."""
    from catfast._ext import EXT, EXT_ERROR

    if EXT is None:
        return f"catfast._C unavailable: {EXT_ERROR}"
    if device.type != "cpu" and not getattr(EXT, "has_cuda", False):
        return f"tensors on {device.type}: catfast._C was built for the CPU only"
    return _dtype_reason(dtype)


# The CUDA and Triton capability probes (``catfast env`` prints them; ``triton_probe`` asks the second).


@dataclass(frozen=True)
class Capability:
    """One probe's answer: whether the thing is usable, its version, and why not when it is not."""

    name: str
    available: bool
    version: str | None = None
    detail: str | None = None


@functools.cache
def has_cuda() -> Capability:
    import torch

    if not torch.cuda.is_available():
        reason = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA device visible"
        return Capability("cuda", False, torch.version.cuda, reason)
    name = torch.cuda.get_device_name()
    major, minor = torch.cuda.get_device_capability()
    return Capability("cuda", True, torch.version.cuda, f"{name}, sm_{major}{minor}")


@functools.cache
def has_triton() -> Capability:
    """Triton is usable when it imports and either a CUDA device is present or TRITON_INTERPRET=1."""
    try:
        import triton
    except Exception as e:
        return Capability("triton", False, None, f"import failed: {type(e).__name__}: {e}")
    if has_cuda().available:
        return Capability("triton", True, triton.__version__, "compiles for the CUDA device")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return Capability("triton", True, triton.__version__, "CPU interpreter (TRITON_INTERPRET=1), slow")
    return Capability("triton", False, triton.__version__, "no CUDA device; set TRITON_INTERPRET=1 to interpret on CPU")
