"""The FastAPI application: A1111's ``/sdapi/v1`` endpoints over a :class:`GenerationService`, plus ``/health``.

Generation requests are planned (checked, images decoded) in a worker thread, queued on the
service, and awaited without blocking the event loop; a client that disconnects cancels its
request. Error statuses and shapes: :mod:`latentrt.server.errors`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from latentrt._version import __version__
from latentrt.server.a1111 import Defaults, Plan, build_response, plan_img2img, plan_txt2img
from latentrt.server.auth import require_api_key
from latentrt.server.errors import ClientGone, ErrorJSONResponse, ErrorResponse, add_error_handlers
from latentrt.server.routes_info import info_router
from latentrt.server.schemas import GenerationResponse, HealthResponse, Img2ImgRequest, Txt2ImgRequest, bounded
from latentrt.server.state import ApiState, State, state_of
from latentrt.service import (
    GenerationFuture,
    GenerationService,
    InvalidField,
    RequestCancelled,
    RequestLimits,
    ServiceResult,
)

__all__ = ["create_app"]

logger = logging.getLogger(__name__)


def _documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for error statuses."""
    return {code: {"model": ErrorResponse, "description": _ERROR_TEXTS[code]} for code in codes}


_ERROR_TEXTS = {
    400: "the request could not be carried out, or its body could not be parsed (the message says why)",
    401: "missing or wrong API key",
    409: "the request was cancelled",
    413: "the request body is too large",
    503: "the queue is full (see Retry-After) or the server is shutting down",
    504: "the request did not finish within the server's timeout",
}


def create_app(
    service: GenerationService,
    *,
    api_key: str | None = None,
    defaults: Defaults | None = None,
    max_body_bytes: int = 64 << 20,
    own_service: bool = True,
) -> FastAPI:
    """The HTTP app over ``service``; with ``own_service`` it shuts the service down when the app stops."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if own_service:
            await run_in_threadpool(service.shutdown, cancel=True, timeout=30.0)

    app = FastAPI(
        title="latentrt",
        version=__version__,
        description="A1111-compatible image generation API (latentrt).",
        lifespan=lifespan,
    )
    state = ApiState(service, defaults or Defaults())
    app.state.api = state
    dependencies = [] if api_key is None else [Depends(require_api_key(api_key))]
    errors = _documented(400, 413) | (_documented(401) if api_key is not None else {})
    generation = generation_router(service.config.limits, state.defaults.max_n_iter)
    app.include_router(generation, dependencies=dependencies, responses=errors | _documented(409, 503, 504))
    app.include_router(info_router(), dependencies=dependencies, responses=errors)
    app.add_api_route(
        "/health", health, methods=["GET"], response_model=HealthResponse, tags=["latentrt"], responses=_documented(413)
    )
    add_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app


def health(state: State) -> HealthResponse:
    """Whether the server is up, its queue, and its counters (no API key needed)."""
    metrics = state.service.metrics()
    return HealthResponse(
        status="ok",
        version=__version__,
        queued=int(metrics["queued"]),
        running=int(metrics["running"]),
        models_loaded=state.service.models.loaded_names(),
        metrics={k: float(v) for k, v in metrics.items()},
    )


def generation_router(limits: RequestLimits, max_n_iter: int) -> APIRouter:
    """``/sdapi/v1/txt2img`` and ``/sdapi/v1/img2img``, their bodies bounded by the server's limits."""
    router = APIRouter(tags=["sdapi"])

    async def txt2img(body: Txt2ImgRequest, request: Request) -> GenerationResponse:
        """Generate images from a prompt."""
        return await _generate(plan_txt2img, body, request)

    async def img2img(body: Img2ImgRequest, request: Request) -> GenerationResponse:
        """Generate images from init images (and a mask: inpainting)."""
        return await _generate(plan_img2img, body, request)

    # the body models are built from the limits at run time; FastAPI reads them from the annotations
    txt2img.__annotations__["body"] = bounded(Txt2ImgRequest, limits, max_n_iter)
    img2img.__annotations__["body"] = bounded(Img2ImgRequest, limits, max_n_iter)
    router.add_api_route("/sdapi/v1/txt2img", txt2img, methods=["POST"], response_model=GenerationResponse)
    router.add_api_route("/sdapi/v1/img2img", img2img, methods=["POST"], response_model=GenerationResponse)
    return router


async def _generate(
    plan_fn: Callable[[Any, GenerationService, Defaults], Plan], body: Txt2ImgRequest | Img2ImgRequest, request: Request
) -> GenerationResponse:
    """Plan (checks, image decoding), queue, wait (cancelling if the client goes away), respond."""
    state = state_of(request)
    service = state.service
    plan = await run_in_threadpool(plan_fn, body, service, state.defaults)
    task_id = _task_id(body.force_task_id, service)
    futures = service.submit_many(plan.requests, model=plan.model, task_id=task_id)
    results = await _results(futures, request)
    return await run_in_threadpool(build_response, plan, results, service, futures[0].task_id)


def _task_id(given: str | None, service: GenerationService) -> str | None:
    if given is None:
        return None
    if not 1 <= len(given) <= 128 or not given.isprintable():
        raise InvalidField("force_task_id", "force_task_id must be 1..128 printable characters")
    if service.progress(given) is not None:
        raise InvalidField("force_task_id", f"task {given!r} is still running; use another id")
    return given


async def _results(futures: list[GenerationFuture], request: Request) -> list[ServiceResult]:
    """The requests' results in order; interrupted-while-queued ones are left out, any other failure raised."""
    gathered = asyncio.gather(*(asyncio.wrap_future(f) for f in futures), return_exceptions=True)
    try:
        while not gathered.done():
            await asyncio.wait({gathered}, timeout=0.25)
            if not gathered.done() and await request.is_disconnected():
                raise ClientGone("the client went away; the request was cancelled")
    except BaseException:
        for future in futures:
            future.cancel()
        raise
    results = []
    for outcome in gathered.result():
        if isinstance(outcome, RequestCancelled) and outcome.reason == "interrupted":
            continue
        if isinstance(outcome, BaseException):
            for future in futures:
                future.cancel()
            raise outcome
        results.append(outcome)
    return results


class BodyLimit:
    """Refuse request bodies whose ``Content-Length`` exceeds ``max_bytes`` (413), before reading them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer 413 for oversized bodies; pass everything else on."""
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_bytes:
                detail = f"the request body has {int(length)} bytes; this server accepts at most {self.max_bytes}"
                await ErrorJSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
                return
        await self.app(scope, receive, send)
