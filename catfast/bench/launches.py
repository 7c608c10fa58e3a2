"""Count what a step asks the device to do: the aten ops that launch work, and the ones that make the host
wait for the device (docs/design.md, "What a step issues").

On a GPU a batch-1 LoRA step is bound by how many kernels the host issues, not by arithmetic; on the CPU
the same count is read off the dispatcher. ``LaunchCounter`` is a ``TorchDispatchMode`` that sees every aten
op below autograd, the backward's included, and sorts them:

- **launching ops**: everything that runs work on the device. Not counted: views (an op whose outputs alias
  its input without writing it: ``view``, ``transpose``, ``detach``, ...) and allocations without a fill
  (``empty``, ``new_empty``, ``empty_strided``, ...): neither launches a kernel on a GPU. ``zeros`` (a fill)
  counts. catfast's own custom ops (``catfast::``, seen only while tracing) count as one launch each, and so
  does each Triton kernel catfast's launchers start (``catfast.kernels.launched``; not an aten op);
- **host syncs**: data-dependent ops whose result the host must read before it can go on (``item`` /
  ``_local_scalar_dense``, ``nonzero``, ``masked_select``, ``unique``, ``repeat_interleave`` without an output
  size, ``equal``, ``is_nonzero``). A step of catfast should issue none.
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

from catfast.kernels import launched

ALLOCATIONS = frozenset({"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "empty_permuted"})
SYNCS = frozenset(
    {"_local_scalar_dense", "item", "nonzero", "nonzero_static", "masked_select", "unique", "_unique", "_unique2",
     "unique_consecutive", "unique_dim", "equal", "is_nonzero", "_assert_async"}  # fmt: skip
)


def op_name(func) -> str:
    """``aten.add_.Tensor`` -> ``add_``; a custom op keeps its namespace (``catfast::lora_gemm``)."""
    ns = func.namespace
    base = func._schema.name.split("::", 1)[-1]
    return base if ns == "aten" else f"{ns}::{base}"


# views whose schemas do not say so (``reshape`` of a contiguous tensor dispatches ``_unsafe_view``)
UNMARKED_VIEWS = frozenset({"_unsafe_view", "lift_fresh"})


def is_view(func, name: str) -> bool:
    """Whether op ``func`` (named ``name``) only aliases its input (no work): some output aliases an input and
    none is written."""
    if func.is_view or name in UNMARKED_VIEWS:
        return True
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def is_sync(func, args, name: str) -> bool:
    """Whether op ``func`` (named ``name``, ``op_name(func)``) makes the host wait for a device value."""
    if name in SYNCS:
        return True
    # repeat_interleave(repeats: Tensor) sizes its output from the repeats' values unless output_size is given
    return name == "repeat_interleave" and func._overloadname in ("Tensor", "self_Tensor") and len(args) < 4


class LaunchCounter(TorchDispatchMode):
    """Counts, while active, the launching ops and host syncs by name (see the module docstring); the Triton
    kernels catfast's launchers start meanwhile count one each, as ``triton::<kernel>``."""

    def __init__(self) -> None:
        super().__init__()
        self.launches: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self._triton_before: Counter[str] = Counter()

    def __enter__(self):
        self._triton_before = Counter(launched)
        return super().__enter__()

    def __exit__(self, *exc):
        for kernel, n in (launched - self._triton_before).items():
            self.launches[f"triton::{kernel}"] += n
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = op_name(func)
        if is_sync(func, args, name):
            self.syncs[name] += 1
        if not is_view(func, name) and name not in ALLOCATIONS:
            self.launches[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def launch_ops(self) -> int:
        return sum(self.launches.values())

    @property
    def host_syncs(self) -> int:
        return sum(self.syncs.values())


def count_step(step) -> LaunchCounter:
    """Run ``step()`` once under a ``LaunchCounter`` and return it."""
    with LaunchCounter() as counter:
        step()
    return counter
