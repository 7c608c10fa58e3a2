"""Errors of the serving engine; each maps to one HTTP status (see docs/serving-engine.md)."""

from catfast.errors import CatfastError


class ServeError(CatfastError):
    """Base class of every error the serving engine raises on purpose."""


class UnknownAdapter(ServeError):
    """The adapter name is not registered (HTTP 404)."""


class BadRequest(ServeError):
    """A request field is invalid; the message says what to change (HTTP 400)."""


class AdapterLoadError(ServeError):
    """An adapter file is corrupt, unreadable or does not fit the base model; nothing else is affected
    (HTTP 400/422)."""


class QueueFull(ServeError):
    """The bounded request queue is full (HTTP 429)."""


class Cancelled(ServeError):
    """The request was cancelled (``handle.cancel()``, or the client went away)."""


class RequestTimeout(ServeError):
    """The request did not finish within its timeout (HTTP 504)."""


class AdapterPathError(BadRequest):
    """An adapter path the server will not read: outside the adapters folder, a symlink loop, not
    ``.safetensors`` (HTTP 400; ``code`` is the OpenAI error code)."""

    def __init__(self, message: str, code: str = "invalid_path"):
        super().__init__(message)
        self.code = code


class AdapterFamilyError(BadRequest):
    """An adapter file made for another model family than the base's (a UNet LoRA sent to a Flux server):
    HTTP 400 naming both families (``code`` adapter_family_mismatch)."""

    code = "adapter_family_mismatch"


class NonFiniteOutput(ServeError):
    """The request's final latents hold NaN or Inf: there is no picture to send (HTTP 422). The message
    names the likely cause (guidance, an adapter's magnitude)."""


class EngineFailure(ServeError):
    """The engine itself failed while running a request (an exception in a UNet step, the text encoder or
    the VAE): HTTP 500, the one 5xx that is not about time or shutdown."""
