"""The OpenAI-shaped HTTP protocol of ``catfast serve``, without the web framework: errors in OpenAI's shape
and their statuses, the fields of an images/generations body, the adapter listing entry, PNG and
server-sent-event encoding, and the check that keeps adapter paths inside the adapters folder."""

from __future__ import annotations

import base64
import functools
import io
import json
import math
from pathlib import Path

import safetensors

from catfast.serve.errors import (
    AdapterLoadError,
    BadRequest,
    Cancelled,
    QueueFull,
    RequestTimeout,
    ServeError,
    UnknownAdapter,
)

MAX_BODY = 1 << 20  # bytes of a JSON request body
# fields of OpenAI's images.generate that we accept; the ones not listed in _IGNORED are used
_OPENAI_FIELDS = {"model", "prompt", "n", "size", "response_format", "user", "quality", "style", "output_format"}
_EXTRA_FIELDS = {"steps", "guidance_scale", "seed", "negative_prompt", "scheduler", "stream"}


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


def sse(data: dict | str, event: str | None = None) -> bytes:
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


@functools.lru_cache(maxsize=4096)
def triggers_of(path: str, mtime_ns: int) -> tuple[str, ...]:
    """The trigger words catfast's trainer records in an adapter's metadata ("catfast.triggers"); () when
    absent or unreadable. Reads only the safetensors JSON header."""
    try:
        with safetensors.safe_open(path, "pt") as f:
            words = json.loads((f.metadata() or {}).get("catfast.triggers", "[]"))
    except (OSError, ValueError, safetensors.SafetensorError):
        return ()
    return tuple(w for w in words if isinstance(w, str)) if isinstance(words, list) else ()


def adapter_json(info, folder: Path | None) -> dict:
    path = Path(info.path)
    try:
        triggers = list(triggers_of(str(path), path.stat().st_mtime_ns))
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
