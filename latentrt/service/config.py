"""How a :class:`~latentrt.service.GenerationService` runs: workers, queue, batching, timeouts, memory."""

from __future__ import annotations

from dataclasses import dataclass, field

from latentrt.core.errors import InvalidRequest
from latentrt.service.validation import RequestLimits

__all__ = ["ServiceConfig"]


@dataclass(frozen=True)
class ServiceConfig:
    """How a :class:`GenerationService` runs.

    ``workers`` requests run at once, their backbone calls stacked (at most
    ``max_batch_rows`` latent rows per call; ``batching=False`` runs every call on its own);
    ``max_queue`` more may wait. ``timeout_s`` is the default per-request limit, queue time
    included (None: none). ``max_loaded_models``/``max_loaded_bytes`` bound the models kept
    loaded. ``device``/``dtype`` are used to load checkpoints.
    """

    workers: int = 8
    max_queue: int = 64
    batching: bool = True
    max_batch_rows: int = 64
    batch_wait_s: float = 0.2
    timeout_s: float | None = 600.0
    max_loaded_models: int = 2
    max_loaded_bytes: int | None = None
    limits: RequestLimits = field(default_factory=RequestLimits)
    device: str = "cpu"
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("workers", "max_queue", "max_batch_rows", "max_loaded_models"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"ServiceConfig.{name} must be an integer >= 1, got {value!r}")
        if not self.batch_wait_s >= 0:
            raise InvalidRequest(f"ServiceConfig.batch_wait_s must be >= 0, got {self.batch_wait_s!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise InvalidRequest(f"ServiceConfig.timeout_s must be > 0 or None, got {self.timeout_s!r}")
