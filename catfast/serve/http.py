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

Errors are JSON in OpenAI's shape ``{"error": {"message", "type", "code"}}``: 400 bad request, 401
missing/wrong API key, 404 unknown adapter or route, 413 body too large, 422 adapter file that cannot
be loaded, 429 queue full, 504 timeout, 503 engine closed. With ``api_key``, every ``/v1`` route and
``/metrics`` need ``Authorization: Bearer <key>``; ``/health`` and the playground page stay open (the
page asks for the key). Adapter files are only read from inside the adapters folder (symlinks are
resolved first), only as safetensors: the server never unpickles.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import io
import json
import logging
import math
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from catfast.serve.errors import (
    AdapterLoadError,
    BadRequest,
    Cancelled,
    QueueFull,
    RequestTimeout,
    ServeError,
    UnknownAdapter,
)

log = logging.getLogger("catfast.serve.http")

STATIC = Path(__file__).parent / "static"
MAX_BODY = 1 << 20  # bytes of a JSON request body
# fields of OpenAI's images.generate that we accept; the ones not listed in _IGNORED are used
_OPENAI_FIELDS = {"model", "prompt", "n", "size", "response_format", "user", "quality", "style", "output_format"}
_EXTRA_FIELDS = {"steps", "guidance_scale", "seed", "negative_prompt", "scheduler", "stream"}
_POLL_S = 0.25  # how often a waiting request checks whether its client is still there


class HTTPError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


# ServeError subclass -> (status, OpenAI error type, code)
_STATUS = (
    (UnknownAdapter, 404, "invalid_request_error", "adapter_not_found"),
    (BadRequest, 400, "invalid_request_error", "invalid_value"),
    (AdapterLoadError, 422, "invalid_request_error", "adapter_load_failed"),
    (QueueFull, 429, "rate_limit_error", "queue_full"),
    (RequestTimeout, 504, "timeout_error", "timeout"),
    (Cancelled, 503, "server_error", "cancelled"),
)


def http_error(e: ServeError) -> HTTPError:
    """The HTTP error of an engine error (other ServeErrors: 503, the engine cannot serve it now)."""
    for cls, status, type_, code in _STATUS:
        if isinstance(e, cls):
            return HTTPError(status, str(e), type_, code)
    return HTTPError(503, str(e), "server_error", "unavailable")


def parse_model(model) -> dict[str, float]:
    """``model`` of a generation request -> {adapter: weight}. "base" (or None) -> {}; "a+b:0.5" ->
    {"a": 1.0, "b": 0.5}. Names are checked by the engine; this checks the syntax."""
    if model is None:
        return {}
    if not isinstance(model, str) or not model.strip():
        raise HTTPError(
            400, f"model must be 'base' or adapter names joined by '+', got {model!r}", code="invalid_model"
        )
    adapters: dict[str, float] = {}
    for part in model.strip().split("+"):
        name, sep, weight = part.strip().partition(":")
        if not name:
            raise HTTPError(400, f"model {model!r} has an empty adapter name (use 'a+b:0.5')", code="invalid_model")
        if name == "base":
            if sep:
                raise HTTPError(400, "'base' takes no weight", code="invalid_model")
            continue
        value = 1.0
        if sep:
            try:
                value = float(weight)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise HTTPError(
                    400,
                    f"weight of {name!r} must be a finite number (like {name}:0.8), got {weight!r}",
                    code="invalid_model",
                )
        if name in adapters:
            raise HTTPError(400, f"adapter {name!r} appears twice in model {model!r}", code="invalid_model")
        adapters[name] = value
    return adapters


def refuse_unknown(body: dict, accepted: set[str]) -> None:
    """HTTPError 400 naming the fields of ``body`` not in ``accepted`` (a misspelt field must not pass)."""
    unknown = sorted(set(body) - accepted)
    if unknown:
        message = f"unknown field(s) {', '.join(unknown)}; accepted: {', '.join(sorted(accepted))}"
        raise HTTPError(400, message, code="unknown_parameter")


