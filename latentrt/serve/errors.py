"""Errors of a scaled-out deployment (every latentrt error pickles with its attributes, so these and
the service's errors reach a handle's caller intact: :class:`~latentrt.core.errors.LatentRTError`).

A failure of the cluster (a replica that died, a full queue) reaches the caller as a
*retryable* :class:`~latentrt.core.errors.LatentRTError`: over HTTP a 503 with
``Retry-After``, through a handle one of the classes below, whose ``retry_after`` says
when to send the request again (:func:`is_retryable` tells them from errors that a retry
cannot fix, such as an invalid request).
"""

from __future__ import annotations

from latentrt.core.errors import LatentRTError
from latentrt.service.errors import ServiceBusy, ServiceClosed

__all__ = ["ClusterBusy", "ReplicaUnavailable", "ReplicaUnhealthy", "is_retryable"]


class ReplicaUnavailable(LatentRTError):
    """The replica running (or chosen for) a request died or cannot be reached; send the request again.

    ``cause`` names what happened (``replica_died``, ``replica_unreachable``, ``node_died``,
    ``deployment_unavailable``); Ray Serve restarts dead replicas by itself, and a retry
    goes to a live one. ``retry_after`` is the suggested wait in seconds.
    """

    retryable = True

    def __init__(self, message: str, *, cause: str, retry_after: float = 2.0) -> None:
        super().__init__(message)
        self.cause = cause
        self.retry_after = retry_after


class ClusterBusy(ServiceBusy):
    """Every replica has ``max_ongoing_requests`` running and the caller's queue is full (Ray Serve backpressure)."""

    retryable = True

    def __init__(self, message: str, retry_after: float, cause: str = "backpressure") -> None:
        super().__init__(message, retry_after)
        self.cause = cause


class ReplicaUnhealthy(LatentRTError):
    """A replica's health check failed; Ray Serve replaces the replica."""


def is_retryable(error: BaseException) -> bool:
    """Whether sending the same request again may succeed: the cluster, not the request, was the problem."""
    return isinstance(error, (ReplicaUnavailable, ServiceBusy, ServiceClosed))
