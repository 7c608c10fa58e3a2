"""The HTTP front of the serving engine: an OpenAI-compatible Images API, adapter management, health,
Prometheus metrics and the web playground, on FastAPI + uvicorn (docs/serving.md is the user guide).

Endpoints (``create_app``):

- ``POST /v1/images/generations``: the OpenAI Images API. ``model``: "base", an adapter name, or several
  joined by "+" each with an optional ":weight" ("striped-star:0.8+toy-box"); ``prompt``; ``n``;
  ``size`` "WxH" (default: the model's native size); ``response_format`` "b64_json" (the only one: the
  server keeps no files, so "url" is refused with 400). Extra fields: ``steps``, ``guidance_scale``,
  ``seed``, ``negative_prompt``, ``scheduler`` ("ddim", "euler", "dpmpp_2m"), and ``stream`` (true: a
  ``text/event-stream`` of ``image_generation.progress`` events, one ``image_generation.completed`` per
  image, then ``[DONE]``; the playground uses it). A client that disconnects cancels its request at the
  next denoising step.
- ``GET /v1/adapters`` (each with the trigger words its file records), ``POST /v1/adapters`` ({"name",
  "path"?}: a ``.safetensors`` file inside the adapters folder, default ``<name>.safetensors``),
  ``DELETE /v1/adapters/{name}``.
- ``GET /health`` (status, model limits), ``GET /metrics`` (Prometheus text), ``GET /`` (playground).

Errors are JSON in OpenAI's shape ``{"error": {"message", "type", "code"}}``: 400 bad request (bounds:
``catfast.serve.requests`` and ``protocol``; ``GET /openapi.json`` states them), 401 missing/wrong API key,
404 unknown adapter or route, 413 body too large, 422 adapter file that cannot be loaded or a result that
is not finite, 429 queue full, 504 timeout, 503 engine closed, 500 only when the engine itself failed
(``engine_failure``, or ``internal`` for a bug here). No client input makes a 5xx
(tests/test_robust_fuzz.py). With ``api_key``, every ``/v1`` route and
``/metrics`` need ``Authorization: Bearer <key>``; ``/health`` and the playground page stay open (the
page asks for the key). Adapter files are only read from inside the adapters folder (symlinks are
resolved first), only as safetensors: the server never unpickles.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException as StarletteHTTPException

from catfast.serve.errors import ServeError
from catfast.serve.openapi import openapi_spec
from catfast.serve.protocol import (
    MAX_BODY,
    HTTPError,
    adapter_json,
    http_error,
    parse_json_body,
    parse_model,
    png_b64,
    refuse_unknown,
    request_fields,
    safe_adapter_path,
    sse,
)
from catfast.serve.requests import GenerationRequest, check_adapter_name

__all__ = ["HTTPError", "Server", "create_app", "http_error", "parse_model", "png_b64", "request_fields", "run",
           "safe_adapter_path"]  # fmt: skip

log = logging.getLogger("catfast.serve.http")

STATIC = Path(__file__).parent / "static"
_POLL_S = 0.25  # how often a waiting request checks whether its client is still there
# the routes whose answers /metrics counts by status
_COUNTED = ("/v1/images/generations", "/v1/adapters", "/v1/adapters/{name}", "/health", "/metrics")


def create_app(engine, *, api_key: str | None = None, adapters_dir=None, model_name: str = "catfast"):
    """The FastAPI app over a started (or startable) ``catfast.serve.Engine``. ``adapters_dir``: the only
    folder adapter files may be registered from over HTTP (default: the engine's)."""
    folder = Path(adapters_dir) if adapters_dir is not None else getattr(engine, "adapters_dir", None)
    metrics = _Metrics(engine)
    app = FastAPI(title="catfast serve", docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    spec = openapi_spec(engine, auth=api_key is not None)
    app.openapi = lambda: spec  # the bounds of this engine (catfast/serve/openapi.py), not FastAPI's guess
    app.state.engine = engine
    _add_error_handlers(app)
    app.add_middleware(_AuthAndCount, api_key=api_key, metrics=metrics)
    _add_generation_routes(app, engine, metrics)
    _add_adapter_routes(app, engine, folder)
    _add_status_routes(app, engine, metrics, api_key is not None, model_name)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class _Metrics:
    """The app's Prometheus registry: the engine's gauges and counters (read at scrape time), answers by
    route and status, generation wall time, and requests cancelled because the client left."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.http_requests = Counter(
            "catfast_http_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.generation_seconds = Histogram(
            "catfast_generation_seconds",
            "Wall time of answered image generation requests",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.cancelled = Counter(
            "catfast_cancelled_requests", "Requests cancelled because the client left", registry=self.registry
        )


def _error_response(err: HTTPError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error answers in OpenAI's shape: our HTTPErrors, engine errors and unknown routes here;
    crashes (a bug) in ``_AuthAndCount``."""

    @app.exception_handler(HTTPError)
    async def _http_error(request, err: HTTPError):
        return _error_response(err)

    @app.exception_handler(ServeError)
    async def _serve_error(request, err: ServeError):
        return _error_response(http_error(err))

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request, err):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        message = f"{request.method} {request.url.path}: {err.detail}"
        return _error_response(HTTPError(err.status_code, message, code=code))


class _AuthAndCount:
    """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the endpoints):
    checks the API key, counts answers by route and status, and turns an unhandled exception (a bug in
    this server, never a client's fault) into a 500 in OpenAI's shape without re-raising it: Starlette's
    own handler re-raises, and uvicorn then closed the connection, resetting a keep-alive client's next
    request."""

    def __init__(self, inner, *, api_key: str | None, metrics: _Metrics):
        self.inner, self.api_key, self.metrics = inner, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.inner(scope, receive, send)
        path = scope["path"]
        route = path if not path.startswith("/v1/adapters/") else "/v1/adapters/{name}"
        if self.api_key is not None and (path.startswith("/v1") or path == "/metrics"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key.encode()):
                self.metrics.http_requests.labels(route, "401").inc()
                message = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                response = _error_response(HTTPError(401, message, "authentication_error", "invalid_api_key"))
                return await response(scope, receive, send)

        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                if route in _COUNTED:
                    self.metrics.http_requests.labels(route, str(message["status"])).inc()
            await send(message)

        try:
            await self.inner(scope, receive, counting_send)
        except Exception as e:  # noqa: BLE001 - a bug: answer it, log it, keep the connection
            log.exception("unhandled error on %s %s", scope.get("method"), path)
            if not started:
                message = f"internal error in catfast serve ({type(e).__name__}); the server log has the traceback"
                response = _error_response(HTTPError(500, message, "server_error", "internal"))
                await response(scope, receive, counting_send)


async def _json_body(request: Request) -> dict:
    """The request's JSON object body (``parse_json_body``: 413 above MAX_BODY bytes, 400 when not a
    JSON object). A body without a length is read only up to MAX_BODY + 1 bytes."""
    too_large = HTTPError(413, f"request body is larger than {MAX_BODY} bytes", code="body_too_large")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise too_large
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY:
            raise too_large
    return parse_json_body(bytes(raw))


def _images_json(images) -> list[dict]:
    return [{"b64_json": png_b64(im), "revised_prompt": None} for im in images]


def _add_generation_routes(app: FastAPI, engine, metrics: _Metrics) -> None:
    """POST /v1/images/generations: one JSON answer, or (``stream``) server-sent events."""

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        body = await _json_body(request)
        fields, stream = request_fields(body, engine.native_size)
        t0 = time.perf_counter()
        handle = engine.submit(GenerationRequest(**fields))  # BadRequest / UnknownAdapter / QueueFull before any work
        created = int(time.time())
        if stream:
            return StreamingResponse(
                _stream(handle, created, t0, metrics),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await _wait_for_result(request, handle, metrics)
        if result is None:
            return Response(status_code=499)
        if "error" in result:
            raise result["error"]
        data = await asyncio.to_thread(_images_json, result["images"])
        metrics.generation_seconds.observe(time.perf_counter() - t0)
        side = result["images"][0].size
        return {
            "created": created,
            "data": data,
            "output_format": "png",
            "size": f"{side[0]}x{side[1]}",
            "seed": handle.seed,
        }


async def _wait_for_result(request: Request, handle, metrics: _Metrics) -> dict | None:
    """{"images": ...} or {"error": ...} of a request, or None when the client left (the request is then
    cancelled at the next denoising step)."""
    done = asyncio.Event()
    result: dict = {}

    async def follow():
        try:
            async for ev in handle.events():
                if ev.kind == "done":
                    result["images"] = ev.images
                elif ev.kind == "error":
                    result["error"] = ev.error
        finally:
            done.set()

    task = asyncio.create_task(follow())
    try:
        while not done.is_set():
            try:
                await asyncio.wait_for(done.wait(), _POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    handle.cancel()
                    metrics.cancelled.inc()
                    task.cancel()
                    return None
    except asyncio.CancelledError:
        handle.cancel()
        metrics.cancelled.inc()
        task.cancel()
        raise
    return result


async def _stream(handle, created: int, t0: float, metrics: _Metrics):
    """The server-sent events of a streamed request: queued, progress per step, an error or one completed
    event per image, then [DONE]. A client that leaves closes the generator, which cancels the request."""
    finished = False
    try:
        async for ev in handle.events():
            if ev.kind == "queued":
                yield sse({"type": "image_generation.queued", "created_at": created, "seed": handle.seed})
            elif ev.kind == "progress":
                yield sse({"type": "image_generation.progress", "step": ev.step, "steps": ev.steps})
            elif ev.kind == "error":
                err = http_error(ev.error) if isinstance(ev.error, ServeError) else HTTPError(500, str(ev.error))
                error = {"message": err.message, "type": err.type, "code": err.code, "status": err.status}
                yield sse({"type": "error", "error": error})
                finished = True
                break
            elif ev.kind == "done":
                data = await asyncio.to_thread(_images_json, ev.images)
                w, h = ev.images[0].size
                for i, item in enumerate(data):
                    yield sse(
                        {
                            "type": "image_generation.completed",
                            "index": i,
                            "b64_json": item["b64_json"],
                            "created_at": created,
                            "size": f"{w}x{h}",
                            "output_format": "png",
                            "seed": handle.seed,
                        }
                    )
                metrics.generation_seconds.observe(time.perf_counter() - t0)
                finished = True
                break
        yield sse("[DONE]")
    finally:
        if not finished:  # the client went away (the generator was closed) or the stream broke
            handle.cancel()
            metrics.cancelled.inc()


def _add_adapter_routes(app: FastAPI, engine, folder: Path | None) -> None:
    """GET/POST /v1/adapters and DELETE /v1/adapters/{name}; adds and removes run one at a time."""
    admin_lock = threading.Lock()

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"object": "list", "data": [adapter_json(a, folder) for a in engine.adapters()]}

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(request: Request):
        body = await _json_body(request)
        refuse_unknown(body, {"name", "path"})
        name = check_adapter_name(body.get("name"))
        path = safe_adapter_path(folder, name, body.get("path"))

        def load():
            with admin_lock:
                return engine.load_adapter(name, path)

        info = await asyncio.to_thread(load)
        return JSONResponse(adapter_json(info, folder), status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        check_adapter_name(name)

        def unload():
            with admin_lock:
                engine.unload_adapter(name)

        await asyncio.to_thread(unload)
        return {"id": name, "object": "adapter", "deleted": True}


def _add_status_routes(app: FastAPI, engine, metrics: _Metrics, auth: bool, model_name: str) -> None:
    """GET /health, /metrics (Prometheus text) and / (the playground)."""

    @app.get("/health")
    async def health():
        s = engine.stats()
        return {
            "status": "ok",
            "model": model_name,
            "native_size": engine.native_size,
            "defaults": engine.defaults,
            "auth": auth,
            "queue_depth": s["queue_depth"],
            "running": s["running"],
            "registered": s["registered"],
        }

    @app.get("/metrics")
    async def metrics_text():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico")
    async def favicon():  # the demo's striped star; browsers ask for it at this path
        return FileResponse(STATIC / "favicon.ico", media_type="image/x-icon")


class _EngineCollector:
    """Prometheus collector that reads ``engine.stats()`` at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        gauges = (
            ("catfast_queue_depth", "Requests waiting in the queue", s["queue_depth"]),
            ("catfast_running_requests", "Requests in the running batch", s["running"]),
            ("catfast_batch_size", "Images in the last denoising step's batch", s["batch_size"]),
            ("catfast_step_latency_seconds", "Duration of the last denoising step", s["step_latency_s"] or 0.0),
            ("catfast_adapters_resident", "Adapters resident on the device", s["resident"]),
            ("catfast_adapters_registered", "Adapters registered by name", s["registered"]),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(name, doc, value=float(value))
        counters = (
            ("catfast_adapter_hits", "Requests whose adapter was already resident", s["adapter_hits"]),
            ("catfast_adapter_loads", "Adapters copied into a device slot", s["adapter_loads"]),
            ("catfast_adapter_evictions", "Adapters evicted from a device slot", s["adapter_evictions"]),
        )
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=float(value))


class Server:
    """uvicorn running ``app`` in a background thread (tests, benchmarks, notebooks): ``start()`` returns
    once it listens; ``url``; ``stop()``. ``catfast serve`` uses ``run`` instead (foreground)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        self.config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(self.config)
        self.thread: threading.Thread | None = None

    def start(self, timeout: float = 30.0) -> Server:
        self.thread = threading.Thread(target=self.server.run, name="catfast-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ServeError(f"the HTTP server did not start on {self.config.host}:{self.config.port}")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        sock = self.server.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` in the foreground until interrupted (``catfast serve``)."""
    uvicorn.run(app, host=host, port=port, log_level=log_level, lifespan="off")
