"""The OpenAI-shaped HTTP protocol of ``catfast serve``, without the web framework: errors in OpenAI's shape
and their statuses, the fields of an images/generations body, the adapter listing entry, PNG and
server-sent-event encoding, and the check that keeps adapter paths inside the adapters folder."""

from __future__ import annotations

import base64
import functools
import io
import json
import math
import re
from pathlib import Path

import safetensors

from catfast.serve.errors import (
    AdapterLoadError,
    AdapterPathError,
    BadRequest,
    Cancelled,
    EngineFailure,
    NonFiniteOutput,
    QueueFull,
    RequestTimeout,
    ServeError,
    UnknownAdapter,
)
from catfast.serve.requests import MAX_ADAPTERS_PER_REQUEST, show
from catfast.serve.scan import adapter_file

MAX_BODY = 1 << 20  # bytes of a JSON request body
# nesting levels of a JSON body. Every field is a scalar (depth 1); Python's parser raised RecursionError
# (a 500) at about 1000 levels, and error messages that print a value recurse into it.
MAX_DEPTH = 16
WEIGHT = re.compile(r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")  # an adapter's weight in ``model``
# fields of OpenAI's images.generate that we accept; the ones in _IGNORED are not used
_OPENAI_FIELDS = {"model", "prompt", "n", "size", "response_format", "user", "quality", "style", "output_format"}
_IGNORED = ("user", "quality", "style")  # accepted (strings) and ignored
_EXTRA_FIELDS = {"steps", "guidance_scale", "seed", "negative_prompt", "scheduler", "stream"}


class HTTPError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code

    def body(self) -> dict:
        """OpenAI's error object. The message is made valid UTF-8 (a client's lone surrogate echoed in it
        is written as the escape \\udXXX) and cut to 2000 characters."""
        message = self.message.encode("utf-8", "backslashreplace").decode("utf-8")
        if len(message) > 2000:
            message = message[:2000] + " ..."
        return {"error": {"message": message, "type": self.type, "param": None, "code": self.code}}


# ServeError subclass -> (status, OpenAI error type, code)
_STATUS = (
    (UnknownAdapter, 404, "invalid_request_error", "adapter_not_found"),
    (BadRequest, 400, "invalid_request_error", "invalid_value"),
    (AdapterLoadError, 422, "invalid_request_error", "adapter_load_failed"),
    (NonFiniteOutput, 422, "invalid_request_error", "non_finite_output"),
    (QueueFull, 429, "rate_limit_error", "queue_full"),
    (RequestTimeout, 504, "timeout_error", "timeout"),
    (Cancelled, 503, "server_error", "cancelled"),
    (EngineFailure, 500, "server_error", "engine_failure"),
)


def http_error(e: ServeError) -> HTTPError:
    """The HTTP error of an engine error (other ServeErrors: 503, the engine cannot serve it now). An
    error with its own ``code`` (AdapterPathError) keeps it."""
    for cls, status, type_, code in _STATUS:
        if isinstance(e, cls):
            return HTTPError(status, str(e), type_, getattr(e, "code", code))
    return HTTPError(503, str(e), "server_error", "unavailable")


def parse_json_body(raw: bytes) -> dict:
    """The JSON object of a request body; HTTPError 413 above MAX_BODY bytes, 400 when it is not UTF-8
    JSON, nests deeper than MAX_DEPTH levels, or is not an object."""
    if len(raw) > MAX_BODY:
        raise HTTPError(413, f"request body is larger than {MAX_BODY} bytes", code="body_too_large")
    try:
        body = json.loads(raw)
    except RecursionError:
        body = None
    except (ValueError, UnicodeDecodeError) as e:
        raise HTTPError(400, f"the body is not valid JSON ({e}); send a JSON object", code="invalid_json") from None
    if body is None or _depth(body) > MAX_DEPTH:
        raise HTTPError(400, f"the JSON body nests deeper than {MAX_DEPTH} levels", code="invalid_json")
    if not isinstance(body, dict):
        raise HTTPError(400, f"the body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _depth(value) -> int:
    """Nesting depth of a parsed JSON value (a scalar 0, {} or [] 1), without recursion; stops counting
    past MAX_DEPTH + 1."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            level += 1
            deepest = max(deepest, level)
            if deepest > MAX_DEPTH:
                break
            stack.extend((v, level) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_model(model) -> dict[str, float]:
    """``model`` of a generation request -> {adapter: weight}. "base" (or None) -> {}; "a+b:0.5" ->
    {"a": 1.0, "b": 0.5}; spaces (" ") around names and weights are allowed, at most MAX_ADAPTERS_PER_REQUEST
    parts, weights are decimal numbers (``WEIGHT``). Names are checked by the engine; this checks the
    syntax."""
    if model is None:
        return {}
    if not isinstance(model, str) or not model.strip(" "):
        raise HTTPError(
            400, f"model must be 'base' or adapter names joined by '+', got {show(model)}", code="invalid_model"
        )
    parts = _split_model(model)
    if len(parts) > MAX_ADAPTERS_PER_REQUEST:
        raise HTTPError(
            400,
            f"model {show(model)} joins {len(parts)} names; at most {MAX_ADAPTERS_PER_REQUEST}",
            code="invalid_model",
        )
    adapters: dict[str, float] = {}
    for part in parts:
        name, sep, weight = (x.strip(" ") for x in part.partition(":"))
        if not name:
            raise HTTPError(400, f"model {show(model)} has an empty adapter name (use 'a+b:0.5')", code="invalid_model")
        if name == "base":
            if sep:
                raise HTTPError(400, "'base' takes no weight", code="invalid_model")
            continue
        value = float(weight) if sep and WEIGHT.fullmatch(weight) else math.nan if sep else 1.0
        if not math.isfinite(value):
            raise HTTPError(
                400,
                f"weight of {show(name)} must be a finite number written in decimals (like {show(name)}:0.8), "
                f"got {show(weight)}",
                code="invalid_model",
            )
        if name in adapters:
            raise HTTPError(400, f"adapter {show(name)} appears twice in model {show(model)}", code="invalid_model")
        adapters[name] = value
    return adapters


def _split_model(model: str) -> list[str]:
    """The parts of ``model`` joined by '+'. A '+' that is a weight's sign (``a:+0.5``) or its exponent's
    (``a:1e+2``) joins nothing; it is dropped first (it does not change the number)."""
    text = re.sub(r"(: *)\+", r"\1", model)
    text = re.sub(r"(: *-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE])\+", r"\1", text)
    return text.split("+")


def refuse_unknown(body: dict, accepted: set[str]) -> None:
    """HTTPError 400 naming the fields of ``body`` not in ``accepted`` (a misspelt field must not pass)."""
    unknown = sorted(set(body) - accepted)
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        names = ", ".join(show(k)[1:-1] for k in unknown[:5]) + more
        message = f"unknown field(s) {names}; accepted: {', '.join(sorted(accepted))}"
        raise HTTPError(400, message, code="unknown_parameter")


def request_fields(body: dict, native: int) -> tuple[dict, bool]:
    """The GenerationRequest arguments of an images/generations body, and whether it asks to stream.
    Every optional field may be null (its default); any other value must have the field's type, so what
    ``GET /openapi.json`` calls invalid is refused (HTTPError 400; GenerationRequest checks the values)."""
    refuse_unknown(body, _OPENAI_FIELDS | _EXTRA_FIELDS)
    given = {k: v for k, v in body.items() if v is not None}
    fmt = given.get("response_format", "b64_json")
    if fmt != "b64_json":
        raise HTTPError(
            400,
            f"response_format {show(fmt)} is not supported: use 'b64_json' (this server keeps no image files to "
            "link to)",
            code="invalid_response_format",
        )
    out_fmt = given.get("output_format", "png")
    if out_fmt != "png":
        raise HTTPError(400, f"output_format {show(out_fmt)} is not supported: use 'png'", code="invalid_value")
    for key in _IGNORED:
        if not isinstance(given.get(key, ""), str):
            raise HTTPError(400, f"{key} must be a string, got {show(given[key])}", code="invalid_value")
    if "prompt" not in body:
        raise HTTPError(400, "prompt is required", code="missing_prompt")
    size = given.get("size", "auto")
    if not isinstance(size, str):
        raise HTTPError(400, f"size must be a string like '{native}x{native}', got {show(size)}", code="invalid_size")
    stream = given.get("stream", False)
    if not isinstance(stream, bool):
        raise HTTPError(400, f"stream must be true or false, got {show(stream)}")
    fields = dict(
        prompt=body["prompt"],
        adapters=parse_model(given.get("model", "base")),
        n=given.get("n", 1),
        size=None if size == "auto" else size,
        negative_prompt=given.get("negative_prompt", ""),
    )
    for key, arg in (("steps", "steps"), ("guidance_scale", "guidance"), ("seed", "seed"), ("scheduler", "scheduler")):
        if key in given:
            fields[arg] = given[key]
    return fields, stream


def png_b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def sse(data: dict | str, event: str | None = None) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return ((f"event: {event}\n" if event else "") + f"data: {text}\n\n").encode()


def safe_adapter_path(folder: Path | None, name: str, path) -> Path:
    """The file an adapter request names (``path``, default ``<name>.safetensors``), checked by the rule
    the start-up scan uses too (``catfast.serve.scan.adapter_file``); HTTPError 400 otherwise."""
    if folder is None:
        raise HTTPError(
            400, "this server has no adapters folder (start it with --adapters DIR)", code="no_adapters_dir"
        )
    try:
        return adapter_file(folder, f"{name}.safetensors" if path is None else path)
    except AdapterPathError as e:
        raise http_error(e) from None


@functools.lru_cache(maxsize=4096)
def triggers_of(path: str, mtime_ns: int) -> tuple[str, ...]:
    """The trigger words catfast's trainer records in an adapter's metadata ("catfast.triggers"), or an E4T
    adapter's placeholder word ("catfast.e4t.token": files `catfast personalize` wrote before it recorded
    triggers); () when absent or unreadable. Reads only the safetensors JSON header."""
    try:
        with safetensors.safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        token = metadata.get("catfast.e4t.token")
        words = json.loads(metadata.get("catfast.triggers", json.dumps([token] if token else [])))
    except Exception:  # noqa: BLE001 - any unreadable or odd header (RecursionError for deep JSON): none
        return ()
    return tuple(w for w in words if isinstance(w, str)) if isinstance(words, list) else ()


def adapter_json(info, folder: Path | None) -> dict:
    path = Path(info.path)
    try:
        triggers = list(triggers_of(str(path), path.stat().st_mtime_ns))
    except OSError:
        triggers = []
    try:  # info.path was resolved at registration; the file may since have become a loop of links
        shown = path.relative_to(folder.resolve()).as_posix() if folder is not None else path.name
    except (ValueError, OSError, RuntimeError):
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
