"""What a scaled-out deployment runs (:class:`ReplicaSpec`) and how Ray Serve runs it (:class:`RayServeOptions`).

Both are plain frozen dataclasses, checked when made, so a bad setting fails before any
cluster is touched. :func:`app_config` reads them from the ``args`` of a Ray Serve config
file (``examples/ray/config.yaml``). Nothing here imports Ray.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from latentrt.core.errors import InvalidRequest
from latentrt.service.config import ServiceConfig
from latentrt.service.validation import RequestLimits

__all__ = ["RayServeOptions", "ReplicaSpec", "app_config"]


@dataclass(frozen=True)
class ReplicaSpec:
    """What every replica runs: a :class:`~latentrt.service.GenerationService` over ``models`` and the HTTP API.

    ``models``: built-in names (``"demo"``) or checkpoint paths, which must exist at the same
    path on every machine of the cluster, or a ``{name: path}`` mapping; the first is the
    default. ``api_key`` (default: ``$LATENTRT_API_KEY`` on the replica's machine) guards the
    HTTP API as in ``latentrt serve``. ``torch_threads``: intra-op threads per replica (None:
    the replica's CPU count, as Ray sets ``OMP_NUM_THREADS``). ``load_test``: generate one
    1-step image before the replica takes traffic. ``drain_timeout_s``: how long shutdown
    waits for requests still in the service. ``unhealthy_after_failures``: internal errors
    in a row after which the health check fails and Ray Serve replaces the replica.
    """

    models: tuple[str, ...] | Mapping[str, str] = ("demo",)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    api_key: str | None = None
    clip_skip: int = 1
    max_n_iter: int = 16
    max_body_bytes: int = 64 << 20
    torch_threads: int | None = None
    load_test: bool = True
    drain_timeout_s: float = 120.0
    unhealthy_after_failures: int = 3

    def __post_init__(self) -> None:
        if isinstance(self.models, str) or not self.models:
            raise InvalidRequest(f"ReplicaSpec.models must be a non-empty list or mapping, got {self.models!r}")
        if not isinstance(self.models, Mapping):
            object.__setattr__(self, "models", tuple(str(m) for m in self.models))
        _positive_int("ReplicaSpec", "unhealthy_after_failures", self.unhealthy_after_failures)
        _positive_int("ReplicaSpec", "max_body_bytes", self.max_body_bytes)
        if self.torch_threads is not None:
            _positive_int("ReplicaSpec", "torch_threads", self.torch_threads)
        if not self.drain_timeout_s > 0:
            raise InvalidRequest(f"ReplicaSpec.drain_timeout_s must be > 0, got {self.drain_timeout_s!r}")

    def model_sources(self) -> dict[str, str] | list[str]:
        """``models`` in the form :class:`~latentrt.service.GenerationService` takes."""
        return dict(self.models) if isinstance(self.models, Mapping) else list(self.models)

    def resolved_api_key(self) -> str | None:
        """The key the HTTP API asks for: ``api_key``, else ``$LATENTRT_API_KEY``, else none."""
        return self.api_key or os.environ.get("LATENTRT_API_KEY") or None


@dataclass(frozen=True)
class RayServeOptions:
    """How Ray Serve runs the replicas: how many, on what resources, with what backpressure and health checks.

    Replica count: ``replicas`` (fixed), or ``min_replicas``..``max_replicas`` with Ray
    Serve's autoscaling, which adds replicas while requests per replica stay above
    ``target_ongoing_requests`` and removes idle ones (neither: one replica).
    ``max_ongoing_requests``: requests a replica runs at once (their steps batched; default
    the service's ``workers``); beyond that, callers queue up to ``max_queued_requests``
    each (-1: no limit) and then get a retryable 503 / :class:`~latentrt.serve.ClusterBusy`.
    ``replica_cpus``/``replica_gpus``: Ray resources per replica (one replica per GPU:
    ``replica_gpus=1``). A replica stopped by a scale-down, redeploy or shutdown gets
    ``graceful_shutdown_timeout_s`` to finish its requests. ``retry_after_s`` is what
    clients are told to wait after a replica failure.
    """

    replicas: int | None = None
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float = 4.0
    max_ongoing_requests: int | None = None
    max_queued_requests: int = 64
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    ingress_replicas: int = 1
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 60.0
    graceful_shutdown_timeout_s: float = 120.0
    retry_after_s: float = 2.0

    def __post_init__(self) -> None:
        autoscaled = self.min_replicas is not None or self.max_replicas is not None
        if self.replicas is not None and autoscaled:
            raise InvalidRequest("give either replicas (a fixed count) or min_replicas/max_replicas (autoscaling)")
        for name in ("replicas", "max_ongoing_requests"):
            if getattr(self, name) is not None:
                _positive_int("RayServeOptions", name, getattr(self, name))
        _positive_int("RayServeOptions", "ingress_replicas", self.ingress_replicas)
        if autoscaled:
            self._check_autoscaling()
        if self.max_queued_requests != -1:
            _positive_int("RayServeOptions", "max_queued_requests", self.max_queued_requests)
        for name in ("replica_cpus", "replica_gpus"):
            if not getattr(self, name) >= 0:
                raise InvalidRequest(f"RayServeOptions.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("target_ongoing_requests", "health_check_period_s", "health_check_timeout_s",
                     "graceful_shutdown_timeout_s", "retry_after_s"):  # fmt: skip
            if not getattr(self, name) > 0:
                raise InvalidRequest(f"RayServeOptions.{name} must be > 0, got {getattr(self, name)!r}")

    def _check_autoscaling(self) -> None:
        low, high = self.min_replicas, self.max_replicas
        if low is None or high is None:
            raise InvalidRequest("autoscaling needs both min_replicas and max_replicas (or give replicas instead)")
        if isinstance(low, bool) or not isinstance(low, int) or low < 0:
            raise InvalidRequest(f"min_replicas must be an integer >= 0, got {low!r}")
        _positive_int("RayServeOptions", "max_replicas", high)
        if high < low:
            raise InvalidRequest(f"max_replicas ({high}) must be >= min_replicas ({low})")

    @property
    def autoscaling(self) -> bool:
        """Whether Ray Serve chooses the replica count (min/max given)."""
        return self.min_replicas is not None

    def replica_options(self, service: ServiceConfig) -> dict[str, Any]:
        """``Deployment.options(...)`` of the replica deployment, for a service configured by ``service``."""
        options: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests or service.workers,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": {"num_cpus": self.replica_cpus},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": 1.0,
            "max_constructor_retry_count": 3,  # a replica that cannot load its model fails the deployment soon
        }
        if self.replica_gpus:
            options["ray_actor_options"]["num_gpus"] = self.replica_gpus  # Ray sets CUDA_VISIBLE_DEVICES
        if self.autoscaling:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = self.replicas or 1
        return options

    def ingress_options(self) -> dict[str, Any]:
        """``Deployment.options(...)`` of the HTTP ingress: no CPU reserved, it only forwards."""
        return {
            "num_replicas": self.ingress_replicas,
            "max_ongoing_requests": 10_000,
            "ray_actor_options": {"num_cpus": 0},
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "graceful_shutdown_wait_loop_s": 1.0,
        }


def _positive_int(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidRequest(f"{owner}.{name} must be an integer >= 1, got {value!r}")


def _field_names(kind: type) -> list[str]:
    return [f.name for f in dataclasses.fields(kind)]


def _take(kind: type, values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``values`` checked against ``kind``'s fields: an unknown key is an error naming the close and the valid ones."""
    if not isinstance(values, Mapping):
        raise InvalidRequest(f"{where} must be a mapping of settings, got {type(values).__name__}")
    names = _field_names(kind)
    for key in values:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise InvalidRequest(f"unknown setting {key!r} in {where}; {hint}valid: {', '.join(names)}")
    return dict(values)


_SPEC_KEYS = [n for n in _field_names(ReplicaSpec) if n != "service"]
_OPTION_KEYS = _field_names(RayServeOptions)


def app_config(args: Mapping[str, Any] | None) -> tuple[ReplicaSpec, RayServeOptions]:
    """The replica spec and Ray options from a Serve config file's ``args`` (see ``examples/ray/config.yaml``).

    Top-level keys are :class:`ReplicaSpec` and :class:`RayServeOptions` fields; ``service``
    holds :class:`~latentrt.service.ServiceConfig` fields and ``limits``
    :class:`~latentrt.service.RequestLimits` fields.
    """
    args = dict(args or {})
    service = _take(ServiceConfig, args.pop("service", None) or {}, "args.service")
    if "limits" in service:
        raise InvalidRequest("give request limits as args.limits, next to args.service, not inside it")
    limits = RequestLimits(**_take(RequestLimits, args.pop("limits", None) or {}, "args.limits"))
    spec_args = {k: args.pop(k) for k in list(args) if k in _SPEC_KEYS}
    options = _take(RayServeOptions, args, "args")  # what is left must be Ray options
    models = spec_args.pop("models", ("demo",))
    if isinstance(models, Sequence) and not isinstance(models, str):
        models = tuple(models)
    spec = ReplicaSpec(models=models, service=ServiceConfig(**service, limits=limits), **spec_args)
    return spec, RayServeOptions(**options)
