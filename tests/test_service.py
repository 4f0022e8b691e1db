"""GenerationService: batching equal to solo runs, queue limits, cancellation, timeouts, progress, shutdown."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import latentrt
from latentrt import GenerationRequest, Pipeline
from latentrt.core.loader import builtin_checkpoint
from latentrt.core.parameters import parse_parameters
from latentrt.service import (
    GenerationService,
    InvalidField,
    Progress,
    RequestCancelled,
    RequestLimits,
    RequestTimeout,
    ServiceBusy,
    ServiceClosed,
    ServiceConfig,
)
from latentrt.service.models import model_bytes

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = (
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow circle in the top left",
    "a small red square",
    "a big blue circle",
    "a purple triangle",
    "an orange square at the bottom",
)


@pytest.fixture(scope="module")
def demo() -> Pipeline:
    """The built-in demo model, loaded once for the module."""
    return latentrt.load("demo", progress=False)


@pytest.fixture
def make_service(demo: Pipeline) -> Iterator[Callable[..., GenerationService]]:
    """Services over the demo pipeline, shut down after the test."""
    made: list[GenerationService] = []

    def make(**config: object) -> GenerationService:
        options: dict[str, object] = {"batch_wait_s": 0.05, **config}
        service = GenerationService({"demo": demo}, config=ServiceConfig(**options))  # type: ignore[arg-type]
        made.append(service)
        return service

    yield make
    for service in made:
        service.shutdown(cancel=True, timeout=30)


def request(k: int, **options: object) -> GenerationRequest:
    """Request ``k`` of a set with different prompts, seeds and CFG scales."""
    fields: dict[str, object] = {"steps": 4, "seed": 100 + k, "cfg_scale": 3.0 + k, "sampler": "dpmpp_2m"}
    fields.update(options)
    return GenerationRequest(PROMPTS[k % len(PROMPTS)], **fields)  # type: ignore[arg-type]


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def blocking_progress(release: threading.Event, started: threading.Event) -> Callable[[Progress], None]:
    """A progress listener that holds its worker after the first step until ``release`` is set."""

    def on_progress(event: Progress) -> None:
        if event.state == "running" and event.step >= 1:
            started.set()
            release.wait(30)

    return on_progress


def test_eight_concurrent_requests_match_sequential_runs_and_share_backbone_calls(
    demo: Pipeline, make_service: Callable[..., GenerationService]
) -> None:
    requests = [request(k) for k in range(8)]
    sequential = [demo.generate(r) for r in requests]
    service = make_service(workers=8)
    futures = [service.submit(r) for r in requests]
    results = [f.result(timeout=120) for f in futures]
    for solo, batched in zip(sequential, results, strict=True):
        diff = np.abs(pixels(solo.images[0]) - pixels(batched.images[0]))
        assert diff.max() <= 1, "stacked rows may differ from solo rows by float rounding only"
        assert batched.parameters == solo.parameters
        assert batched.seeds == solo.seeds
    metrics = service.metrics()
    assert metrics["shared_calls"] >= 1
    assert metrics["backbone_calls"] < metrics["request_calls"] == 8 * 4
    assert metrics["max_requests_per_call"] >= 4
    assert sum(r.shared_calls for r in results) == metrics["stacked_request_calls"]


def test_a_request_alone_is_bit_identical_to_the_pipeline(
    demo: Pipeline, make_service: Callable[..., GenerationService]
) -> None:
    solo = demo.generate(request(0, sampler="euler_ancestral", batch_size=2))
    result = make_service().submit(request(0, sampler="euler_ancestral", batch_size=2)).result(timeout=60)
    assert torch.equal(result.result.latents, solo.latents)
    assert result.shared_calls == 0 and result.denoiser_calls == 4


def test_batching_off_gives_solo_results_without_shared_calls(
    demo: Pipeline, make_service: Callable[..., GenerationService]
) -> None:
    service = make_service(workers=4, batching=False)
    results = [f.result(timeout=120) for f in [service.submit(request(k)) for k in range(4)]]
    for k, result in enumerate(results):
        assert torch.equal(result.result.latents, demo.generate(request(k)).latents)
    assert service.metrics()["shared_calls"] == 0


def test_requests_of_other_sizes_samplers_and_steps_run_together_correctly(
    demo: Pipeline, make_service: Callable[..., GenerationService]
) -> None:
    requests = [
        request(0, width=64, height=64),
        request(1, width=32, height=48, sampler="heun"),
        request(2, steps=6, sampler="euler_ancestral"),
        request(3, batch_size=2, scheduler="karras"),
        request(4, cfg_scale=1.0),
    ]
    service = make_service(workers=5)
    results = [f.result(timeout=120) for f in [service.submit(r) for r in requests]]
    for req, result in zip(requests, results, strict=True):
        solo = demo.generate(req)
        for a, b in zip(solo.images, result.images, strict=True):
            assert a.size == b.size
            assert np.abs(pixels(a) - pixels(b)).max() <= 1


def test_full_queue_is_refused_with_service_busy(make_service: Callable[..., GenerationService]) -> None:
    release, started = threading.Event(), threading.Event()
    service = make_service(workers=1, max_queue=1)
    running = service.submit(request(0), on_progress=blocking_progress(release, started))
    assert started.wait(120)
    queued = service.submit(request(1))
    with pytest.raises(ServiceBusy, match="queue is full") as busy:
        service.submit(request(2))
    assert busy.value.retry_after >= 1
    release.set()
    assert running.result(timeout=60).images and queued.result(timeout=60).images
    assert service.metrics()["rejected_busy"] == 1


def test_cancel_queued_and_running_requests(make_service: Callable[..., GenerationService]) -> None:
    release, started = threading.Event(), threading.Event()
    service = make_service(workers=1)
    running = service.submit(request(0, steps=8), on_progress=blocking_progress(release, started))
    assert started.wait(120)
    queued = service.submit(request(1))
    assert queued.cancel() and queued.cancelled()
    assert running.cancel()
    release.set()
    with pytest.raises(RequestCancelled, match="cancelled after step 1 of 8") as cancelled:
        running.result(timeout=60)
    assert cancelled.value.reason == "cancelled"
    assert running.progress().state == "cancelled"
    assert service.submit(request(2)).result(timeout=60).images, "the worker serves the next request"
    assert service.metrics()["cancelled"] == 2


def test_cancel_by_task_id_covers_all_its_requests(make_service: Callable[..., GenerationService]) -> None:
    release, started = threading.Event(), threading.Event()
    service = make_service(workers=1)
    futures = service.submit_many(
        [request(0, steps=8), request(1)], task_id="task-x", on_progress=blocking_progress(release, started)
    )
    assert started.wait(120)
    assert service.cancel("task-x") == 2
    release.set()
    for future in futures:
        with pytest.raises(RequestCancelled):
            future.result(timeout=60)
    assert service.progress("task-x") is None


def test_timeouts_of_running_and_queued_requests(make_service: Callable[..., GenerationService]) -> None:
    release, started = threading.Event(), threading.Event()
    service = make_service(workers=1)
    running = service.submit(request(0, steps=8), timeout=0.5, on_progress=blocking_progress(release, started))
    assert started.wait(120)
    queued = service.submit(request(1), timeout=0.3)
    with pytest.raises(RequestTimeout, match="did not finish within"):
        queued.result(timeout=30)
    threading.Timer(0.6, release.set).start()
    with pytest.raises(RequestTimeout, match=r"stopped after step \d of 8"):
        running.result(timeout=30)
    assert service.metrics()["timed_out"] == 2


def test_progress_events_carry_steps_and_preview_latents(make_service: Callable[..., GenerationService]) -> None:
    events: list[Progress] = []
    service = make_service()
    future = service.submit(request(0, steps=5, batch_size=2), on_progress=events.append)
    result = future.result(timeout=60)
    running = [e for e in events if e.state == "running" and e.preview is not None]
    assert [e.step for e in running] == [1, 2, 3, 4, 5]
    assert all(e.steps == 5 and e.preview is not None and e.preview.shape[0] == 2 for e in running)
    assert events[-1].state == "done" and future.progress().state == "done"
    assert service.preview_images(running[-1])[0].size == result.images[0].size
    assert running[-1].sigma is not None and running[0].eta_s() is not None


def test_img2img_progress_counts_the_steps_strength_leaves(
    demo: Pipeline, make_service: Callable[..., GenerationService]
) -> None:
    init = demo.generate(request(0)).images[0]
    events: list[Progress] = []
    make_service().submit(request(1, steps=8, init_image=init, strength=0.5), on_progress=events.append).result(60)
    assert max(e.step for e in events) == 4 and events[-1].steps == 4


def test_interrupt_returns_the_image_as_it_stands(make_service: Callable[..., GenerationService]) -> None:
    release, started = threading.Event(), threading.Event()
    service = make_service(workers=1)
    future = service.submit(request(0, steps=10, seed=7), on_progress=blocking_progress(release, started))
    assert started.wait(120)
    assert service.interrupt() == 1
    release.set()
    result = future.result(timeout=60)
    assert result.interrupted and result.steps_done < 10
    assert result.images[0].size == (64, 64)
    assert parse_parameters(result.parameters[0]).settings["Seed"] == "7"


def test_invalid_requests_are_refused_before_they_queue(
    demo: Pipeline, make_service: Callable[..., GenerationService]
) -> None:
    service = make_service(limits=RequestLimits(max_width=128, max_height=128, max_steps=20))
    init = Image.new("RGB", (64, 64))
    cases = {
        "width": request(0, width=65),
        "height": request(0, height=256),
        "steps": request(0, steps=21),
        "sampler": request(0, sampler="eular"),
        "scheduler": request(0, scheduler="karas"),
        "mask": request(0, init_image=init, mask=Image.new("L", (32, 32))),
        "strength": request(0, init_image=init, strength=0.1),
        "seed": request(0, seed=-2),
        "prompt": replace(request(0), prompt="bad \ud800 text"),
        "sampler_options": request(0, sampler_options={"eta": 0.5}),
    }
    for field, bad in cases.items():
        with pytest.raises(InvalidField) as error:
            service.submit(bad)
        assert error.value.field == field, (field, str(error.value))
    with pytest.raises(InvalidField, match="did you mean 'euler'"):
        service.submit(request(0, sampler="eular"))
    with pytest.raises(InvalidField, match="unknown model 'nope'"):
        service.submit(request(0), model="nope")
    assert service.metrics().get("submitted", 0) == 0


def test_a_failing_request_does_not_wedge_the_worker(
    demo: Pipeline, make_service: Callable[..., GenerationService]
) -> None:
    class Broken(RuntimeError):
        pass

    def explode(x: torch.Tensor, sigma: torch.Tensor, cond: object) -> torch.Tensor:
        raise Broken("backbone failed")

    class BrokenDenoiser:
        model_sampling = demo.model.denoiser.model_sampling

        def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: object) -> torch.Tensor:
            return explode(x, sigma, cond)

    broken = Pipeline(replace(demo.model, denoiser=BrokenDenoiser()), progress=False)
    service = GenerationService({"demo": demo, "broken": broken}, config=ServiceConfig(workers=1))
    try:
        with pytest.raises(Broken):
            service.submit(request(0), model="broken").result(timeout=60)
        assert service.submit(request(0), model="demo").result(timeout=60).images
        assert service.metrics()["failed"] == 1
    finally:
        service.shutdown()


def test_shutdown_finishes_work_or_cancels_it(make_service: Callable[..., GenerationService]) -> None:
    service = make_service(workers=1)
    futures = [service.submit(request(k)) for k in range(3)]
    service.shutdown()
    assert all(f.result(timeout=0).images for f in futures)
    with pytest.raises(ServiceClosed):
        service.submit(request(0))

    release, started = threading.Event(), threading.Event()
    service = make_service(workers=1)
    running = service.submit(request(0, steps=8), on_progress=blocking_progress(release, started))
    assert started.wait(120)
    queued = service.submit(request(1))
    threading.Timer(0.3, release.set).start()
    service.shutdown(cancel=True)
    for future in (running, queued):
        with pytest.raises(RequestCancelled) as cancelled:
            future.result(timeout=0)
        assert cancelled.value.reason == "shutdown"


def test_asyncio_generate_and_cancellation(make_service: Callable[..., GenerationService]) -> None:
    service = make_service(workers=1)

    async def scenario() -> None:
        result = await service.generate(request(0))
        assert result.images[0].size == (64, 64)
        release, started = threading.Event(), threading.Event()
        task = asyncio.ensure_future(
            service.generate(request(1, steps=8), on_progress=blocking_progress(release, started))
        )
        await asyncio.to_thread(started.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()

    asyncio.run(scenario())
    assert service.submit(request(2)).result(timeout=60).images
    assert service.metrics()["cancelled"] == 1


def test_models_are_loaded_on_demand_and_evicted_least_recently_used(demo: Pipeline) -> None:
    loads: list[Path] = []

    def loader(path: Path) -> Pipeline:
        loads.append(path)
        return latentrt.load(path, progress=False)

    path = builtin_checkpoint("demo", latentrt.registry())
    config = ServiceConfig(workers=2, max_loaded_models=1)
    with GenerationService({"a": path, "b": path}, config=config, loader=loader) as service:
        assert service.models.loaded_names() == []
        service.submit(request(0), model="a").result(timeout=60)
        service.submit(request(0), model="b").result(timeout=60)
        assert service.models.loaded_names() == ["b"]
        service.submit(request(0), model="a").result(timeout=60)
        assert len(loads) == 3
        assert service.models.find("a").matches("a") and service.models.find(path.name).name == "a"
        assert service.metrics()["backbone_calls"] == 12, "counters survive eviction"
    assert model_bytes(demo) > 1_000_000
    budget = ServiceConfig(max_loaded_models=2, max_loaded_bytes=model_bytes(demo) + 1)
    with GenerationService({"a": path, "b": path}, config=budget) as service:
        service.submit(request(0), model="a").result(timeout=60)
        service.submit(request(0), model="b").result(timeout=60)
        assert service.models.loaded_names() == ["b"], "the byte budget holds one model"
