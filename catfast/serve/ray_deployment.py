"""Ray Serve replicas of the serving engine (``pip install catfast[ray]``; docs/serving.md, "Ray Serve").

``CatfastDeployment`` wraps one ``catfast.serve.Engine`` per replica and uses Ray Serve's model
multiplexing: the multiplexed model id of a request is its ``model`` string ("striped-star",
"striped-star:0.8+toy-box", or "base"), so Ray routes a request to a replica that already registered its
adapters, and each replica keeps up to ``max_adapters_per_replica`` such ids (LRU; an evicted id
unregisters its adapters once no other id on the replica needs them). Inside a replica, requests for
different adapters still share one batch (the engine's segmented LoRA path).

Two ways in:
- HTTP through Ray's proxy: ``POST /v1/images/generations`` with the OpenAI body (the same fields, limits
  and errors as ``catfast serve``) and the header ``serve_multiplexed_model_id: <model>`` (the proxy routes
  on the header; the body's ``model`` must match it or be absent);
- a ``DeploymentHandle``: ``handle.options(multiplexed_model_id=model).generate.remote(body)``.

Adapters are read only from the deployment's ``adapters_dir`` (``<name>.safetensors``), as with
``catfast serve``. Every answer carries ``replica`` (the Ray replica id) and ``registered`` (its adapters).

Run it::

    serve run catfast.serve.ray_deployment:app base=demo num_replicas=2
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse

from catfast.errors import CatfastError
from catfast.serve.engine import Engine, default_adapters_dir
from catfast.serve.errors import ServeError, UnknownAdapter
from catfast.serve.http import HTTPError, http_error, parse_model, png_b64, request_fields, safe_adapter_path
from catfast.serve.requests import GenerationRequest, check_adapter_name

try:
    from ray import serve
except ImportError:
    raise CatfastError('Ray Serve is not installed: pip install "catfast[ray]"') from None


class _AdapterSet:
    """What the multiplexed loader returns for one model id: the adapter names it registered on this
    replica. Ray drops it when the id is evicted (LRU); ``release`` then unregisters unshared names."""

    def __init__(self, owner: CatfastDeployment, model_id: str, names: list[str]):
        self.owner, self.model_id, self.names = owner, model_id, names

    def __del__(self):
        try:
            self.owner._release(self.names)
        except Exception:  # noqa: BLE001 - never raise from a finalizer (the replica may be shutting down)
            pass


@serve.deployment(ray_actor_options={"num_cpus": 1})
class CatfastDeployment:
    """One serving engine per replica; see the module docstring."""

    def __init__(
        self,
        base: str = "demo",
        adapters_dir: str | None = None,
        *,
        device: str | None = None,
        max_batch: int = 8,
        max_queue: int = 64,
        max_resident: int = 16,
        timeout_s: float = 300.0,
    ):

        adapters_dir = default_adapters_dir(base, adapters_dir)
        self.adapters_dir = None if adapters_dir is None else Path(adapters_dir)
        # adapters are registered on demand (multiplexing), not all at start: no adapters_dir for the engine
        self.engine = Engine(
            base,
            device=device,
            max_batch=max_batch,
            max_queue=max_queue,
            max_resident=max_resident,
            timeout_s=timeout_s,
        ).start()
        self._uses: dict[str, int] = {}  # adapter name -> multiplexed ids on this replica that need it
        self.replica = serve.get_replica_context().replica_id.unique_id

    # ------------------------------------------------------------------------------ multiplexing

    @serve.multiplexed(max_num_models_per_replica=8)
    async def _adapters_for(self, model_id: str) -> _AdapterSet:
        names = list(parse_model(model_id))
        counted = []
        try:
            for name in names:
                if self._uses.get(name, 0) == 0:
                    check_adapter_name(name)
                    path = safe_adapter_path(self.adapters_dir, name, None)
                    if not path.is_file():
                        raise UnknownAdapter(f"no adapter named {name!r} in the adapters folder")
                    await asyncio.to_thread(self.engine.load_adapter, name, path)
                self._uses[name] = self._uses.get(name, 0) + 1
                counted.append(name)
        except BaseException:
            self._release(counted)
            raise
        return _AdapterSet(self, model_id, names)

    def _release(self, names: list[str]) -> None:
        for name in names:
            self._uses[name] -= 1
            if self._uses[name] == 0:
                del self._uses[name]
                try:
                    self.engine.unload_adapter(name)
                except ServeError:
                    pass

    # ------------------------------------------------------------------------------ requests

    async def generate(self, body: dict) -> dict:
        """An OpenAI images/generations body -> the OpenAI response (plus ``replica``, ``registered``,
        ``seed``); errors as ``{"error": {...}, "status": code}``."""
        try:
            return await self._generate(body)
        except HTTPError as e:
            return {"error": {"message": e.message, "type": e.type, "code": e.code}, "status": e.status}
        except ServeError as e:
            err = http_error(e)
            return {"error": {"message": err.message, "type": err.type, "code": err.code}, "status": err.status}

    async def _generate(self, body: dict) -> dict:

        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        routed = serve.get_multiplexed_model_id()
        model = body.get("model", routed or "base")
        if routed and model != routed:
            raise HTTPError(400, f"model {model!r} differs from the routing header's {routed!r}; send the same")
        body = {**body, "model": model}
        fields, stream = request_fields(body, self.engine.native_size)
        if stream:
            raise HTTPError(400, "stream is not supported through the Ray deployment; leave it out")
        if fields["adapters"]:
            await self._adapters_for(model)  # registers (or finds) this id's adapters on this replica
        handle = self.engine.submit(GenerationRequest(**fields))
        try:
            images = await asyncio.to_thread(handle.result)
        except BaseException:
            handle.cancel()
            raise
        data = await asyncio.to_thread(lambda: [{"b64_json": png_b64(im), "revised_prompt": None} for im in images])
        return {
            "created": int(time.time()),
            "data": data,
            "output_format": "png",
            "size": f"{images[0].size[0]}x{images[0].size[1]}",
            "seed": handle.seed,
            "replica": self.replica,
            "registered": sorted(a.name for a in self.engine.adapters()),
        }

    async def __call__(self, request: Request):
        if request.method != "POST" or not request.url.path.rstrip("/").endswith("/v1/images/generations"):
            return JSONResponse({"error": {"message": "POST /v1/images/generations only", "code": "not_found"}}, 404)
        try:
            body = await request.json()
        except ValueError as e:
            return JSONResponse(
                {"error": {"message": f"the body is not valid JSON ({e})", "code": "invalid_json"}}, 400
            )
        result = await self.generate(body)
        status = result.pop("status", 200) if "error" in result else 200
        return JSONResponse(result, status_code=status)

    def check_health(self) -> None:
        if self.engine.stats() is None:
            raise RuntimeError("engine gone")


def app(args: dict | None = None):
    """The application for ``serve run catfast.serve.ray_deployment:app base=... num_replicas=...``."""
    args = dict(args or {})
    replicas = int(args.pop("num_replicas", 1))
    for key in ("max_batch", "max_queue", "max_resident"):
        if key in args:
            args[key] = int(args[key])
    if "timeout_s" in args:
        args["timeout_s"] = float(args["timeout_s"])
    return CatfastDeployment.options(num_replicas=replicas).bind(**args)
