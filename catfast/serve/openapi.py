"""The OpenAPI 3.1 description of ``catfast serve``'s HTTP API (``GET /openapi.json``), written by hand
from one engine's limits: every field of a request body with its bounds, and every status a route
answers with its body. The routes parse their bodies themselves (for errors that say what to change),
so FastAPI cannot infer this; ``tests/test_robust_fuzz.py`` fuzzes the server with schemathesis from
it, which also checks that the server answers what this document says.
"""

from __future__ import annotations

from catfast.serve.protocol import MAX_BODY, MAX_DEPTH, WEIGHT
from catfast.serve.requests import (
    MAX_ADAPTERS_PER_REQUEST,
    MAX_GUIDANCE,
    MAX_PROMPT_CHARS,
    MAX_WEIGHT,
    NAME,
    SCHEDULERS,
)

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": "null"},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ADAPTER = {
    "type": "object",
    "required": ["id", "object", "path", "format", "rank", "alpha", "targets", "resident", "triggers"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "adapter"},
        "path": {"type": "string"},
        "format": {"type": "string"},
        "rank": {"type": "integer"},
        "alpha": {"type": "number"},
        "targets": {"type": "array", "items": {"type": "string"}},
        "resident": {"type": "boolean"},
        "triggers": {"type": "array", "items": {"type": "string"}},
    },
}
_IMAGES = {
    "type": "object",
    "required": ["created", "data", "output_format", "size", "seed"],
    "properties": {
        "created": {"type": "integer"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["b64_json"],
                "properties": {"b64_json": {"type": "string"}, "revised_prompt": {"type": "null"}},
            },
        },
        "output_format": {"const": "png"},
        "size": {"type": "string"},
        "seed": {"type": "integer"},
    },
}
# what every error status means (docs/serving.md, "Errors")
_WHY = {
    "400": "a field is invalid; the message says which and what to send",
    "401": "--api-key is set and the bearer token is missing or wrong",
    "404": "an unknown adapter or route",
    "405": "the route does not take this method",
    "413": f"the body is larger than {MAX_BODY} bytes",
    "422": "an adapter file that cannot be used, or a result that is not finite (no picture to send)",
    "429": "the bounded queue is full: retry later",
    "500": "the engine failed while running the request (not the request's fault; the message says so)",
    "503": "the engine is shutting down",
    "504": "the request did not finish within --timeout",
}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: str) -> dict:
    return {s: _json(_ERROR, _WHY[s]) for s in statuses}


def _body(schema: dict) -> dict:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _nullable(schema: dict) -> dict:
    """``schema`` that also takes null (an optional field sent as null means its default)."""
    if "enum" in schema:
        return {**schema, "enum": [*schema["enum"], None]}
    return {**schema, "type": [schema["type"], "null"]}


def generation_schema(defaults: dict, native: int) -> dict:
    """JSON schema of a ``POST /v1/images/generations`` body under an engine's ``defaults``."""
    sides = defaults["sizes"]
    part = f" *{NAME.pattern} *(: *{WEIGHT.pattern} *)?"  # what parse_model reads
    optional = {
        "model": {
            "type": "string",
            "description": f"'base', or up to {MAX_ADAPTERS_PER_REQUEST} adapter names joined by '+', each with "
            f"an optional ':weight' within +-{MAX_WEIGHT:g}",
            "pattern": f"^{part}(\\+{part}){{0,{MAX_ADAPTERS_PER_REQUEST - 1}}}$",
            "default": "base",
        },
        "n": {"type": "integer", "minimum": 1, "maximum": defaults["max_n"], "default": 1},
        "size": {"enum": ["auto"] + [f"{w}x{h}" for w in sides for h in sides], "default": f"{native}x{native}"},
        "response_format": {"enum": ["b64_json"], "default": "b64_json"},
        "output_format": {"enum": ["png"], "default": "png"},
        "user": {"type": "string"},
        "quality": {"type": "string"},
        "style": {"type": "string"},
        "steps": {"type": "integer", "minimum": 1, "maximum": defaults["max_steps"], "default": defaults["steps"]},
        "guidance_scale": {"type": "number", "minimum": 0, "maximum": MAX_GUIDANCE, "default": defaults["guidance"]},
        "seed": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
        "negative_prompt": {"type": "string", "maxLength": MAX_PROMPT_CHARS, "default": ""},
        "scheduler": {
            "enum": defaults.get("schedulers", list(SCHEDULERS)),
            "default": defaults.get("scheduler", "ddim"),
        },
        "stream": {"type": "boolean", "default": False},
    }
    return {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": {
            "prompt": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS, "pattern": "\\S"},
            **{k: _nullable(v) for k, v in optional.items()},
        },
    }


def openapi_spec(engine, *, auth: bool) -> dict:
    """The OpenAPI document of the app over ``engine`` (``auth``: /v1 routes and /metrics need a key)."""
    name = {"type": "string", "pattern": f"^{NAME.pattern}$", "maxLength": 200}
    security = [{"bearer": []}] if auth else []
    guarded = ("401",) if auth else ()
    register = {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {"name": name, "path": {"type": "string", "pattern": "[^/]\\.safetensors$"}},
    }
    text = {"200": {"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}}}
    spec = {
        "openapi": "3.1.0",
        "info": {
            "title": "catfast serve",
            "version": "1",
            "description": f"JSON bodies: at most {MAX_BODY} bytes, nested at most {MAX_DEPTH} levels.",
        },
        "paths": {
            "/v1/images/generations": {
                "post": {
                    "operationId": "createImage",
                    "security": security,
                    "requestBody": _body(generation_schema(engine.defaults, engine.native_size)),
                    "responses": {
                        "200": {
                            "description": "the images (or, with stream, server-sent events)",
                            "content": {"application/json": {"schema": _IMAGES}, "text/event-stream": {}},
                        },
                        **_errors("400", *guarded, "404", "413", "422", "429", "500", "503", "504"),
                    },
                }
            },
            "/v1/adapters": {
                "get": {
                    "operationId": "listAdapters",
                    "security": security,
                    "responses": {
                        "200": _json(
                            {"type": "object", "properties": {"data": {"type": "array", "items": _ADAPTER}}},
                            "the registered adapters",
                        ),
                        **_errors(*guarded),
                    },
                },
                "post": {
                    "operationId": "registerAdapter",
                    "security": security,
                    "requestBody": _body(register),
                    "responses": {"201": _json(_ADAPTER, "registered"), **_errors("400", *guarded, "413", "422")},
                },
            },
            "/v1/adapters/{name}": {
                "delete": {
                    "operationId": "deleteAdapter",
                    "security": security,
                    "parameters": [{"name": "name", "in": "path", "required": True, "schema": name}],
                    "responses": {
                        "200": _json({"type": "object", "required": ["id", "deleted"]}, "unregistered"),
                        **_errors("400", *guarded, "404"),
                    },
                }
            },
            "/health": {
                "get": {
                    "operationId": "health",
                    "responses": {"200": _json({"type": "object", "required": ["status", "defaults"]}, "up")},
                }
            },
            "/metrics": {
                "get": {"operationId": "metrics", "security": security, "responses": {**text, **_errors(*guarded)}}
            },
        },
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
    return spec
