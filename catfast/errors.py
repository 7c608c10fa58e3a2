"""Exceptions catfast raises for bad input. Every message names the file (and, for shapes, the layer
and both shapes) so the user can act on it without a traceback."""


class CatfastError(Exception):
    """Base class of every error catfast raises on purpose."""


class ModelLoadError(CatfastError):
    """A base model folder or checkpoint is missing, incomplete, corrupt or refused (pickle)."""


class AdapterFormatError(CatfastError):
    """An adapter file is not readable: corrupt/truncated safetensors, unknown keys, missing halves."""


class AdapterShapeError(CatfastError):
    """An adapter does not fit the model it is applied to (made for another base)."""


class ExportError(CatfastError):
    """The export could not be made or did not prove correct (checker or ORT parity)."""