def request_fields(body: dict, native: int) -> tuple[dict, bool]:
    """The GenerationRequest arguments of an images/generations body, and whether it asks to stream."""
    refuse_unknown(body, _OPENAI_FIELDS | _EXTRA_FIELDS)
    fmt = body.get("response_format") or "b64_json"
    if fmt != "b64_json":
        raise HTTPError(
            400,
            f"response_format {fmt!r} is not supported: use 'b64_json' (this server keeps no image files to link to)",
            code="invalid_response_format",
        )
    out_fmt = body.get("output_format") or "png"
    if out_fmt != "png":
        raise HTTPError(400, f"output_format {out_fmt!r} is not supported: use 'png'", code="invalid_value")
    if "prompt" not in body:
        raise HTTPError(400, "prompt is required", code="missing_prompt")
    size = body.get("size")
    if size in ("auto", None):
        size = None
    elif not isinstance(size, str):
        raise HTTPError(400, f"size must be a string like '{native}x{native}', got {size!r}", code="invalid_size")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise HTTPError(400, f"stream must be true or false, got {stream!r}")
    fields = dict(
        prompt=body["prompt"],
        adapters=parse_model(body.get("model", "base")),
        n=body.get("n", 1) if body.get("n") is not None else 1,
        size=size,
        negative_prompt=body.get("negative_prompt") or "",
    )
    for key, arg in (("steps", "steps"), ("guidance_scale", "guidance"), ("seed", "seed"), ("scheduler", "scheduler")):
        if body.get(key) is not None:
            fields[arg] = body[key]
    return fields, stream


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _sse(data: dict | str, event: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return ((f"event: {event}\n" if event else "") + f"data: {text}\n\n").encode()


def safe_adapter_path(folder: Path | None, name: str, path) -> Path:
    """The file an adapter request names, checked to lie inside ``folder`` (after resolving symlinks) and
    to be a ``.safetensors`` file; HTTPError 400 otherwise."""
    if folder is None:
        raise HTTPError(
            400, "this server has no adapters folder (start it with --adapters DIR)", code="no_adapters_dir"
        )
    rel = f"{name}.safetensors" if path is None else path
    if not isinstance(rel, str) or not rel or "\x00" in rel:
        raise HTTPError(400, f"path must be a file name inside the adapters folder, got {rel!r}", code="invalid_path")
    if Path(rel).is_absolute() or rel.startswith(("/", "\\", "~")) or ".." in Path(rel).parts:
        raise HTTPError(
            400, f"path {rel!r} leaves the adapters folder: give a name relative to it", code="path_outside_adapters"
        )
    root = folder.resolve()
    full = (root / rel).resolve()
    if not full.is_relative_to(root):
        raise HTTPError(
            400, f"path {rel!r} leaves the adapters folder (it resolves outside it)", code="path_outside_adapters"
        )
    if full.suffix != ".safetensors":
        raise HTTPError(
            400, f"path {rel!r}: adapters are .safetensors files (nothing else is read)", code="invalid_path"
        )
    return full


class _EngineCollector:
    """Prometheus collector that reads ``engine.stats()`` at scrape time."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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


@functools.lru_cache(maxsize=4096)
def _triggers(path: str, mtime_ns: int) -> tuple[str, ...]:
    """The trigger words catfast's trainer records in an adapter's metadata ("catfast.triggers"); () when
    absent or unreadable. Reads only the safetensors JSON header."""
    import safetensors

    try:
        with safetensors.safe_open(path, "pt") as f:
            words = json.loads((f.metadata() or {}).get("catfast.triggers", "[]"))
    except (OSError, ValueError, safetensors.SafetensorError):
        return ()
    return tuple(w for w in words if isinstance(w, str)) if isinstance(words, list) else ()


def _adapter_json(info, folder: Path | None) -> dict:
    path = Path(info.path)
    try:
        triggers = list(_triggers(str(path), path.stat().st_mtime_ns))
    except OSError:
        triggers = []
    try:
        shown = path.resolve().relative_to(folder.resolve()).as_posix() if folder is not None else path.name
    except ValueError:
        shown = path.name
    return {
        "id": info.name,
        "object": "adapter",
        "path": shown,
        "format": info.format,
        "rank": info.rank,
        "alpha": info.alpha,
        "targets": list(info.targets),
        "resident": bool(info.resident),
        "triggers": triggers,
    }


def create_app(engine, *, api_key: str | None = None, adapters_dir=None, model_name: str = "catfast"):
    """The FastAPI app over a started (or startable) ``catfast.serve.Engine``. ``adapters_dir``: the only
    folder adapter files may be registered from over HTTP (default: the engine's)."""
    folder = Path(adapters_dir) if adapters_dir is not None else getattr(engine, "adapters_dir", None)
    registry = CollectorRegistry()
    registry.register(_EngineCollector(engine))
    http_requests = Counter(
        "catfast_http_requests", "HTTP requests by route and status", ["route", "status"], registry=registry
    )
    generation_seconds = Histogram(
        "catfast_generation_seconds",
        "Wall time of answered image generation requests",
        buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        registry=registry,
    )
    cancelled = Counter("catfast_cancelled_requests", "Requests cancelled because the client left", registry=registry)
    admin_lock = threading.Lock()  # adapter add/remove over HTTP: one at a time

    app = FastAPI(title="catfast serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    def error_response(err: HTTPError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        body = {"error": {"message": err.message, "type": err.type, "param": None, "code": err.code}}
        return JSONResponse(body, status_code=err.status, headers=headers)

    @app.exception_handler(HTTPError)
    async def _http_error(request, err: HTTPError):
        return error_response(err)

    @app.exception_handler(ServeError)
    async def _serve_error(request, err: ServeError):
        return error_response(http_error(err))

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request, err):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        message = f"{request.method} {request.url.path}: {err.detail}"
        return error_response(HTTPError(err.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def _crash(request, err):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(HTTPError(500, f"internal error: {type(err).__name__}", "server_error", "internal"))

    counted = ("/v1/images/generations", "/v1/adapters", "/v1/adapters/{name}", "/health", "/metrics")

    class AuthAndCount:
        """Pure ASGI middleware (BaseHTTPMiddleware would hide client disconnects from the endpoints):
        checks the API key and counts answers by route and status."""

        def __init__(self, inner):
            self.inner = inner

        async def __call__(self, scope, receive, send):
            if scope["type"] != "http":
                return await self.inner(scope, receive, send)
            path = scope["path"]
            route = path if not path.startswith("/v1/adapters/") else "/v1/adapters/{name}"
            if api_key is not None and (path.startswith("/v1") or path == "/metrics"):
                given = dict(scope["headers"]).get(b"authorization", b"")
                scheme, _, token = given.partition(b" ")
                if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), api_key.encode()):
                    http_requests.labels(route, "401").inc()
                    message = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                    response = error_response(HTTPError(401, message, "authentication_error", "invalid_api_key"))
                    return await response(scope, receive, send)

            async def counting_send(message):
                if message["type"] == "http.response.start" and route in counted:
                    http_requests.labels(route, str(message["status"])).inc()
                await send(message)

            await self.inner(scope, receive, counting_send)

    app.add_middleware(AuthAndCount)

    async def json_body(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise HTTPError(413, f"request body is larger than {MAX_BODY} bytes", code="body_too_large")
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise HTTPError(413, f"request body is larger than {MAX_BODY} bytes", code="body_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise HTTPError(400, f"the body is not valid JSON ({e}); send a JSON object", code="invalid_json") from None
        if not isinstance(body, dict):
            raise HTTPError(400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
        return body

    def submit(fields: dict):
        from catfast.serve.requests import GenerationRequest

        return engine.submit(GenerationRequest(**fields))

    def images_json(images) -> list[dict]:
        return [{"b64_json": png_b64(im), "revised_prompt": None} for im in images]

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        body = await json_body(request)
        fields, stream = request_fields(body, engine.native_size)
        t0 = time.perf_counter()
        handle = submit(fields)  # raises BadRequest / UnknownAdapter / QueueFull before anything runs
        created = int(time.time())
        if stream:
            return StreamingResponse(
                _stream(request, handle, created, t0),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
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
                        cancelled.inc()
                        task.cancel()
                        return Response(status_code=499)
        except asyncio.CancelledError:
            handle.cancel()
            cancelled.inc()
            task.cancel()
            raise
        if "error" in result:
            raise result["error"]
        data = await asyncio.to_thread(images_json, result["images"])
        generation_seconds.observe(time.perf_counter() - t0)
        side = result["images"][0].size
        return {
            "created": created,
            "data": data,
            "output_format": "png",
            "size": f"{side[0]}x{side[1]}",
            "seed": handle.seed,
        }

    async def _stream(request: Request, handle, created: int, t0: float):
        finished = False
        try:
            async for ev in handle.events():
                if ev.kind == "queued":
                    yield _sse({"type": "image_generation.queued", "created_at": created, "seed": handle.seed})
                elif ev.kind == "progress":
                    yield _sse({"type": "image_generation.progress", "step": ev.step, "steps": ev.steps})
                elif ev.kind == "error":
                    err = http_error(ev.error) if isinstance(ev.error, ServeError) else HTTPError(500, str(ev.error))
                    yield _sse(
                        {
                            "type": "error",
                            "error": {"message": err.message, "type": err.type, "code": err.code, "status": err.status},
                        }
                    )
                    finished = True
                    break
                elif ev.kind == "done":
                    data = await asyncio.to_thread(images_json, ev.images)
                    w, h = ev.images[0].size
                    for i, item in enumerate(data):
                        yield _sse(
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
                    generation_seconds.observe(time.perf_counter() - t0)
                    finished = True
                    break
            yield _sse("[DONE]")
        finally:
            if not finished:  # the client went away (the generator was closed) or the stream broke
                handle.cancel()
                cancelled.inc()

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"object": "list", "data": [_adapter_json(a, folder) for a in engine.adapters()]}

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(request: Request):
        from catfast.serve.requests import check_adapter_name

        body = await json_body(request)
        refuse_unknown(body, {"name", "path"})
        name = check_adapter_name(body.get("name"))
        path = safe_adapter_path(folder, name, body.get("path"))

        def load():
            with admin_lock:
                return engine.load_adapter(name, path)

        info = await asyncio.to_thread(load)
        return JSONResponse(_adapter_json(info, folder), status_code=201)

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        from catfast.serve.requests import check_adapter_name

        check_adapter_name(name)

        def unload():
            with admin_lock:
                engine.unload_adapter(name)

        await asyncio.to_thread(unload)
        return {"id": name, "object": "adapter", "deleted": True}

    @app.get("/health")
    async def health():
        s = engine.stats()
        return {
            "status": "ok",
            "model": model_name,
            "native_size": engine.native_size,
            "defaults": engine.defaults,
            "auth": api_key is not None,
            "queue_depth": s["queue_depth"],
            "running": s["running"],
            "registered": s["registered"],
        }

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/")
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class Server:
    """uvicorn running ``app`` in a background thread (tests, benchmarks, notebooks): ``start()`` returns
    once it listens; ``url``; ``stop()``. ``catfast serve`` uses ``run`` instead (foreground)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

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
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, lifespan="off")
