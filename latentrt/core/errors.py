"""The errors latentrt raises at its users (DESIGN.md section 6).

Every user-facing failure is a :class:`LatentRTError` subclass whose message says what
was wrong and what to do about it. The CLI prints the message on one line; the HTTP API
maps it to a 4xx response with the same text.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "CheckpointError",
    "ExportError",
    "InvalidRequest",
    "LatentRTError",
    "PluginError",
    "RuntimeUnavailable",
]


class LatentRTError(Exception):
    """Base class of every error latentrt reports to its users.

    Errors pickle with their attributes (``retry_after``, ``field``, ...) even where the
    constructor takes extra arguments, which plain exception pickling drops: a worker
    process (a Ray Serve replica) can raise one and the caller gets the same error.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_error, (type(self), self.args, dict(vars(self))))


def _rebuild_error(kind: type[LatentRTError], args: tuple[Any, ...], state: dict[str, Any]) -> LatentRTError:
    """An error of ``kind`` with ``args`` and attributes ``state``, made without calling its ``__init__``."""
    error = kind.__new__(kind, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class PluginError(LatentRTError):
    """A plugin failed to load or register, or a name was not found in the registry."""


class InvalidRequest(LatentRTError, ValueError):
    """The caller asked for something impossible: bad steps, sigmas, sizes or options."""


class CheckpointError(LatentRTError):
    """A model file or folder is missing, truncated or of an unknown layout."""


class ExportError(LatentRTError):
    """Exporting a backbone failed or produced a model outside its tolerance."""


class RuntimeUnavailable(LatentRTError):
    """The requested runtime (onnxruntime, TensorRT, ...) cannot run on this machine."""
