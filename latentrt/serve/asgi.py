"""HTTP requests carried between processes: read at the cluster's entry, replayed into the replica's ASGI app.

The ingress reads a request (:func:`read_request`) into a picklable
:class:`ForwardedRequest`; the replica that gets it runs its FastAPI app on it in-process
(:func:`call_app`, a minimal ASGI server) and returns a :class:`ForwardedResponse`, which
the ingress writes back (:meth:`ForwardedResponse.send`). So every route, check and error
shape is the one ``latentrt serve`` has, unchanged.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BodyTooLarge",
    "ClientDisconnected",
    "ForwardedRequest",
    "ForwardedResponse",
    "call_app",
    "error_response",
    "read_request",
    "run_lifespan",
]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

Headers = tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress received it (body read in full)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: Headers = ()
    body: bytes = b""
    client: tuple[str, int] | None = None
    scheme: str = "http"

    def scope(self) -> dict[str, Any]:
        """The ASGI ``http`` scope of this request."""
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": self.method,
            "scheme": self.scheme,
            "path": self.path,
            "raw_path": self.path.encode("utf-8", "surrogateescape"),
            "query_string": self.query_string,
            "root_path": "",
            "headers": [list(h) for h in self.headers],
            "client": list(self.client) if self.client else None,
            "server": None,
        }


@dataclass(frozen=True)
class ForwardedResponse:
    """An HTTP response produced by a replica's app (body in full)."""

    status: int
    headers: Headers = ()
    body: bytes = b""

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        key = name.lower().encode()
        for k, v in self.headers:
            if k.lower() == key:
                return v.decode("latin-1")
        return None

    async def send(self, send: Send) -> None:
        """Write the response to an ASGI ``send``."""
        headers = [list(h) for h in self.headers]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


class BodyTooLarge(Exception):
    """A request body over the limit (internal: answered with 413)."""


class ClientDisconnected(Exception):
    """The client went away before it had sent its body (internal: nobody to answer)."""


async def read_request(scope: MutableMapping[str, Any], receive: Receive, max_body_bytes: int) -> ForwardedRequest:
    """The request of an ASGI ``http`` scope, its body read in full.

    Raises :class:`BodyTooLarge` past ``max_body_bytes`` and :class:`ClientDisconnected`
    if the client leaves first.
    """
    headers = tuple((bytes(k), bytes(v)) for k, v in scope.get("headers", ()))
    length = dict(headers).get(b"content-length", b"")
    if length.isdigit() and int(length) > max_body_bytes:
        raise BodyTooLarge(f"the request body has {int(length)} bytes; this server accepts at most {max_body_bytes}")
    chunks: list[bytes] = []
    size, more = 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnected("the client went away before sending its body")
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        if size > max_body_bytes:
            raise BodyTooLarge(f"the request body has more than {max_body_bytes} bytes, the most this server accepts")
        more = bool(message.get("more_body", False))
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"  # the replica's app is mounted at /
    client = scope.get("client")
    return ForwardedRequest(
        method=scope["method"],
        path=path,
        query_string=scope.get("query_string", b""),
        headers=headers,
        body=b"".join(chunks),
        client=(str(client[0]), int(client[1])) if client else None,
        scheme=scope.get("scheme", "http"),
    )


async def call_app(app: ASGIApp, request: ForwardedRequest) -> ForwardedResponse:
    """Run ``app`` on ``request`` in this process and collect its response.

    After the body, ``receive`` waits until the response is complete (a client that stays
    connected): cancelling the calling task is how a client's disconnect reaches the app.
    """
    finished = asyncio.Event()
    delivered = False
    start: Message = {}
    chunks: list[bytes] = []

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(bytes(message.get("body", b"")))
            if not message.get("more_body", False):
                finished.set()

    try:
        await app(request.scope(), receive, send)
    finally:
        finished.set()
    if not start:
        raise RuntimeError(f"the app sent no response to {request.method} {request.path}")
    headers = tuple((bytes(k), bytes(v)) for k, v in start.get("headers", ()))
    return ForwardedResponse(int(start["status"]), headers, b"".join(chunks))


def error_response(
    status: int, detail: str, *, cause: str | None = None, retry_after: float | None = None
) -> ForwardedResponse:
    """A JSON error in the API's shape (``{"detail": ...}``), with ``cause``/``retryable`` and ``Retry-After``."""
    content: dict[str, Any] = {"detail": detail}
    headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json")]
    if cause is not None:
        content.update(cause=cause, retryable=retry_after is not None)
    if retry_after is not None:
        headers.append((b"retry-after", str(max(1, math.ceil(retry_after))).encode()))
    body = json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")
    headers.append((b"content-length", str(len(body)).encode()))
    return ForwardedResponse(status, tuple(headers), body)


async def run_lifespan(receive: Receive, send: Send) -> None:
    """Answer an ASGI ``lifespan`` scope: nothing to start or stop (the replicas own the state)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
