"""One replica of a scaled-out deployment: a GenerationService, the A1111 app over it, its health and identity.

:class:`GenerationReplica` is a plain class; :mod:`latentrt.serve.ray` makes it a Ray
Serve deployment (one instance per replica process). It loads its default model once,
load-tests it with a one-step image before it takes traffic, and serves

- :meth:`~GenerationReplica.generate`: the Python handle API, a
  :class:`~latentrt.GenerationRequest` in, a :class:`ReplicaResult` out;
- :meth:`~GenerationReplica.http`: an HTTP request forwarded by the ingress, answered by
  the same FastAPI app as ``latentrt serve`` (:func:`latentrt.server.create_app`), with
  the replica's id in the ``x-latentrt-replica`` header;
- :meth:`~GenerationReplica.check_health`: Ray Serve's periodic health check.

Step-level batching happens inside the replica's service, across the requests Ray Serve
routes to it at once (up to ``max_ongoing_requests``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from dataclasses import dataclass

import torch

from latentrt.core.errors import LatentRTError
from latentrt.core.request import GenerationRequest
from latentrt.serve.asgi import ForwardedRequest, ForwardedResponse, call_app
from latentrt.serve.config import ReplicaSpec
from latentrt.serve.errors import ReplicaUnhealthy
from latentrt.server import Defaults, create_app
from latentrt.service import GenerationService, ServiceResult
from latentrt.service.jobs import ForwardsImages

__all__ = [
    "NODE_HEADER",
    "REPLICA_HEADER",
    "GenerationReplica",
    "ReplicaIdentity",
    "ReplicaInfo",
    "ReplicaResult",
    "TaskState",
    "replica_identity",
]

logger = logging.getLogger(__name__)

REPLICA_HEADER = "x-latentrt-replica"
NODE_HEADER = "x-latentrt-node"


@dataclass(frozen=True)
class ReplicaIdentity:
    """Which replica this is: Ray Serve's replica id, its deployment and application, machine and process."""

    replica_id: str
    deployment: str
    app: str
    node_id: str
    pid: int


@dataclass(frozen=True)
class ReplicaResult(ForwardsImages):
    """A finished request of the handle API: the service's result and the replica that produced it."""

    result: ServiceResult
    replica: ReplicaIdentity


@dataclass(frozen=True)
class TaskState:
    """Where a task stands on the replica asked: ``step`` of ``steps`` done, ``state`` as in :class:`Progress`."""

    task_id: str
    state: str
    step: int
    steps: int


@dataclass(frozen=True)
class ReplicaInfo:
    """A replica's identity, models and counters, and the state of the task asked about (None: not here)."""

    replica: ReplicaIdentity
    models: list[str]
    loaded_models: list[str]
    metrics: dict[str, float]
    task: TaskState | None = None


def replica_identity() -> ReplicaIdentity:
    """The identity of the Ray Serve replica this code runs in (outside one: ``local-<pid>`` on this host)."""
    pid = os.getpid()
    local = ReplicaIdentity(f"local-{pid}", "local", "local", socket.gethostname(), pid)
    try:
        import ray
        from ray import serve
        from ray.serve.exceptions import RayServeException
    except ImportError:
        return local
    try:
        replica_id = serve.get_replica_context().replica_id
    except RayServeException:  # not inside a replica
        return local
    node = ray.get_runtime_context().get_node_id()
    return ReplicaIdentity(replica_id.unique_id, replica_id.deployment_id.name, replica_id.deployment_id.app_name,
                           node, pid)  # fmt: skip


