"""Embedding latentrt in a service: a thread-safe generation queue whose requests share backbone calls.

.. code-block:: python

    from latentrt import GenerationRequest
    from latentrt.service import GenerationService

    with GenerationService("demo") as service:
        future = service.submit(GenerationRequest("a red circle", steps=20, seed=1))
        image = future.result().images[0]

Importing this package needs only latentrt's core dependencies; the HTTP API lives in
:mod:`latentrt.server` (the ``serve`` extra).
"""

from __future__ import annotations

from latentrt.service.batching import BatchStats, StepBatcher
from latentrt.service.config import ServiceConfig
from latentrt.service.errors import InvalidField, RequestCancelled, RequestTimeout, ServiceBusy, ServiceClosed
from latentrt.service.jobs import GenerationFuture, Progress, ServiceResult
from latentrt.service.service import GenerationService
from latentrt.service.validation import RequestLimits

__all__ = [
    "BatchStats",
    "GenerationFuture",
    "GenerationService",
    "InvalidField",
    "Progress",
    "RequestCancelled",
    "RequestLimits",
    "RequestTimeout",
    "ServiceBusy",
    "ServiceClosed",
    "ServiceConfig",
    "ServiceResult",
    "StepBatcher",
]
