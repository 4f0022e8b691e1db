"""The A1111 HTTP API in-process (FastAPI's TestClient): shapes, validation, options, progress, auth, errors."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

import latentrt
from latentrt import GenerationRequest, Pipeline
from latentrt.cli import build_parser
from latentrt.cli_serve import _is_loopback
from latentrt.core.parameters import parse_parameters
from latentrt.server import create_app
from latentrt.service import GenerationService, Progress, RequestLimits, ServiceConfig

pytestmark = pytest.mark.usefixtures("one_thread")

JSON = {"content-type": "application/json"}
SMALL = {"prompt": "a red circle", "steps": 3, "width": 64, "height": 64, "seed": 11, "cfg_scale": 5}


@pytest.fixture(scope="module")
def demo() -> Pipeline:
    """The demo model, loaded once for the module."""
    return latentrt.load("demo", progress=False)


@pytest.fixture
def make_client(demo: Pipeline) -> Iterator[Callable[..., tuple[TestClient, GenerationService]]]:
    """A TestClient over a fresh service (``**config`` for ServiceConfig, ``api_key``), closed after the test."""
    stack: list[TestClient] = []

    def make(api_key: str | None = None, **config: Any) -> tuple[TestClient, GenerationService]:
        limits = RequestLimits(max_width=256, max_height=256, max_steps=30, max_batch_size=4)
        models = {"latentrt-demo": demo, "slow": slow(demo)}
        service = GenerationService(models, config=ServiceConfig(**{"limits": limits, **config}))
        client = TestClient(create_app(service, api_key=api_key, max_body_bytes=1 << 20))
        client.__enter__()
        stack.append(client)
        return client, service

    yield make
    for client in stack:
        client.__exit__(None, None, None)


@dataclass
class SlowDenoiser:
    """The demo's denoiser, 0.2 s slower per call: requests stay running long enough to watch and interrupt."""

    inner: Any

    @property
    def model_sampling(self) -> Any:
        return self.inner.model_sampling

    def __call__(self, x: Any, sigma: Any, cond: Any) -> Any:
        time.sleep(0.2)
        return self.inner(x, sigma, cond)


def slow(demo: Pipeline) -> Pipeline:
    return Pipeline(replace(demo.model, denoiser=SlowDenoiser(demo.model.denoiser)), progress=False)


def png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def hold_worker(service: GenerationService) -> tuple[threading.Event, Any]:
    """Occupy the service's only worker until the returned event is set."""
    release, started = threading.Event(), threading.Event()

    def on_progress(event: Progress) -> None:
        if event.state == "running" and event.step >= 1:
            started.set()
            release.wait(30)

    request = GenerationRequest("a blue square", steps=3, seed=1)
    future = service.submit(request, on_progress=on_progress, timeout=600)  # not the service's (short) default
    assert started.wait(120)
    return release, future


