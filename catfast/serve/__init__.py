"""Multi-adapter serving: ``Engine`` (adapter pool, mixed-adapter batches, step-level scheduler).

Importing this package is light; torch/diffusers load when an engine is built. See docs/serving-engine.md.
"""

from catfast.serve.requests import Event, GenerationRequest, RequestHandle


def __getattr__(name):
    if name == "AdapterInfo":  # pool.py imports torch (1.15 s): `catfast --help` imports this package
        from catfast.serve.pool import AdapterInfo  # lazy: startup

        return AdapterInfo
    if name == "Engine":
        from catfast.serve.engine import Engine  # lazy: startup

        return Engine
    raise AttributeError(name)


__all__ = ["AdapterInfo", "Engine", "Event", "GenerationRequest", "RequestHandle"]
