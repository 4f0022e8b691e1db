"""Scale-out: latentrt on a distributed serving engine (the ``ray`` extra: ``pip install 'latentrt[ray]'``).

:mod:`latentrt.serve.ray` deploys :class:`~latentrt.service.GenerationService` replicas on
Ray Serve, one per GPU (or per N CPU cores), on one machine or many, behind the same
A1111-compatible HTTP API as ``latentrt serve`` and a Python handle API.

Modules: :mod:`~latentrt.serve.config` (what runs, and how), :mod:`~latentrt.serve.replica`
(one replica), :mod:`~latentrt.serve.ray` (the Ray Serve application, the Python client),
:mod:`~latentrt.serve.deploy` (``latentrt serve --ray``). Importing this package needs
nothing beyond latentrt's core dependencies; only the last two import Ray.
"""

from __future__ import annotations

from latentrt.serve.config import RayServeOptions, ReplicaSpec
from latentrt.serve.errors import ClusterBusy, ReplicaUnavailable, ReplicaUnhealthy, is_retryable

__all__ = ["ClusterBusy", "RayServeOptions", "ReplicaSpec", "ReplicaUnavailable", "ReplicaUnhealthy", "is_retryable"]
