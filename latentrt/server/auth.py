"""The optional API key: ``Authorization: Bearer KEY``, or HTTP Basic auth as A1111's ``--api-auth`` uses.

Basic credentials are accepted when the password is the key (any user name, so clients
that only speak A1111's user/password auth work), or when ``user:password`` is the key.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer

__all__ = ["key_matches", "require_api_key"]

_CHALLENGE = {"WWW-Authenticate": 'Bearer, Basic realm="latentrt"'}


class _LenientBasic(HTTPBasic):
    """HTTP Basic that reads a malformed header as no credentials (the key check answers 401 then)."""

    async def __call__(self, request: Request) -> HTTPBasicCredentials | None:  # type: ignore[override]
        """The Basic credentials, or None."""
        try:
            return await super().__call__(request)
        except HTTPException:
            return None


_bearer = HTTPBearer(auto_error=False, description="the server's API key")
_basic = _LenientBasic(auto_error=False, description="any user name with the API key as password")


def key_matches(key: str, bearer: str | None, basic: HTTPBasicCredentials | None) -> bool:
    """Whether the bearer token or the Basic credentials carry ``key`` (compared in constant time)."""
    expected = key.encode()
    candidates = [] if bearer is None else [bearer]
    if basic is not None:
        candidates += [basic.password, f"{basic.username}:{basic.password}"]
    return any(hmac.compare_digest(c.encode(), expected) for c in candidates)


def require_api_key(key: str) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency answering 401 unless the request carries ``key``."""

    async def check(
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
        basic: Annotated[HTTPBasicCredentials | None, Depends(_basic)],
    ) -> None:
        if not key_matches(key, None if bearer is None else bearer.credentials, basic):
            raise HTTPException(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", headers=_CHALLENGE)

    return check
