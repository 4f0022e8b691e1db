"""What the endpoints share: the service, the A1111 options, and a lock for changing them."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from latentrt.server.a1111 import Defaults
from latentrt.service import GenerationService

__all__ = ["ApiState", "State", "state_of"]


@dataclass
class ApiState:
    """The app's shared state (``app.state.api``)."""

    service: GenerationService
    defaults: Defaults = field(default_factory=Defaults)
    lock: threading.Lock = field(default_factory=threading.Lock)


def state_of(request: Request) -> ApiState:
    """The app's :class:`ApiState` (a FastAPI dependency)."""
    state: ApiState = request.app.state.api
    return state


State = Annotated[ApiState, Depends(state_of)]
"""An endpoint parameter receiving the app's :class:`ApiState`."""
