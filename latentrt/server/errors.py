"""latentrt errors -> HTTP statuses, in A1111/FastAPI's response shapes.

An invalid request is a 422 whose ``detail`` lists ``{loc, msg, type}`` naming the field
(FastAPI's shape, for our checks and pydantic's alike, without echoing the input back); a
full queue is a 503 with ``Retry-After``; a request past its timeout a 504; a cancelled one
a 409; other latentrt errors are 400s with the message. Error bodies are ASCII JSON, so a
message quoting client text (even a lone surrogate) can always be sent.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from latentrt.core.errors import InvalidRequest, LatentRTError, PluginError
from latentrt.server.a1111 import a1111_field
from latentrt.service import InvalidField, RequestCancelled, RequestTimeout, ServiceBusy, ServiceClosed

__all__ = ["ClientGone", "ErrorJSONResponse", "ErrorResponse", "add_error_handlers"]

logger = logging.getLogger(__name__)


class ErrorResponse(BaseModel):
    """An error other than a validation error: what happened and what to do."""

    detail: str


class ClientGone(LatentRTError):
    """The client closed the connection before its images were ready; the request was cancelled."""


class ErrorJSONResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: encodable whatever text an error quotes."""

    def render(self, content: Any) -> bytes:
        """``content`` as ASCII JSON."""
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def _field_error(loc: list[Any], msg: str, kind: str) -> dict[str, Any]:
    return {"loc": loc, "msg": msg, "type": kind}


def add_error_handlers(app: FastAPI) -> None:
    """Install the handlers described in the module docstring."""

    async def validation_failed(request: Request, exc: Exception) -> ErrorJSONResponse:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        detail = [_field_error(list(e.get("loc", ())), str(e.get("msg", "")), str(e.get("type", ""))) for e in errors]
        return ErrorJSONResponse({"detail": jsonable_encoder(detail)}, status_code=422)

    async def invalid(request: Request, exc: Exception) -> ErrorJSONResponse:
        field_name = a1111_field(exc.field) if isinstance(exc, InvalidField) else None
        loc = ["body", field_name] if field_name else ["body"]
        return ErrorJSONResponse({"detail": [_field_error(loc, str(exc), "value_error")]}, status_code=422)

    async def busy(request: Request, exc: Exception) -> ErrorJSONResponse:
        retry = math.ceil(exc.retry_after) if isinstance(exc, ServiceBusy) else 5
        return ErrorJSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(retry)})

    def plain(status: int) -> Callable[[Request, Exception], Any]:
        async def handler(request: Request, exc: Exception) -> ErrorJSONResponse:
            return ErrorJSONResponse({"detail": str(exc)}, status_code=status)

        return handler

    async def unexpected(request: Request, exc: Exception) -> ErrorJSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return ErrorJSONResponse({"detail": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    app.add_exception_handler(RequestValidationError, validation_failed)
    for kind in (InvalidRequest, PluginError):
        app.add_exception_handler(kind, invalid)
    app.add_exception_handler(ServiceBusy, busy)
    app.add_exception_handler(ServiceClosed, busy)
    app.add_exception_handler(RequestTimeout, plain(504))
    app.add_exception_handler(RequestCancelled, plain(409))
    app.add_exception_handler(ClientGone, plain(409))
    app.add_exception_handler(LatentRTError, plain(400))
    app.add_exception_handler(Exception, unexpected)
