"""What the service hands its callers: futures, progress events and results."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from PIL import Image
from torch import Tensor

from latentrt.core.pipeline import GenerationCancelled, GenerationResult
from latentrt.core.request import GenerationRequest
from latentrt.service.errors import RequestTimeout

if TYPE_CHECKING:
    from latentrt.service.service import GenerationService

__all__ = [
    "GenerationFuture",
    "Job",
    "JobState",
    "Progress",
    "ServiceResult",
    "expected_steps",
    "outcome_kind",
    "task_progress",
]

JobState = Literal["queued", "running", "done", "failed", "cancelled"]


@dataclass(frozen=True)
class Progress:
    """One progress event of a request: ``step`` of ``steps`` done, with the current preview.

    ``preview`` is the model's current estimate of the final latents (``x0``, one row per
    image; decode it with the model's VAE to look at it), None before the first step.
    """

    task_id: str
    state: JobState
    step: int
    steps: int
    sigma: float | None = None
    preview: Tensor | None = None
    started: float | None = None  # time.monotonic() when it started running
    model: str | None = None

    @property
    def fraction(self) -> float:
        """Share of the steps done, 0..1."""
        return self.step / self.steps if self.steps else 0.0

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds left at the rate so far, or None before the first step."""
        if self.started is None or self.step == 0:
            return None
        elapsed = (now if now is not None else time.monotonic()) - self.started
        return elapsed / self.step * (self.steps - self.step)


class _HasImages(Protocol):
    @property
    def images(self) -> list[Image.Image]: ...

    @property
    def parameters(self) -> list[str]: ...

    @property
    def seeds(self) -> list[int]: ...


class ForwardsImages:
    """``images``, ``parameters`` and ``seeds`` read through to ``self.result`` (a result that wraps
    another with what it adds: the service's accounting, the replica that ran it)."""

    result: _HasImages

    @property
    def images(self) -> list[Image.Image]:
        """The generated images."""
        return self.result.images

    @property
    def parameters(self) -> list[str]:
        """The A1111 parameters text of each image."""
        return self.result.parameters

    @property
    def seeds(self) -> list[int]:
        """The seed of each image."""
        return self.result.seeds


@dataclass(frozen=True)
class ServiceResult(ForwardsImages):
    """A finished request: the pipeline's result plus how the service ran it.

    ``interrupted`` results hold the model's ``x0`` estimate at the step where an interrupt
    stopped them (as A1111 returns on ``/interrupt``). ``shared_calls`` counts this
    request's denoiser calls that were stacked with other requests into one backbone call.
    """

    result: GenerationResult
    model: str
    task_id: str
    steps_done: int
    denoiser_calls: int
    shared_calls: int
    queued_s: float
    run_s: float
    interrupted: bool = False


def expected_steps(request: GenerationRequest) -> int:
    """How many sampler steps the pipeline will run for ``request`` (img2img runs fewer)."""
    if request.sigmas is not None:
        return max(int(request.sigmas.numel()) - 1, 0)
    if request.init_image is None or request.strength >= 1.0:
        return request.steps
    return min(int(request.steps * request.strength), request.steps)


@dataclass(eq=False)
class Job:
    """A request inside the service (internal bookkeeping)."""

    request: GenerationRequest
    model: str
    task_id: str
    deadline: float | None
    on_progress: Callable[[Progress], None] | None
    submitted: float = field(default_factory=time.monotonic)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    reason: str | None = None  # why cancel_event was set: cancelled, interrupted, timeout, shutdown
    progress: Progress | None = None
    future: GenerationFuture | None = None

    def stop(self, reason: str) -> None:
        """Ask the running pipeline to stop at the next step (the first reason given wins)."""
        if self.reason is None:
            self.reason = reason
        self.cancel_event.set()


class GenerationFuture(Future[ServiceResult]):
    """A :class:`concurrent.futures.Future` of a :class:`ServiceResult`, with progress and cancellation.

    :meth:`cancel` also stops a running request: it then ends with
    :class:`~latentrt.service.errors.RequestCancelled` after its current step.
    """

    def __init__(self, job: Job, service: GenerationService) -> None:
        super().__init__()
        self._job = job
        self._service = service

    @property
    def task_id(self) -> str:
        """The id of the task this request belongs to (several requests may share one)."""
        return self._job.task_id

    def progress(self) -> Progress:
        """The latest progress event of this request."""
        job = self._job
        if job.progress is not None:
            return job.progress
        return Progress(job.task_id, "queued", 0, expected_steps(job.request))

    def cancel(self) -> bool:
        """Cancel a queued request, or stop a running one between steps; False once it has finished."""
        if super().cancel():
            self._service._forget_queued(self._job)
            return True
        if self.done():
            return False
        self._job.stop("cancelled")
        return True


def outcome_kind(outcome: ServiceResult | BaseException) -> tuple[JobState, str]:
    """(final job state, counter name) of an outcome."""
    if isinstance(outcome, ServiceResult):
        return "done", "interrupted" if outcome.interrupted else "completed"
    if isinstance(outcome, RequestTimeout):
        return "failed", "timed_out"
    if isinstance(outcome, GenerationCancelled):
        return "cancelled", "cancelled"
    return "failed", "failed"


def task_progress(task_id: str, jobs: list[Job]) -> Progress:
    """One progress event for a task's requests: steps summed, the running one's preview."""
    events = [j.progress or Progress(task_id, "queued", 0, expected_steps(j.request), model=j.model) for j in jobs]
    running = [e for e in events if e.state == "running"]
    latest = max(running, key=lambda e: e.step, default=events[0])
    starts = [e.started for e in events if e.started is not None]
    return Progress(
        task_id,
        "running" if running else "queued",
        sum(e.step for e in events),
        sum(e.steps for e in events),
        latest.sigma,
        latest.preview,
        min(starts) if starts else None,
        latest.model,
    )
