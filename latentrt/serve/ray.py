"""latentrt on Ray Serve: many replicas, many machines, one API (needs the ``ray`` extra).

An application of two deployments:

- ``GenerationReplica`` (:class:`~latentrt.serve.replica.GenerationReplica`), one per GPU
  or per N CPU cores: a :class:`~latentrt.service.GenerationService` with its model loaded
  once, step-level batching across the requests it runs at once, a one-time load test and
  Ray Serve health checks. Replica count: fixed or autoscaled (:class:`RayServeOptions`).
- ``LatentRTIngress``: the HTTP entry (A1111's API, the same FastAPI app as ``latentrt
  serve``, run inside the replica that gets the request). When a replica dies mid-request,
  Ray's own proxy would answer a plain-text 500; the ingress answers a 503 with
  ``Retry-After`` and a JSON body naming the cause instead.

Python callers use :class:`RayGenerationClient` (or the raw handle,
``replica_handle().generate.remote(request)``), where Ray's failures become retryable
latentrt errors (:func:`map_ray_error`). Deploy with :func:`build_app` + ``serve.run``,
``latentrt serve --ray`` (:mod:`latentrt.serve.deploy`), or a Serve config file naming
:func:`app_builder` (``examples/ray/config.yaml``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, replace
from typing import Any

try:
    from ray import serve
    from ray.exceptions import (
        ActorDiedError,
        ActorUnavailableError,
        NodeDiedError,
        RayActorError,
        RayTaskError,
        WorkerCrashedError,
    )
    from ray.serve.deployment import Application
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
    from ray.serve.handle import DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(f"latentrt.serve.ray needs Ray Serve: pip install 'latentrt[ray]' ({exc})") from exc

from latentrt.core.errors import InvalidRequest, LatentRTError
from latentrt.core.request import GenerationRequest, resolve_seed
from latentrt.serve.asgi import (
    BodyTooLarge,
    ClientDisconnected,
    ForwardedResponse,
    Receive,
    Send,
    error_response,
    read_request,
    run_lifespan,
)
from latentrt.serve.config import RayServeOptions, ReplicaSpec, app_config
from latentrt.serve.errors import ClusterBusy, ReplicaUnavailable, is_retryable
from latentrt.serve.replica import GenerationReplica, ReplicaInfo, ReplicaResult
from latentrt.service import RequestTimeout, ServiceBusy

__all__ = [
    "APP_NAME",
    "INGRESS_DEPLOYMENT",
    "REPLICA_DEPLOYMENT",
    "LatentRTIngress",
    "RayGenerationClient",
    "app_builder",
    "build_app",
    "map_ray_error",
    "replica_handle",
]

logger = logging.getLogger(__name__)

APP_NAME = "latentrt"
REPLICA_DEPLOYMENT = "GenerationReplica"
INGRESS_DEPLOYMENT = "LatentRTIngress"

# Ray failures that mean "this replica is gone or unreachable", most specific first: (kind, cause, what happened)
_UNAVAILABLE: tuple[tuple[type[BaseException], str, str], ...] = (
    (ActorDiedError, "replica_died", "the replica running the request died (its process exited or was killed)"),
    (ActorUnavailableError, "replica_unreachable", "the replica running the request cannot be reached right now"),
    (ReplicaUnavailableError, "replica_unreachable", "the replica chosen for the request is no longer available"),
    (NodeDiedError, "node_died", "the machine running the replica left the cluster"),
    (WorkerCrashedError, "replica_died", "the replica's worker process crashed"),
    (RayActorError, "replica_died", "the replica running the request died"),
    (DeploymentUnavailableError, "deployment_unavailable", "the deployment is not running; see `serve status`"),
)


def map_ray_error(error: BaseException, retry_after: float = 2.0) -> BaseException:
    """The error a caller should see for ``error`` raised by a Ray Serve call.

    A latentrt error raised in the replica comes back as itself (unwrapped from Ray's
    ``RayTaskError``); a dead or unreachable replica becomes :class:`ReplicaUnavailable`
    and backpressure :class:`ClusterBusy`, both retryable after ``retry_after`` seconds;
    anything else is returned unchanged.
    """
    if isinstance(error, RayTaskError) and isinstance(error.cause, LatentRTError):
        return error.cause
    if isinstance(error, LatentRTError):
        return error
    if isinstance(error, BackPressureError):
        wait = error.retry_after_s or retry_after
        return ClusterBusy(
            f"every replica is busy and the queue is full ({error.message}); retry in {wait:.0f} s, "
            "or add replicas (max_replicas) or raise max_queued_requests",
            retry_after=wait,
        )
    for kind, cause, what in _UNAVAILABLE:
        if isinstance(error, kind):
            return ReplicaUnavailable(
                f"{what}, so the request did not complete; send it again (Ray Serve replaces failed replicas) "
                f"[{type(error).__name__}]",
                cause=cause,
                retry_after=retry_after,
            )
    return error


def failure_response(error: BaseException) -> ForwardedResponse:
    """The HTTP answer to a failed forward: 503 + ``Retry-After`` for retryable failures, else a JSON 500."""
    if isinstance(error, ReplicaUnavailable):
        return error_response(503, str(error), cause=error.cause, retry_after=error.retry_after)
    if isinstance(error, ServiceBusy):
        return error_response(503, str(error), cause=getattr(error, "cause", "busy"), retry_after=error.retry_after)
    logger.error("forwarding a request failed", exc_info=error)
    return error_response(500, f"internal error: {type(error).__name__}: {error}")


@dataclass(frozen=True)
class IngressSettings:
    """What the ingress needs to know: the body limit and the wait it suggests after a failure."""

    max_body_bytes: int
    retry_after_s: float


class LatentRTIngress:
    """The application's HTTP entry: forwards every request to a replica, answers replica failures with a 503.

    Also offers ``generate`` (the handle API through the application's own handle,
    ``serve.get_app_handle("latentrt").generate.remote(request)``).
    """

    def __init__(self, replicas: DeploymentHandle[Any], settings: IngressSettings) -> None:
        self.replicas = replicas
        self.settings = settings

    def __serve_build_asgi_app__(self) -> _IngressApp:
        """The ASGI app Ray Serve mounts (called once per ingress replica)."""
        return _IngressApp(self)

    async def asgi(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        """The ASGI entry point: HTTP is forwarded, lifespan acknowledged, anything else refused."""
        if scope["type"] == "lifespan":
            await run_lifespan(receive, send)
        elif scope["type"] == "http":
            with contextlib.suppress(ClientDisconnected):  # nobody left to answer
                await (await self.forward(scope, receive)).send(send)
        else:
            await send({"type": "websocket.close", "code": 1003})

    async def forward(self, scope: MutableMapping[str, Any], receive: Receive) -> ForwardedResponse:
        """Read the request, run it on a replica, and return the replica's response (or the failure's)."""
        try:
            request = await read_request(scope, receive, self.settings.max_body_bytes)
        except BodyTooLarge as exc:
            return error_response(413, str(exc))
        try:
            response: ForwardedResponse = await self.replicas.http.remote(request)
        except Exception as exc:
            return failure_response(map_ray_error(exc, self.settings.retry_after_s))
        return response

    async def generate(self, request: GenerationRequest, **options: Any) -> ReplicaResult:
        """Run ``request`` on a replica (options as :meth:`GenerationReplica.generate`)."""
        try:
            result: ReplicaResult = await self.replicas.generate.remote(request, **options)
        except Exception as exc:
            mapped = map_ray_error(exc, self.settings.retry_after_s)
            if mapped is exc:
                raise
            raise mapped from exc
        return result


class _IngressApp:
    """:meth:`LatentRTIngress.asgi` as an ASGI 3 callable object (servers tell ASGI 2 from 3 by ``__call__``)."""

    def __init__(self, ingress: LatentRTIngress) -> None:
        self.ingress = ingress

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        """Serve one ASGI connection."""
        await self.ingress.asgi(scope, receive, send)


def build_app(spec: ReplicaSpec | None = None, options: RayServeOptions | None = None) -> Application:
    """The Ray Serve application: ingress -> replicas of ``spec`` run as ``options`` say (``serve.run`` it)."""
    spec = spec or ReplicaSpec()
    options = options or RayServeOptions()
    replicas = serve.deployment(name=REPLICA_DEPLOYMENT)(GenerationReplica).options(
        **options.replica_options(spec.service)
    )
    ingress = serve.deployment(name=INGRESS_DEPLOYMENT)(serve.ingress()(LatentRTIngress)).options(
        **options.ingress_options()
    )
    return ingress.bind(replicas.bind(spec), IngressSettings(spec.max_body_bytes, options.retry_after_s))


def app_builder(args: dict[str, Any]) -> Application:
    """The application of a Serve config file: ``import_path: latentrt.serve.ray:app_builder`` with ``args``.

    ``args`` keys: see :func:`latentrt.serve.config.app_config` and ``examples/ray/config.yaml``.
    """
    spec, options = app_config(args)
    return build_app(spec, options)


def replica_handle(app_name: str = APP_NAME) -> DeploymentHandle[Any]:
    """A handle on the replicas of a running application: ``handle.generate.remote(request)``."""
    return serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=app_name)


class RayGenerationClient:
    """Requests to a running application's replicas, with Ray's failures turned into latentrt errors.

    ``generate`` blocks (call it from a thread without a running event loop);
    ``generate_async`` is for asyncio. A retryable failure (:func:`is_retryable`: a replica
    died, every replica busy) is sent again up to ``retries`` times, after the wait the
    error suggests (at most ``max_wait_s``); a request with ``seed=-1`` gets its seed drawn
    once, here, so a retry makes the same image.
    """

    def __init__(
        self,
        handle: DeploymentHandle[Any] | None = None,
        *,
        app_name: str = APP_NAME,
        retries: int = 0,
        max_wait_s: float = 30.0,
        retry_after_s: float = 2.0,
    ) -> None:
        self.handle = handle if handle is not None else replica_handle(app_name)
        self.retries = retries
        self.max_wait_s = max_wait_s
        self.retry_after_s = retry_after_s

    def generate(
        self,
        request: GenerationRequest,
        *,
        model: str | None = None,
        timeout_s: float | None = None,
        task_id: str | None = None,
    ) -> ReplicaResult:
        """Run ``request`` on some replica; ``timeout_s`` bounds it there (queue included) and here."""
        request = _fixed_seed(request)
        for attempt in itertools.count():
            try:
                response = _call(self.handle, "generate", request, model=model, timeout=timeout_s, task_id=task_id)
                result: ReplicaResult = self._result(response, timeout_s)
                return result
            except LatentRTError as exc:
                time.sleep(self._retry_wait(exc, attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    async def generate_async(
        self,
        request: GenerationRequest,
        *,
        model: str | None = None,
        timeout_s: float | None = None,
        task_id: str | None = None,
    ) -> ReplicaResult:
        """:meth:`generate` for asyncio; cancelling the awaiting task cancels the request on its replica."""
        request = _fixed_seed(request)
        for attempt in itertools.count():
            try:
                call = _call(self.handle, "generate", request, model=model, timeout=timeout_s, task_id=task_id)
                result: ReplicaResult = await self._awaited(call, timeout_s)
                return result
            except LatentRTError as exc:
                await asyncio.sleep(self._retry_wait(exc, attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def info(self, task_id: str | None = None, timeout_s: float = 30.0) -> ReplicaInfo:
        """Identity, models and counters of whichever replica answers (and where ``task_id`` stands there)."""
        result: ReplicaInfo = self._result(_call(self.handle, "info", task_id), timeout_s)
        return result

    def _result(self, response: DeploymentResponse[Any], timeout_s: float | None) -> Any:
        wait = None if timeout_s is None else timeout_s + 10.0  # the replica times the request out first
        try:
            return response.result(timeout_s=wait)
        except TimeoutError:
            response.cancel()  # type: ignore[no-untyped-call]
            raise _no_answer(wait) from None
        except Exception as exc:
            raise self._mapped(exc) from exc

    async def _awaited(self, response: DeploymentResponse[Any], timeout_s: float | None) -> Any:
        wait = None if timeout_s is None else timeout_s + 10.0
        try:
            return await asyncio.wait_for(response, wait)
        except asyncio.TimeoutError:
            raise _no_answer(wait) from None
        except Exception as exc:
            raise self._mapped(exc) from exc

    def _mapped(self, error: Exception) -> BaseException:
        mapped = map_ray_error(error, self.retry_after_s)
        return mapped if mapped is not error else error

    def _retry_wait(self, error: LatentRTError, attempt: int) -> float:
        """Seconds to wait before retrying after ``error`` on ``attempt`` (0-based); raises ``error``
        when it is not retryable or the retries are spent."""
        if attempt >= self.retries or not is_retryable(error):
            raise error
        logger.warning("retrying (%d of %d) after: %s", attempt + 1, self.retries, error)
        return min(float(getattr(error, "retry_after", 1.0)), self.max_wait_s)


def _no_answer(wait: float | None) -> RequestTimeout:
    return RequestTimeout(
        f"no answer from the cluster within {wait:.0f} s; the request was cancelled: "
        "raise timeout_s, or lower steps, size or batch"
    )


def _call(handle: DeploymentHandle[Any], method: str, *args: Any, **kwargs: Any) -> DeploymentResponse[Any]:
    """``handle.<method>.remote(*args, **kwargs)``: one (not a streamed) response."""
    response: DeploymentResponse[Any] | DeploymentResponseGenerator[Any] = getattr(handle, method).remote(
        *args, **kwargs
    )
    if isinstance(response, DeploymentResponseGenerator):
        raise InvalidRequest("RayGenerationClient needs a plain handle; this one was made with stream=True")
    return response


def _fixed_seed(request: GenerationRequest) -> GenerationRequest:
    """``request`` with a random seed (-1) drawn now, so every attempt makes the same image."""
    return request if request.seed != -1 else replace(request, seed=resolve_seed(-1))
