"""Errors of the generation service; each says what happened and what to do (DESIGN.md section 6)."""

from __future__ import annotations

from latentrt.core.errors import InvalidRequest, LatentRTError
from latentrt.core.pipeline import GenerationCancelled

__all__ = ["InvalidField", "RequestCancelled", "RequestTimeout", "ServiceBusy", "ServiceClosed"]


class ServiceBusy(LatentRTError):
    """The queue is full; ``retry_after`` says how many seconds to wait before trying again."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServiceClosed(LatentRTError):
    """The service is shutting down and takes no new requests."""


class RequestTimeout(LatentRTError):
    """A request did not finish within its timeout (queued or running)."""


class RequestCancelled(GenerationCancelled):
    """A request was cancelled: by its caller, by an interrupt, or by shutdown (``reason``)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class InvalidField(InvalidRequest):
    """An invalid request that names the offending ``field`` (a :class:`GenerationRequest` field name)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
