"""``catfast train --cuda-graphs``: the whole training step (CAT forward, backward, gradient clipping and the
optimizer step) captured once per batch shape as a CUDA graph and replayed, so the host issues one graph
launch a step instead of thousands of kernels (a batch-1 step is bound by what the host issues).

How (PyTorch's whole-network capture): each batch shape (an aspect bucket) first runs ``WARMUP`` eager steps
on a side stream (real training steps: the allocator, cuBLAS and the row plans' device tensors settle; the
plans are reused from then on, ``RowPlan.build``), then the next step of that shape is captured into a graph
with static input buffers and replayed; later steps of the shape copy their batch into the buffers and replay.
The optimizer is built ``capturable`` (its state and step count live on the GPU and update in place), the
gradients are the graph's own buffers, and the loss terms come back in one static tensor.

What cannot be captured is refused before the run starts, with the setting named (``check_graphable``).
Not yet run on a GPU: the lease of the session that wrote it had no device; the parity test
(tests/test_cuda_graphs.py) runs wherever CUDA exists.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from catfast.errors import CatfastError

WARMUP = 2  # eager steps per batch shape before its capture


def check_graphable(config, device: torch.device, world: int, adapters: int) -> None:
    """Raise CatfastError (one line, the setting named) when ``--cuda-graphs`` cannot capture this run."""
    if device.type != "cuda":
        raise CatfastError(f"--cuda-graphs needs a CUDA GPU; this run is on {device.type} (drop --cuda-graphs)")
    dynamic = {
        "mixed_precision fp16": config.mixed_precision == "fp16",  # the loss scaler skips steps by reading the grads
        f"lr_schedule {config.lr_schedule} / warmup_steps {config.warmup_steps}": (
            config.lr_schedule != "constant" or config.warmup_steps > 0  # the lr is a constant of the captured step
        ),
        f"grad_accum {config.grad_accum}": config.grad_accum > 1,
        f"{world} processes (torchrun)": world > 1,
        f"{adapters} adapters (several concepts)": adapters > 1,  # each batch's row plan differs
        "retention rows (bank / keep / cat_prompts)": bool(config.bank or config.keep)
        or config.cat_prompts != "stripped",
        f"mode {config.mode}": config.mode == "measure",
    }
    for setting, refused in dynamic.items():
        if refused:
            raise CatfastError(f"--cuda-graphs cannot capture a step whose shape or constants change: {setting}")


def flatten_conditions(cond, name: str) -> dict[str, torch.Tensor]:
    """A text condition (a tensor, or SDXL's dict with ``added_cond_kwargs``) as flat name -> tensor entries."""
    if isinstance(cond, torch.Tensor):
        return {name: cond}
    flat = {f"{name}.encoder_hidden_states": cond["encoder_hidden_states"]}
    for key, value in (cond.get("added_cond_kwargs") or {}).items():
        flat[f"{name}.added.{key}"] = value
    return flat


def unflatten_conditions(flat: dict[str, torch.Tensor], name: str):
    """The inverse of ``flatten_conditions``."""
    if name in flat:
        return flat[name]
    prefix = f"{name}.added."
    added = {key[len(prefix):]: value for key, value in flat.items() if key.startswith(prefix)}
    return {"encoder_hidden_states": flat[f"{name}.encoder_hidden_states"], "added_cond_kwargs": added or None}


class GraphedSteps:
    """One captured training step per batch shape. ``run(inputs)`` takes the step's device tensors (a dict of
    name -> tensor) and returns the static loss-terms tensor of that step; ``body(inputs)`` is the step itself
    (forward, backward, clipping, optimizer step; returns the loss terms as one tensor); ``zero_grad()`` sets
    the trained parameters' gradients to None (the optimizer's ``zero_grad(set_to_none=True)``)."""

    def __init__(self, body: Callable[[dict], torch.Tensor], zero_grad: Callable[[], None]):
        self.body, self.zero_grad = body, zero_grad
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, dict, torch.Tensor]] = {}
        self.eager_steps: dict[tuple, int] = {}
        self.stream = torch.cuda.Stream()

    def run(self, inputs: dict) -> torch.Tensor:
        key = tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items()))
        hit = self.graphs.get(key)
        if hit is not None:
            graph, static, out = hit
            for name, t in inputs.items():
                static[name].copy_(t)
            graph.replay()
            return out
        if self.eager_steps.get(key, 0) < WARMUP:
            self.eager_steps[key] = self.eager_steps.get(key, 0) + 1
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                self.zero_grad()
                out = self.body(inputs)
            torch.cuda.current_stream().wait_stream(self.stream)
            return out
        static = {name: t.clone() for name, t in inputs.items()}
        graph = torch.cuda.CUDAGraph()
        self.zero_grad()  # the captured backward makes the gradients its own buffers
        with torch.cuda.graph(graph):
            out = self.body(static)
        self.graphs[key] = (graph, static, out)
        graph.replay()  # capturing ran nothing: this is the step
        return out