class GenerationReplica:
    """A :class:`GenerationService` over ``spec.models`` with the HTTP API, for one Ray Serve replica.

    The default model is loaded here, once, and (``spec.load_test``) made to generate a
    one-step image before the replica is reported ready.
    """

    def __init__(self, spec: ReplicaSpec) -> None:
        if spec.torch_threads is not None:
            torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self._closed = False
        self.identity = replica_identity()
        self.service = GenerationService(spec.model_sources(), config=spec.service)
        self.app = create_app(
            self.service,
            api_key=spec.resolved_api_key(),
            defaults=Defaults(clip_skip=spec.clip_skip, max_n_iter=spec.max_n_iter),
            max_body_bytes=spec.max_body_bytes,
            own_service=False,
        )
        self._headers = ((REPLICA_HEADER.encode(), self.identity.replica_id.encode()),
                         (NODE_HEADER.encode(), self.identity.node_id.encode()))  # fmt: skip
        self._failures_in_a_row = 0
        self._load_tested = not spec.load_test
        self._load_default_model()
        self.check_health()
        logger.info("replica %s ready on node %s (pid %d)", self.identity.replica_id, self.identity.node_id,
                    self.identity.pid)  # fmt: skip

    async def generate(
        self,
        request: GenerationRequest,
        *,
        model: str | None = None,
        timeout: float | None = None,
        task_id: str | None = None,
    ) -> ReplicaResult:
        """Run ``request`` on this replica's service (options as :meth:`GenerationService.submit`)."""
        try:
            result = await self.service.generate(request, model=model, timeout=timeout, task_id=task_id)
        except LatentRTError:
            raise  # the request's own outcome (invalid, timed out, cancelled): says nothing about the replica
        except Exception:
            self._failures_in_a_row += 1
            raise
        self._failures_in_a_row = 0
        return ReplicaResult(result, self.identity)

    async def http(self, request: ForwardedRequest) -> ForwardedResponse:
        """Answer a forwarded HTTP request with this replica's A1111 app; the response names the replica."""
        response = await call_app(self.app, request)
        if response.status == 500:  # the app's answer to an unexpected exception
            self._failures_in_a_row += 1
        elif response.status < 500:
            self._failures_in_a_row = 0
        return dataclasses.replace(response, headers=response.headers + self._headers)

    def check_health(self) -> None:
        """Ray Serve's health check: the one-time load test, then whether requests keep failing internally.

        Raises :class:`ReplicaUnhealthy` (Ray Serve then replaces the replica) after
        ``spec.unhealthy_after_failures`` internal errors in a row.
        """
        if not self._load_tested:
            self._load_test()
            self._load_tested = True
        if self._failures_in_a_row >= self.spec.unhealthy_after_failures:
            raise ReplicaUnhealthy(
                f"replica {self.identity.replica_id}: the last {self._failures_in_a_row} requests failed with "
                "internal errors; it will be replaced (see its log for the errors)"
            )

    def _load_default_model(self) -> None:
        """Load the default model now, once, so that the first request does not wait for it."""
        model = self.service.models.default
        try:
            with self.service.models.lease(model):
                pass
        except Exception as exc:
            self.shutdown()
            raise ReplicaUnhealthy(
                f"replica {self.identity.replica_id}: model {model.name!r} did not load ({type(exc).__name__}: {exc}); "
                f"check that {model.filename} exists on every machine and that device {self.spec.service.device!r} "
                "is there"
            ) from exc

    def _load_test(self) -> None:
        """Generate one image with one step on the default model; a failure says what to check."""
        model = self.service.models.default.name
        probe = GenerationRequest("a red circle", steps=1, seed=0, cfg_scale=1.0)
        limit = self.spec.service.timeout_s
        try:
            result = self.service.submit(probe, task_id=f"load-test-{self.identity.replica_id}").result(timeout=limit)
        except Exception as exc:
            raise ReplicaUnhealthy(
                f"replica {self.identity.replica_id}: the load test of model {model!r} failed "
                f"({type(exc).__name__}: {exc}); check the model path (it must exist on every machine) and the device"
            ) from exc
        if len(result.images) != 1:
            raise ReplicaUnhealthy(f"replica {self.identity.replica_id}: the load test of {model!r} made no image")

    def info(self, task_id: str | None = None) -> ReplicaInfo:
        """This replica's identity, models and counters, and where ``task_id`` stands here (None: not here)."""
        progress = self.service.progress(task_id) if task_id is not None else None
        task = None if progress is None else TaskState(progress.task_id, progress.state, progress.step, progress.steps)
        return ReplicaInfo(
            replica=self.identity,
            models=[e.name for e in self.service.models.entries],
            loaded_models=self.service.models.loaded_names(),
            metrics={k: float(v) for k, v in self.service.metrics().items()},
            task=task,
        )

    def shutdown(self) -> None:
        """Drain: finish the requests still in the service (cancelling what is left after ``drain_timeout_s``)."""
        if self._closed:
            return
        self._closed = True
        logger.info("replica %s draining", self.identity.replica_id)
        self.service.shutdown(timeout=self.spec.drain_timeout_s)

    def __del__(self) -> None:
        """Ray Serve calls this when it stops the replica, after its in-flight requests have finished."""
        if getattr(self, "service", None) is not None:
            self.shutdown()

    def __repr__(self) -> str:
        return f"GenerationReplica({self.identity.replica_id!r}, models={self.spec.models!r})"
