"""Proving an exported graph: run it in ONNX Runtime (CPU provider) for every case (the merged weights,
or each adapter fed as inputs and the base) at every validation shape, against the fp32 PyTorch model with
the same weights merged, and report the errors against ``TOLERANCE``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from catfast.adapters.merge import merge_adapter_, resolve_targets
from catfast.errors import ExportError
from catfast.export.graphs import _inputs, _latent_factor, _source_model

# Relative error (max |ort - torch| / max |torch|) an export may show against PyTorch with the same merged
# weights. fp32: the bound. fp16: ORT fp16 vs torch fp32 measured 7e-4 on the tiny UNet, where torch's
# own fp16 forward is 1.3e-3 off its fp32 one; 1e-2 leaves room for deeper nets and still catches a wrong graph.
TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2}


def _ort_session(path: Path, providers: Sequence[str] = ("CPUExecutionProvider",)):
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT warns about every unused initializer of a traced graph
    return ort.InferenceSession(str(path), options, providers=list(providers))


def _errors(got: list[np.ndarray], want: list[torch.Tensor]) -> tuple[float, float]:
    """(max abs error, max relative error = max |got - want| / max |want|) over all outputs, in fp64."""
    abs_err, rel = 0.0, 0.0
    for g, w in zip(got, want):
        w64 = w.detach().double().numpy()
        g64 = g.astype(np.float64)
        if not (np.isfinite(g64).all() and np.isfinite(w64).all()):  # NaN compares as no error: fail it
            return float("inf"), float("inf")
        diff = float(np.abs(g64 - w64).max()) if w64.size else 0.0
        abs_err = max(abs_err, diff)
        rel = max(rel, diff / max(float(np.abs(w64).max()) if w64.size else 0.0, 1e-30))
    return abs_err, rel


@torch.no_grad()
def _torch_outputs(graph: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    out = graph(**inputs)
    return list(out) if isinstance(out, tuple) else [out]


def _validation_shapes(base, component: str, dynamic: bool) -> list[tuple[int, tuple[int, int], int]]:
    """(batch, latent side, text length) of each validation run: the traced shape at batch 2, then batch 1
    (and, when dynamic, another spatial size and text length) to prove the dynamic axes. (Batch 1, not 3:
    on the SD1.5 UNet a batch-3 run set the export's peak memory, torch and ORT activations side by side.)"""
    s = base.unet.config.sample_size
    f = _latent_factor(base)
    seq = base.tokenizer.model_max_length
    if not dynamic or component == "text_encoder":
        return [(2, (s, s), seq), (1, (s, s), seq)]
    return [(2, (s, s), seq), (1, (s + f, s + 2 * f), seq + 3)]


@torch.no_grad()
def _validate(base, component, reference, path, cases, dtype, dtype_name, dynamic, ac) -> dict:
    """Run the exported graph in ORT (CPU) for every case at every validation shape against fp32 torch."""
    try:
        session = _ort_session(path)
    except Exception as e:  # a graph the checker accepts can still fail ORT's type/shape inference
        raise ExportError(f"{component}: ONNX Runtime cannot load the exported graph: {e}") from None
    names = {i.name for i in session.get_inputs()}
    source = _source_model(base, component)
    runs = []
    for label, adapter, scale, feeds in cases:
        saved = None
        if adapter is not None and adapter.component(ac):  # torch reference: this adapter merged, restored after
            targets = resolve_targets(source, adapter, ac)
            saved = [(t.weight, t.weight.detach().clone()) for _, t in targets.values()]
            merge_adapter_(source, adapter, ac, scale)
        try:
            for i, (batch, side, seq) in enumerate(_validation_shapes(base, component, dynamic)):
                inputs = _inputs(base, component, batch, side, seq, seed=100 + i, dtype=dtype)
                missing = set(inputs) - names
                if missing:  # fed by name, never by position: a renamed input fails here, not silently
                    raise ExportError(f"{component}: the graph has no input {sorted(missing)[0]!r}")
                feed = {n: t.numpy() for n, t in inputs.items()}
                feed.update({k: v.numpy() for k, v in feeds.items()})
                got = session.run(None, feed)
                want = _torch_outputs(
                    reference, {n: t.float() if t.is_floating_point() else t for n, t in inputs.items()}
                )
                abs_err, rel = _errors(got, want)
                shape = list(next(iter(inputs.values())).shape)
                runs.append({"case": label, "batch": batch, "shape": shape, "abs_err": abs_err, "rel_err": rel})
        finally:
            for w, value in saved or ():
                w.copy_(value)
    tol = TOLERANCE[dtype_name]
    max_abs = max(r["abs_err"] for r in runs)
    max_rel = max(r["rel_err"] for r in runs)
    return {
        "provider": "CPUExecutionProvider",
        "tolerance": tol,
        "max_abs_err": max_abs,
        "max_rel_err": max_rel,
        "passed": bool(math.isfinite(max_rel) and max_rel <= tol),
        "runs": runs,
    }
