"""Step-by-step batching: the denoiser calls of concurrent requests stacked into one backbone call.

Each request runs its own sampler, in its own worker thread, through an unchanged
:class:`~latentrt.core.pipeline.Pipeline` whose model denoiser is wrapped in a
:class:`BatchedDenoiser`. Its calls meet at a :class:`StepBatcher`, which waits until
every request that is sampling has made its call, then concatenates them along the batch
(latents, per-row sigmas, conditionings) into one call of the wrapped denoiser and hands
each request its own rows back. Prompts, seeds, noise, CFG scales and sampler state stay
with each request: only the backbone call is shared.

The denoiser contract gives every row its own sigma (``[batch]``), so a request that
arrives while others are mid-run stacks with them from its first step (continuous
batching); requests with the same size, sampler, schedule and step count simply stay in
step for the whole run. Calls whose tensors differ in shape (another size, prompts of
another chunk count, another model) run as separate backbone calls of the same round.

Equality with a solo run: a call made by one request alone is passed through untouched,
so a request that runs alone is bit-identical to ``Pipeline.generate``. Stacked, the
backbone sees a larger batch, and CPU GEMM/convolution kernels block the work differently
per batch size, so float sums associate differently: the demo model's ``x0`` moves by
about 1e-5, and the decoded images agree with solo runs within 1/255 per channel
(measured by ``tests/test_service.py``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

from latentrt.core.pipeline import Pipeline
from latentrt.core.protocols import Conditioning, Denoiser, ModelSampling

__all__ = ["BatchStats", "BatchedDenoiser", "Member", "StepBatcher", "batched_pipeline"]

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Member:
    """One request taking part in a :class:`StepBatcher`, with its own call counts."""

    sampling: bool = False
    calls: int = 0
    shared_calls: int = 0


@dataclass
class BatchStats:
    """Counters of a :class:`StepBatcher` since it was made."""

    backbone_calls: int = 0  # calls of the wrapped denoiser
    request_calls: int = 0  # denoiser calls made by requests
    shared_calls: int = 0  # backbone calls that served more than one request
    stacked_request_calls: int = 0  # request calls that ran inside a shared backbone call
    max_requests_per_call: int = 0
    rows: int = 0  # latent rows through the backbone (CFG doubles a request's rows)

    def plus(self, other: BatchStats) -> BatchStats:
        """Counters of both (the maximum of ``max_requests_per_call``)."""
        summed = {f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        summed["max_requests_per_call"] = max(self.max_requests_per_call, other.max_requests_per_call)
        return BatchStats(**summed)


@dataclass(eq=False)
class _Call:
    """A denoiser call waiting for its turn."""

    inner: Denoiser
    x: Tensor
    sigma: Tensor
    cond: Conditioning | None
    member: Member
    arrived: float
    output: Tensor | None = None
    error: BaseException | None = None
    done: bool = False

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])


def _signature(call: _Call) -> tuple[object, ...]:
    """Calls with equal signatures can be concatenated along the batch."""
    tensors = () if call.cond is None else tuple(call.cond.tensors().items())
    cond = tuple((name, tuple(t.shape[1:]), t.dtype, t.device) for name, t in tensors)
    x = call.x
    return (id(call.inner), tuple(x.shape[1:]), x.dtype, x.device, call.sigma.dtype, call.cond is None, cond)


def _chunks(calls: list[_Call], max_rows: int) -> list[list[_Call]]:
    """Calls grouped by signature (arrival order kept), each group cut to at most ``max_rows`` rows."""
    groups: dict[tuple[object, ...], list[list[_Call]]] = {}
    for call in calls:
        chunks = groups.setdefault(_signature(call), [[]])
        if chunks[-1] and sum(c.rows for c in chunks[-1]) + call.rows > max_rows:
            chunks.append([])
        chunks[-1].append(call)
    return [chunk for chunks in groups.values() for chunk in chunks]


@dataclass(eq=False)
class StepBatcher:
    """The rendezvous where requests' denoiser calls are stacked (see the module docstring).

    A round fires when every sampling member has a call waiting, or when the oldest call has
    waited ``max_wait_s`` (so a member held up elsewhere, e.g. by a slow progress callback,
    delays the others by at most that). ``enabled=False`` passes every call straight through.
    """

    enabled: bool = True
    max_rows: int = 64
    max_wait_s: float = 0.2
    stats: BatchStats = field(default_factory=BatchStats)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._local = threading.local()
        self._members: set[Member] = set()
        self._waiting: list[_Call] = []
        self._executing = False

    @contextmanager
    def joined(self) -> Iterator[Member]:
        """Make the current thread a member for the duration of the block (one request's run)."""
        member = Member()
        self._local.member = member
        with self._cond:
            self._members.add(member)
        try:
            yield member
        finally:
            self._local.member = None
            with self._cond:
                self._members.discard(member)
                self._cond.notify_all()

    def done_sampling(self) -> None:
        """The current thread's request made its last step: the others stop waiting for it."""
        member: Member | None = getattr(self._local, "member", None)
        if member is None:
            return
        with self._cond:
            member.sampling = False
            self._cond.notify_all()

    def call(self, inner: Denoiser, x: Tensor, sigma: Tensor, cond: Conditioning | None) -> Tensor:
        """``inner(x, sigma, cond)``, stacked with the other members' calls of this round."""
        member: Member | None = getattr(self._local, "member", None)
        if member is None or not self.enabled:
            with self._cond:
                self._count([_Call(inner, x, sigma, cond, member or Member(), 0.0)])
            return inner(x, sigma, cond)
        call = _Call(inner, x, sigma, cond, member, time.monotonic())
        with self._cond:
            member.sampling = True
            self._waiting.append(call)
            batch = self._wait_or_lead(call)
        if batch is not None:
            self._execute(batch)
        if call.error is not None:
            raise call.error
        assert call.output is not None
        return call.output

    def snapshot(self) -> BatchStats:
        """A copy of the counters."""
        with self._cond:
            return replace(self.stats)

    def _wait_or_lead(self, call: _Call) -> list[_Call] | None:
        """Under the lock: wait until ``call`` is done, or return the round this thread must run."""
        while not call.done:
            now = time.monotonic()
            if not self._executing and self._ready(now):
                batch, self._waiting = self._waiting, []
                self._executing = True
                return batch
            self._cond.wait(self._wait_time(now))
        return None

    def _ready(self, now: float) -> bool:
        if not self._waiting:
            return False
        sampling = sum(1 for m in self._members if m.sampling)
        return len(self._waiting) >= sampling or now - self._waiting[0].arrived >= self.max_wait_s

    def _wait_time(self, now: float) -> float | None:
        if not self._waiting:
            return None
        return max(0.001, self._waiting[0].arrived + self.max_wait_s - now)

    def _execute(self, batch: list[_Call]) -> None:
        """Run a round's calls (outside the lock), one backbone call per compatible chunk."""
        try:
            for chunk in _chunks(batch, self.max_rows):
                self._run_chunk(chunk)
                with self._cond:
                    self._count(chunk)
                    for call in chunk:
                        call.done = True
                    self._cond.notify_all()
        finally:
            with self._cond:
                for call in batch:
                    if not call.done:
                        call.error = call.error or RuntimeError("the batched denoiser call was abandoned")
                        call.done = True
                self._executing = False
                self._cond.notify_all()

    def _run_chunk(self, chunk: list[_Call]) -> None:
        """One backbone call for ``chunk``; a lone call runs on its own tensors, untouched."""
        try:
            with torch.inference_mode():
                if len(chunk) == 1:
                    only = chunk[0]
                    only.output = only.inner(only.x, only.sigma, only.cond)
                    return
                out = chunk[0].inner(*_stack(chunk))
            for call, rows in zip(chunk, torch.split(out, [c.rows for c in chunk]), strict=True):
                call.output = rows
            logger.debug("stacked %d requests (%d rows) into one backbone call", len(chunk), out.shape[0])
        except Exception as exc:  # every member of the chunk sees the failure in its own thread
            for call in chunk:
                call.error = exc

    def _count(self, chunk: list[_Call]) -> None:
        """Update the counters for one backbone call (under the lock)."""
        requests = len({id(c.member) for c in chunk})
        stats = self.stats
        stats.backbone_calls += 1
        stats.request_calls += len(chunk)
        stats.rows += sum(c.rows for c in chunk)
        stats.max_requests_per_call = max(stats.max_requests_per_call, requests)
        if requests > 1:
            stats.shared_calls += 1
            stats.stacked_request_calls += len(chunk)
        for call in chunk:
            call.member.calls += 1
            call.member.shared_calls += int(requests > 1)


def _stack(chunk: list[_Call]) -> tuple[Tensor, Tensor, Conditioning | None]:
    """Latents, sigmas and conditionings of ``chunk`` concatenated along the batch."""
    x = torch.cat([c.x for c in chunk])
    sigma = torch.cat([c.sigma for c in chunk])
    conds = [c.cond for c in chunk if c.cond is not None]
    return x, sigma, Conditioning.cat(conds) if conds else None


@dataclass(eq=False)
class BatchedDenoiser:
    """A denoiser whose calls go through a :class:`StepBatcher`."""

    inner: Denoiser
    batcher: StepBatcher

    @property
    def model_sampling(self) -> ModelSampling:
        """The wrapped denoiser's model sampling."""
        return self.inner.model_sampling

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning | None) -> Tensor:
        """``inner(x, sigma, cond)``, stacked with concurrent requests' calls."""
        return self.batcher.call(self.inner, x, sigma, cond)


def batched_pipeline(pipeline: Pipeline, batcher: StepBatcher) -> Pipeline:
    """A pipeline sharing ``pipeline``'s model, whose denoiser (and refiner's) calls go through ``batcher``."""
    model = replace(pipeline.model, denoiser=BatchedDenoiser(pipeline.model.denoiser, batcher))
    refiner = pipeline.refiner
    if refiner is not None:
        refiner = replace(refiner, denoiser=BatchedDenoiser(refiner.denoiser, batcher))
    return Pipeline(model, pipeline.registry, progress=False, refiner=refiner)