def wait_until(condition: Callable[[], bool], timeout: float = 60) -> None:
    """Poll ``condition`` until it holds (the machine may be busy: no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


def errors(response: Any) -> dict[str, str]:
    """422 details as {field: message}."""
    assert response.status_code == 422, response.text
    return {str(e["loc"][-1]): e["msg"] for e in response.json()["detail"]}


def test_txt2img_answers_in_a1111_shape(make_client: Callable[..., tuple[TestClient, GenerationService]]) -> None:
    client, _ = make_client()
    body = {**SMALL, "sampler_name": "DPM++ 2M Karras", "batch_size": 2, "n_iter": 2, "restore_faces": True, "foo": 1}
    response = client.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    info = json.loads(data["info"])
    assert len(data["images"]) == 4 and info["all_seeds"] == [11, 12, 13, 14]
    assert info["sampler_name"] == "DPM++ 2M" and info["extra_generation_params"] == {"Schedule type": "Karras"}
    assert info["sd_model_name"] == "latentrt-demo" and info["ignored_fields"] == ["foo"]
    assert any(w.startswith("restore_faces") for w in info["warnings"])
    assert any("ignored unknown fields: foo" in w for w in info["warnings"])
    assert data["parameters"]["prompt"] == "a red circle" and data["parameters"]["foo"] == 1
    for k, image_data in enumerate(data["images"]):
        image = png(image_data)
        params = parse_parameters(image.info["parameters"])
        assert image.size == (64, 64) and params.prompt == "a red circle"
        assert params.settings["Seed"] == str(11 + k) and params.settings["Sampler"] == "DPM++ 2M"
        assert params.settings["Schedule type"] == "Karras" and params.settings["Steps"] == "3"
        assert info["infotexts"][k] == image.info["parameters"]


def test_txt2img_images_equal_the_pipeline(
    demo: Pipeline, make_client: Callable[..., tuple[TestClient, GenerationService]]
) -> None:
    client, _ = make_client()
    data = client.post("/sdapi/v1/txt2img", json={**SMALL, "sampler_name": "Euler a", "scheduler": "Automatic"}).json()
    expected = demo(SMALL["prompt"], steps=3, seed=11, cfg_scale=5, sampler="euler_ancestral", width=64, height=64)
    assert png(data["images"][0]).tobytes() == expected.images[0].tobytes()
    assert png(data["images"][0]).info["parameters"] == expected.parameters[0]


def test_img2img_with_mask_and_several_init_images(
    make_client: Callable[..., tuple[TestClient, GenerationService]],
) -> None:
    client, _ = make_client()
    first = client.post("/sdapi/v1/txt2img", json={**SMALL, "batch_size": 2}).json()["images"]
    mask = Image.new("L", (64, 64))
    mask.paste(255, (16, 16, 48, 48))
    body = {**SMALL, "init_images": first, "mask": b64(mask), "denoising_strength": 0.6, "steps": 5, "batch_size": 3}
    response = client.post("/sdapi/v1/img2img", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    info = json.loads(data["info"])
    assert len(data["images"]) == 3 and info["all_seeds"] == [11, 12, 13] and info["denoising_strength"] == 0.6
    assert any(w.startswith("inpaint_full_res") for w in info["warnings"])
    assert data["parameters"]["init_images"] is None, "echoed only with include_init_images"
    params = parse_parameters(png(data["images"][0]).info["parameters"])
    assert params.settings["Denoising strength"] == "0.6"


def test_invalid_requests_get_422_naming_the_field(
    make_client: Callable[..., tuple[TestClient, GenerationService]],
) -> None:
    client, service = make_client()
    post = client.post
    assert "multiple of 8" in errors(post("/sdapi/v1/txt2img", json={**SMALL, "width": 65}))["width"]
    assert "less than or equal to 30" in errors(post("/sdapi/v1/txt2img", json={**SMALL, "steps": 31}))["steps"]
    assert (
        "did you mean 'euler'"
        in errors(post("/sdapi/v1/txt2img", json={**SMALL, "sampler_name": "eular"}))["sampler_name"]
    )
    assert "karras" in errors(post("/sdapi/v1/txt2img", json={**SMALL, "scheduler": "karas"}))["scheduler"]
    assert "steps" in errors(post("/sdapi/v1/txt2img", json={**SMALL, "steps": "many"}))
    assert "less than or equal to 16" in errors(post("/sdapi/v1/txt2img", json={**SMALL, "n_iter": 17}))["n_iter"]
    assert (
        "unknown model"
        in errors(post("/sdapi/v1/txt2img", json={**SMALL, "override_settings": {"sd_model_checkpoint": "sd15"}}))[
            "override_settings"
        ]
    )
    assert (
        "passes 2**32-1"
        in errors(post("/sdapi/v1/txt2img", json={**SMALL, "seed": 2**32 - 1, "batch_size": 2}))["seed"]
    )
    assert "base64" in errors(post("/sdapi/v1/img2img", json={**SMALL, "init_images": ["%%%"]}))["init_images[0]"]
    not_image = base64.b64encode(b"hello").decode()
    assert (
        "not a readable image" in errors(post("/sdapi/v1/img2img", json={"init_images": [not_image]}))["init_images[0]"]
    )
    assert "needs init_images" in errors(post("/sdapi/v1/img2img", json=SMALL))["init_images"]
    image = b64(Image.new("RGB", (64, 64)))
    small_mask = b64(Image.new("L", (32, 32)))
    assert (
        "resize it"
        in errors(post("/sdapi/v1/img2img", json={**SMALL, "init_images": [image], "mask": small_mask}))["mask"]
    )
    assert errors(post("/sdapi/v1/txt2img", content=b"{not json", headers={"content-type": "application/json"}))
    for surrogate in ({"prompt": "bad \ud800"}, {"sampler_name": "\udfff"}, {"styles": ["\ud800"]}):
        raw = json.dumps({**SMALL, **surrogate}).encode()  # lone surrogates, escaped as JSON allows
        assert "lone surrogate" in str(errors(post("/sdapi/v1/txt2img", content=raw, headers=JSON)))
    raw = json.dumps({"sd_vae": "\ud800"}).encode()
    assert "lone surrogate" in errors(post("/sdapi/v1/options", content=raw, headers=JSON))["options"]
    assert service.metrics().get("submitted", 0) == 0
    assert post("/sdapi/v1/txt2img", json=SMALL).status_code == 200, "the service still works"


def test_lists_options_and_switching_model(
    demo: Pipeline, make_client: Callable[..., tuple[TestClient, GenerationService]]
) -> None:
    client, _ = make_client()
    samplers = client.get("/sdapi/v1/samplers").json()
    assert {"name": "Euler a", "aliases": ["euler_ancestral", "k_euler_a", "k_euler_ancestral"]}.items() <= samplers[
        1
    ].items()
    schedulers = {s["name"]: s for s in client.get("/sdapi/v1/schedulers").json()}
    assert schedulers["automatic"]["label"] == "Automatic" and schedulers["karras"]["default_rho"] == 7.0
    model, slow_model = client.get("/sdapi/v1/sd-models").json()
    assert slow_model["title"] == f"slow [{demo.model.model_hash()}]" and slow_model["filename"] == "slow"
    assert model["model_name"] == "latentrt-demo" and model["hash"] == demo.model.model_hash()
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == model["title"]
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": slow_model["title"]}).status_code == 200
    assert client.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == slow_model["title"]
    assert json.loads(client.post("/sdapi/v1/txt2img", json=SMALL).json()["info"])["sd_model_name"] == "slow"
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "latentrt-demo"}).status_code == 200
    assert (
        "unknown model"
        in errors(client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "nope"}))["sd_model_checkpoint"]
    )
    assert (
        "1..12"
        in errors(client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 0}))["CLIP_stop_at_last_layers"]
    )
    assert (
        client.post("/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 2, "show_progressbar": False}).json() is None
    )
    options = client.get("/sdapi/v1/options").json()
    assert options["CLIP_stop_at_last_layers"] == 2 and options["show_progressbar"] is False
    data = client.post("/sdapi/v1/txt2img", json=SMALL).json()
    assert parse_parameters(png(data["images"][0]).info["parameters"]).settings["Clip skip"] == "2"
    assert client.get("/sdapi/v1/scripts").json() == {"txt2img": [], "img2img": []}


def test_progress_interrupt_and_png_info(make_client: Callable[..., tuple[TestClient, GenerationService]]) -> None:
    client, service = make_client(workers=1)
    idle = client.get("/sdapi/v1/progress").json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    release, held = hold_worker(service)
    body = {**SMALL, "steps": 8, "force_task_id": "t1", "override_settings": {"sd_model_checkpoint": "slow"}}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/sdapi/v1/txt2img", json=body)
        wait_until(lambda: service.metrics()["queued"] == 1)
        queued = client.get("/sdapi/v1/progress", params={"id_task": "t1"}).json()
        assert queued["current_task"] == "t1" and queued["state"]["job_count"] == 2
        release.set()
        held.result(timeout=60)
        progress = _wait_for_step(client, "t1")
        assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 8
        assert png(progress["current_image"]).size == (64, 64)
        assert client.post("/sdapi/v1/interrupt").json() == {"interrupted": 1}
        response = pending.result(timeout=60)
    assert response.status_code == 200
    info = json.loads(response.json()["info"])
    assert info["id_task"] == "t1" and info["interrupted"] is True and info["sd_model_name"] == "slow"
    (image,) = response.json()["images"]
    png_info = client.post("/sdapi/v1/png-info", json={"image": image}).json()
    assert png_info["parameters"]["Prompt"] == "a red circle" and png_info["parameters"]["Steps"] == "8"
    plain = client.post("/sdapi/v1/png-info", json={"image": b64(Image.new("RGB", (8, 8)))}).json()
    assert plain == {"info": "", "items": {}, "parameters": {}}


def _wait_for_step(client: TestClient, task: str) -> dict[str, Any]:
    for _ in range(200):
        progress: dict[str, Any] = client.get("/sdapi/v1/progress", params={"id_task": task}).json()
        if progress["state"]["sampling_step"] >= 1 or progress["current_task"] is None:
            return progress
        time.sleep(0.02)
    raise AssertionError("the task made no step")


def test_busy_timeout_and_cancel(make_client: Callable[..., tuple[TestClient, GenerationService]]) -> None:
    client, service = make_client(workers=1, max_queue=1)
    release, held = hold_worker(service)
    with ThreadPoolExecutor(2) as pool:
        pending = pool.submit(client.post, "/sdapi/v1/txt2img", json={**SMALL, "force_task_id": "c1"})
        wait_until(lambda: service.metrics()["queued"] == 1)
        busy = client.post("/sdapi/v1/txt2img", json=SMALL)
        assert busy.status_code == 503 and int(busy.headers["Retry-After"]) >= 1
        assert "queue is full" in busy.json()["detail"]
        assert client.post("/latentrt/v1/tasks/c1/cancel").json() == {"cancelled": 1}
        assert client.post("/latentrt/v1/tasks/c1/cancel").status_code == 404
        cancelled = pending.result(timeout=60)
    assert cancelled.status_code == 409 and "cancelled" in cancelled.json()["detail"]
    release.set()
    held.result(timeout=60)

    client, service = make_client(workers=1, timeout_s=0.3)
    release, held = hold_worker(service)
    late = client.post("/sdapi/v1/txt2img", json=SMALL)
    assert late.status_code == 504 and "did not finish within" in late.json()["detail"]
    release.set()


def test_api_key(make_client: Callable[..., tuple[TestClient, GenerationService]]) -> None:
    client, _ = make_client(api_key="s3cret")
    assert client.get("/sdapi/v1/samplers").status_code == 401
    assert client.post("/sdapi/v1/txt2img", json=SMALL).status_code == 401
    wrong = client.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "Bearer" in wrong.headers["WWW-Authenticate"]
    assert client.get("/sdapi/v1/samplers", headers={"Authorization": "Basic !!!"}).status_code == 401
    assert client.get("/sdapi/v1/samplers", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/sdapi/v1/samplers", auth=("anyone", "s3cret")).status_code == 200
    assert client.get("/health").json()["status"] == "ok"
    schemes = client.get("/openapi.json").json()["components"]["securitySchemes"]
    assert {s["scheme"] for s in schemes.values()} == {"bearer", "basic"}


def test_openapi_document_and_body_limit(make_client: Callable[..., tuple[TestClient, GenerationService]]) -> None:
    client, _ = make_client()
    document = client.get("/openapi.json").json()
    paths = document["paths"]
    txt2img = document["components"]["schemas"]["Txt2ImgRequest"]["properties"]
    assert txt2img["steps"]["maximum"] == 30 and txt2img["batch_size"]["maximum"] == 4
    assert {"type": "integer", "maximum": 256, "minimum": 8, "multipleOf": 8} in txt2img["width"]["anyOf"]
    for path in ("txt2img", "img2img", "samplers", "schedulers", "sd-models", "options", "progress", "interrupt"):
        assert f"/sdapi/v1/{path}" in paths
    assert "/sdapi/v1/png-info" in paths and "/health" in paths
    too_big = client.post("/sdapi/v1/img2img", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert too_big.status_code == 413
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["models_loaded"] == ["latentrt-demo", "slow"]


def test_serve_command_line() -> None:
    args = build_parser().parse_args(["serve", "--checkpoint", "a.safetensors", "--checkpoint", "b", "--workers", "4"])
    assert args.checkpoint == ["a.safetensors", "b"] and args.workers == 4
    assert (args.host, args.port, args.api_key, args.no_batching) == ("127.0.0.1", 7860, None, False)
    assert _is_loopback("127.0.0.1") and _is_loopback("::1") and _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("example.com")
