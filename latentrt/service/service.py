"""GenerationService: a thread-safe queue of generation requests, run by workers whose steps are batched.

Requests come from any thread (:meth:`GenerationService.submit` returns a future) or from
asyncio (``await service.generate(request)``). They are checked before they queue, wait in
a bounded queue (full: :class:`ServiceBusy`), then run on one of ``workers`` threads,
each through an unchanged :class:`~latentrt.core.pipeline.Pipeline` whose backbone calls
are stacked with the other running requests' (:mod:`latentrt.service.batching`).

Every request has a timeout, can be cancelled while queued or between steps, reports
progress after each step (with the current ``x0`` preview latent), and can be interrupted
(A1111's ``/interrupt``: it returns the image as it stands). :meth:`shutdown` finishes
or cancels the work in flight and stops the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import InvalidStateError
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from PIL import Image

from latentrt.core.errors import InvalidRequest, LatentRTError
from latentrt.core.loader import builtin_checkpoint, load
from latentrt.core.pipeline import GenerationCancelled, GenerationResult, Pipeline, decode_finite, tensor_to_images
from latentrt.core.protocols import StepInfo
from latentrt.core.registry import Registry, registry
from latentrt.core.request import GenerationRequest, resolve_seed
from latentrt.service.batching import StepBatcher
from latentrt.service.config import ServiceConfig
from latentrt.service.errors import RequestCancelled, RequestTimeout, ServiceBusy, ServiceClosed
from latentrt.service.jobs import (
    GenerationFuture,
    Job,
    Progress,
    ServiceResult,
    expected_steps,
    outcome_kind,
    task_progress,
)
from latentrt.service.models import ModelPool, ModelSource, model_entries
from latentrt.service.validation import check_request

__all__ = ["GenerationService", "ServiceConfig"]

logger = logging.getLogger(__name__)

_FINAL = ("done", "failed", "cancelled")
_REASONS = {"cancelled": "cancelled", "interrupted": "interrupted", "shutdown": "cancelled by shutdown"}


class GenerationService:
    """Holds loaded pipelines by name and runs requests from many threads (see the module docstring).

    ``models``: a path, a built-in model name (``"demo"``, the default), a pipeline, a list
    of those (named by file stem), or a ``{name: path or pipeline}`` mapping; the first is
    the default. Use it as a context manager, or call :meth:`shutdown`.
    """

    def __init__(
        self,
        models: Mapping[str, ModelSource] | Sequence[ModelSource] | ModelSource | None = None,
        *,
        config: ServiceConfig | None = None,
        plugins: Registry | None = None,
        loader: Callable[[Path], Pipeline] | None = None,
    ) -> None:
        self.config = config or ServiceConfig()
        self.registry = plugins or registry()
        if models is None or isinstance(models, (str, Path, Pipeline)):
            models = ["demo" if models is None else models]
        self.models = ModelPool(
            model_entries(models, lambda source: builtin_checkpoint(source, self.registry)),
            load=loader or self._load,
            make_batcher=self._make_batcher,
            max_loaded=self.config.max_loaded_models,
            max_bytes=self.config.max_loaded_bytes,
        )
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._tasks: dict[str, list[Job]] = {}
        self._closed = False
        self._counts: Counter[str] = Counter()
        self._run_times: deque[float] = deque([1.0], maxlen=32)
        self._stop_watch = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name=f"latentrt-worker-{i}", daemon=True)
            for i in range(self.config.workers)
        ]
        self._watchdog = threading.Thread(target=self._watch, name="latentrt-watchdog", daemon=True)
        for thread in (*self._threads, self._watchdog):
            thread.start()

    # -- submitting ------------------------------------------------------------------

    def submit(
        self,
        request: GenerationRequest,
        *,
        model: str | None = None,
        timeout: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        task_id: str | None = None,
    ) -> GenerationFuture:
        """Check and queue ``request``; the future resolves to a :class:`ServiceResult`.

        Raises :class:`~latentrt.service.errors.InvalidField` for a bad request and
        :class:`ServiceBusy` when the queue is full, before anything is queued.
        ``on_progress`` is called from the worker after each step; keep it quick.
        """
        return self.submit_many([request], model=model, timeout=timeout, on_progress=on_progress, task_id=task_id)[0]

    def submit_many(
        self,
        requests: Sequence[GenerationRequest],
        *,
        model: str | None = None,
        timeout: float | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        task_id: str | None = None,
    ) -> list[GenerationFuture]:
        """Queue several requests as one task (shared id, progress and cancellation): all of them or none."""
        if not requests:
            raise InvalidRequest("submit_many needs at least one request")
        entry = self.models.default if model is None else self.models.find(model)
        try:
            for request in requests:
                check_request(request, self.config.limits, self.registry)
        except InvalidRequest:
            self._count("rejected_invalid")
            raise
        limit = timeout if timeout is not None else self.config.timeout_s
        deadline = None if limit is None else time.monotonic() + limit
        task = task_id or f"task-{uuid.uuid4().hex[:16]}"
        jobs = [Job(_with_seed(r), entry.name, task, deadline, on_progress) for r in requests]
        futures = [GenerationFuture(job, self) for job in jobs]
        for job, future in zip(jobs, futures, strict=True):
            job.future = future
        with self._cond:
            self._admit(jobs)
        return futures

    async def generate(self, request: GenerationRequest, **options: Any) -> ServiceResult:
        """Run ``request`` from asyncio (options as :meth:`submit`); cancelling the awaiting task cancels it."""
        return await asyncio.wrap_future(self.submit(request, **options))

    def _admit(self, jobs: list[Job]) -> None:
        """Queue ``jobs`` or raise (under the lock)."""
        if self._closed:
            raise ServiceClosed("the service is shutting down and takes no new requests")
        if len(self._queue) + len(jobs) > self.config.max_queue:
            self._counts["rejected_busy"] += len(jobs)
            retry = max(1.0, sum(self._run_times) / len(self._run_times) * len(self._queue) / self.config.workers)
            raise ServiceBusy(
                f"the queue is full ({len(self._queue)} of {self.config.max_queue} waiting); "
                f"retry in {retry:.0f} s or raise the queue size",
                retry_after=retry,
            )
        self._queue.extend(jobs)
        self._tasks.setdefault(jobs[0].task_id, []).extend(jobs)
        self._counts["submitted"] += len(jobs)
        self._cond.notify_all()

    # -- control -----------------------------------------------------------------------

    def cancel(self, task_id: str) -> int:
        """Cancel a task's queued and running requests; returns how many were still in flight."""
        return self._stop(lambda job: job.task_id == task_id, "cancelled", queued_too=True)

    def interrupt(self, task_id: str | None = None) -> int:
        """A1111's interrupt: running requests (of ``task_id``, or all) stop and return their image as it stands.

        The queued requests of an interrupted task are cancelled. Returns how many requests were stopped.
        """
        with self._cond:
            tasks = {j.task_id for j in self._running if task_id is None or j.task_id == task_id}
        return self._stop(lambda job: job.task_id in tasks, "interrupted", queued_too=True)

    def _stop(self, chosen: Callable[[Job], bool], reason: str, *, queued_too: bool) -> int:
        with self._cond:
            running = [j for j in self._running if chosen(j)]
            dropped = [j for j in self._queue if chosen(j)] if queued_too else []
            for job in dropped:
                self._queue.remove(job)
            for job in running:
                job.stop(reason)
        for job in dropped:
            self._finish(job, RequestCancelled(f"{job.task_id} was {_REASONS[reason]} before it started", reason))
        return len(running) + len(dropped)

    def shutdown(self, *, cancel: bool = False, timeout: float | None = None) -> None:
        """Stop taking requests, finish the queued and running ones (``cancel=True``: cancel them), stop the workers.

        After ``timeout`` seconds whatever is left is cancelled; the call returns once every
        worker has finished its current step.
        """
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if cancel:
            self._stop(lambda job: True, "shutdown", queued_too=True)
        end = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if end is None else max(0.0, end - time.monotonic()))
        if any(t.is_alive() for t in self._threads):
            self._stop(lambda job: True, "shutdown", queued_too=True)
            for thread in self._threads:
                thread.join()
        self._stop_watch.set()
        self._watchdog.join()

    def __enter__(self) -> GenerationService:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.shutdown(cancel=exc is not None)

    # -- looking in ----------------------------------------------------------------------

    def progress(self, task_id: str | None = None) -> Progress | None:
        """Progress of a task (steps summed over its requests), or of the latest running one; None if idle."""
        with self._cond:
            if task_id is None and self._running:
                task_id = self._running[-1].task_id  # the most recently started
            jobs = list(self._tasks.get(task_id, [])) if task_id is not None else []
        return task_progress(jobs[0].task_id, jobs) if jobs else None

    def preview_images(self, progress: Progress) -> list[Image.Image]:
        """Decode a progress event's preview latent with its model's VAE (empty before the first step)."""
        if progress.preview is None or progress.model is None:
            return []
        with self.models.lease(self.models.find(progress.model)) as loaded, torch.inference_mode():
            return tensor_to_images(decode_finite(loaded.pipeline.model.vae, progress.preview))

    def metrics(self) -> dict[str, int | float]:
        """Counters (requests by outcome, backbone calls shared by requests) and the queue's state now."""
        with self._cond:
            counts: dict[str, int | float] = dict(self._counts)
            counts.update(queued=len(self._queue), running=len(self._running))
        stats = self.models.stats()
        counts.update(vars(stats))
        counts["loaded_models"] = len(self.models.loaded_names())
        return counts

    # -- the workers ---------------------------------------------------------------------

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            self._run(job)

    def _next_job(self) -> Job | None:
        """The next runnable job, or None once the service is closed and drained."""
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return None
                job = self._queue.popleft()
                assert job.future is not None
                if job.future.set_running_or_notify_cancel():
                    self._running.append(job)
                    return job

    def _run(self, job: Job) -> None:
        started = time.monotonic()
        steps = expected_steps(job.request)
        job.progress = Progress(job.task_id, "running", 0, steps, started=started, model=job.model)
        outcome: ServiceResult | BaseException
        try:
            outcome = self._generate(job, started)
        except GenerationCancelled as exc:
            outcome = self._cancelled(job, exc)
        except Exception as exc:
            if not isinstance(exc, LatentRTError):
                logger.exception("task %s failed", job.task_id)
            outcome = exc
        with self._cond:
            self._running.remove(job)
            self._run_times.append(time.monotonic() - started)
        self._finish(job, outcome)

    def _generate(self, job: Job, started: float) -> ServiceResult:
        interrupted = False
        with self.models.lease(self.models.find(job.model)) as loaded, loaded.batcher.joined() as member:
            on_step = self._step_reporter(job, loaded.batcher, started)
            try:
                result = loaded.pipeline.generate(job.request, callback=on_step, cancel=job.cancel_event)
            except GenerationCancelled:
                loaded.batcher.done_sampling()
                if job.reason != "interrupted" or job.progress is None or job.progress.preview is None:
                    raise
                result, interrupted = _partial(loaded.pipeline, job.request, job.progress.preview), True
        assert job.progress is not None
        return ServiceResult(
            result=result,
            model=job.model,
            task_id=job.task_id,
            steps_done=job.progress.step,
            denoiser_calls=member.calls,
            shared_calls=member.shared_calls,
            queued_s=started - job.submitted,
            run_s=time.monotonic() - started,
            interrupted=interrupted,
        )

    def _step_reporter(self, job: Job, batcher: StepBatcher, started: float) -> Callable[[StepInfo], None]:
        steps = expected_steps(job.request)

        def on_step(info: StepInfo) -> None:
            step = min(info.i + 1, steps)
            if step >= steps:
                batcher.done_sampling()  # the others stop waiting for this request while it decodes
            sigma = float(info.sigma.max())
            job.progress = Progress(job.task_id, "running", step, steps, sigma, info.denoised, started, job.model)
            _notify(job)

        return on_step

    def _cancelled(self, job: Job, exc: GenerationCancelled) -> BaseException:
        step = job.progress.step if job.progress is not None else 0
        where = f"after step {step} of {expected_steps(job.request)}"
        if job.reason == "timeout":
            limit = self.config.timeout_s if job.deadline is None else job.deadline - job.submitted
            return RequestTimeout(f"{job.task_id} did not finish within {limit:.0f} s (stopped {where}); raise the "
                                  "timeout, or lower steps, size or batch")  # fmt: skip
        reason = job.reason or "cancelled"
        return RequestCancelled(f"{job.task_id} was {_REASONS.get(reason, reason)} {where}", reason)

    def _finish(self, job: Job, outcome: ServiceResult | BaseException) -> None:
        """Settle the job's future and count the outcome."""
        assert job.future is not None
        state, kind = outcome_kind(outcome)
        progress = job.progress or Progress(job.task_id, state, 0, expected_steps(job.request), model=job.model)
        job.progress = replace(progress, state=state)
        with self._cond:
            self._counts[kind] += 1
            task = self._tasks.get(job.task_id, [])
            if all(j.progress is not None and j.progress.state in _FINAL for j in task):
                self._tasks.pop(job.task_id, None)
        _notify(job)
        if isinstance(outcome, ServiceResult):
            logger.info(
                "%s done: %d steps in %.2f s (queued %.2f s), %d of %d denoiser calls shared with other requests",
                job.task_id, outcome.steps_done, outcome.run_s, outcome.queued_s, outcome.shared_calls,
                outcome.denoiser_calls,
            )  # fmt: skip
        with contextlib.suppress(InvalidStateError):  # the caller cancelled it meanwhile
            if isinstance(outcome, ServiceResult):
                job.future.set_result(outcome)
            else:
                job.future.set_exception(outcome)

    def _watch(self) -> None:
        """Time out queued and running jobs past their deadline (every 50 ms)."""
        while not self._stop_watch.wait(0.05):
            now = time.monotonic()
            with self._cond:
                late = [j for j in self._queue if j.deadline is not None and now > j.deadline]
                for job in late:
                    self._queue.remove(job)
                for job in self._running:
                    if job.deadline is not None and now > job.deadline:
                        job.stop("timeout")
            for job in late:
                job.reason = "timeout"
                self._finish(job, self._cancelled(job, GenerationCancelled("timeout")))

    def _forget_queued(self, job: Job) -> None:
        """Drop a job whose future was cancelled while it waited."""
        with self._cond:
            if job in self._queue:
                self._queue.remove(job)
                self._counts["cancelled"] += 1
            job.progress = Progress(job.task_id, "cancelled", 0, expected_steps(job.request), model=job.model)
            if all(j.progress is not None and j.progress.state in _FINAL for j in self._tasks.get(job.task_id, [])):
                self._tasks.pop(job.task_id, None)

    def _count(self, kind: str) -> None:
        with self._cond:
            self._counts[kind] += 1

    def _load(self, path: Path) -> Pipeline:
        return load(path, device=self.config.device, dtype=self.config.dtype, plugins=self.registry, progress=False)

    def _make_batcher(self) -> StepBatcher:
        config = self.config
        return StepBatcher(enabled=config.batching, max_rows=config.max_batch_rows, max_wait_s=config.batch_wait_s)


def _with_seed(request: GenerationRequest) -> GenerationRequest:
    """``request`` with a random seed drawn now, so progress, results and interrupts all know it."""
    return request if request.seed != -1 else replace(request, seed=resolve_seed(-1))


def _partial(pipeline: Pipeline, request: GenerationRequest, preview: torch.Tensor) -> GenerationResult:
    """The images an interrupted request returns: its latest ``x0`` estimate, decoded."""
    with torch.inference_mode():
        images = tensor_to_images(decode_finite(pipeline.model.vae, preview))
    texts = [pipeline.parameters_text(request, k) for k in range(request.batch_size)]
    return GenerationResult(images, texts, [request.seed + k for k in range(request.batch_size)], preview)


def _notify(job: Job) -> None:
    """Send the job's progress to its listener; a failing listener is logged, never fatal."""
    if job.on_progress is None or job.progress is None:
        return
    try:
        job.on_progress(job.progress)
    except Exception:
        logger.exception("the progress callback of %s failed", job.task_id)
