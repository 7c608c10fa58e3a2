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
