"""latentrt.serve without a cluster: settings, example config, error mapping, replica and ingress in-process.

The same code runs inside Ray Serve in ``tests/test_serve_ray.py``; here each piece is
driven directly, so its behaviour is checked in seconds.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import io
import json
import pickle
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

import latentrt
from latentrt import GenerationRequest, Pipeline
from latentrt.cli import build_parser
from latentrt.cli_serve import cmd_serve, ray_settings
from latentrt.core.errors import InvalidRequest, LatentRTError
from latentrt.serve import ClusterBusy, RayServeOptions, ReplicaSpec, ReplicaUnavailable, ReplicaUnhealthy, is_retryable
from latentrt.serve.asgi import BodyTooLarge, ClientDisconnected, ForwardedRequest, ForwardedResponse, read_request
from latentrt.serve.config import app_config
from latentrt.serve.replica import REPLICA_HEADER, GenerationReplica, ReplicaResult
from latentrt.service import GenerationService, InvalidField, RequestCancelled, ServiceBusy, ServiceConfig

ray_serve = pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'latentrt[ray]')")

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError  # noqa: E402
from ray.serve.deployment import Application  # noqa: E402
from ray.serve.exceptions import BackPressureError  # noqa: E402
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from latentrt.serve import deploy  # noqa: E402
from latentrt.serve.ray import IngressSettings, LatentRTIngress, RayGenerationClient, _IngressApp, map_ray_error  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = Path(__file__).parents[1] / "examples" / "ray" / "config.yaml"
REQUEST = GenerationRequest("a red circle", steps=4, seed=21, cfg_scale=5.0, sampler="dpmpp_2m")
BODY = {"prompt": "a red circle", "steps": 4, "seed": 21, "cfg_scale": 5, "sampler_name": "dpmpp_2m"}


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# -- settings --------------------------------------------------------------------------


def test_fixed_and_autoscaled_replicas_become_ray_serve_deployment_options() -> None:
    service = ServiceConfig(workers=6)
    fixed = RayServeOptions(replicas=3, replica_cpus=2).replica_options(service)
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] == 6, "a replica takes as many requests as its service runs at once"
    assert fixed["ray_actor_options"] == {"num_cpus": 2}
    scaled = RayServeOptions(min_replicas=1, max_replicas=4, target_ongoing_requests=3, replica_gpus=1)
    options = scaled.replica_options(service)
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3}
    assert options["ray_actor_options"]["num_gpus"] == 1
    assert RayServeOptions().replica_options(service)["num_replicas"] == 1
    assert RayServeOptions().ingress_options()["ray_actor_options"] == {"num_cpus": 0}


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"replicas": 2, "max_replicas": 3}, "either replicas"),
        ({"min_replicas": 1}, "needs both min_replicas and max_replicas"),
        ({"min_replicas": 3, "max_replicas": 2}, "must be >= min_replicas"),
        ({"replicas": 0}, "replicas must be an integer >= 1"),
        ({"max_queued_requests": 0}, "max_queued_requests must be an integer >= 1"),
        ({"replica_cpus": -1.0}, "replica_cpus must be >= 0"),
        ({"retry_after_s": 0.0}, "retry_after_s must be > 0"),
    ],
)
def test_impossible_ray_options_are_refused_saying_what_to_change(options: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        RayServeOptions(**options)


def test_replica_spec_checks_models_and_reads_the_api_key_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(InvalidRequest, match="non-empty list or mapping"):
        ReplicaSpec(models="demo")  # type: ignore[arg-type]
    assert ReplicaSpec(models=["demo", "other.safetensors"]).models == ("demo", "other.safetensors")
    monkeypatch.setenv("LATENTRT_API_KEY", "from-env")
    assert ReplicaSpec().resolved_api_key() == "from-env"
    assert ReplicaSpec(api_key="given").resolved_api_key() == "given"


def test_the_example_config_is_a_valid_serve_config_whose_builder_makes_the_app() -> None:
    config = ServeDeploySchema.model_validate(yaml.safe_load(EXAMPLE.read_text()))
    (application,) = config.applications
    module, _, name = application.import_path.partition(":")
    builder = getattr(importlib.import_module(module), name)
    app = builder(application.args)
    assert isinstance(app, Application)
    spec, options = app_config(application.args)
    assert spec.models == ("demo",) and spec.service.workers == 8 and spec.service.limits.max_steps == 150
    assert options.replicas == 2 and options.max_queued_requests == 64


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"replica": 2}, "unknown setting 'replica' in args; did you mean 'replicas'"),
        ({"service": {"worker": 2}}, "unknown setting 'worker' in args.service; did you mean 'workers'"),
        ({"limits": {"max_step": 9}}, "did you mean 'max_steps'"),
        ({"service": {"limits": {}}}, "give request limits as args.limits"),
        ({"service": {"workers": 0}}, "workers must be an integer >= 1"),
    ],
)
def test_config_file_args_with_mistakes_are_refused_by_name(args: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        app_config(args)


def test_serve_command_line_ray_options() -> None:
    parse = build_parser().parse_args
    spec, options = ray_settings(parse(["serve", "--ray", "--min-replicas", "1", "--max-replicas", "3",
                                        "--address", "auto", "--workers", "4", "--checkpoint", "demo"]))  # fmt: skip
    assert options.autoscaling and (options.min_replicas, options.max_replicas) == (1, 3)
    assert options.replica_gpus == 0.0 and spec.service.workers == 4 and spec.models == ("demo",)
    _, on_gpu = ray_settings(parse(["serve", "--ray", "--replicas", "2", "--device", "cuda"]))
    assert on_gpu.replicas == 2 and on_gpu.replica_gpus == 1.0, "one replica per GPU by default on cuda"
    with pytest.raises(InvalidRequest, match="either replicas"):
        ray_settings(parse(["serve", "--ray", "--replicas", "2", "--min-replicas", "1", "--max-replicas", "2"]))
    with pytest.raises(LatentRTError, match="--address, --replicas only apply with --ray"):
        cmd_serve(parse(["serve", "--replicas", "2", "--address", "auto"]))


def test_serve_ray_command_deploys_what_its_options_say(monkeypatch: pytest.MonkeyPatch) -> None:
    deployed: list[tuple[Any, ...]] = []
    monkeypatch.setattr(deploy, "serve_on_ray", lambda spec, options, **where: deployed.append((spec, options, where)))
    argv = ["serve", "--ray", "--address", "auto", "--replicas", "2", "--host", "0.0.0.0", "--port", "8000",
            "--api-key", "k", "--max-ongoing-requests", "3", "--max-queued-requests", "-1"]  # fmt: skip
    assert cmd_serve(build_parser().parse_args(argv)) == 0
    ((spec, options, where),) = deployed
    assert where == {"address": "auto", "host": "0.0.0.0", "port": 8000}
    assert spec.api_key == "k" and options.replicas == 2
    assert options.replica_options(spec.service)["max_ongoing_requests"] == 3 and options.max_queued_requests == -1


# -- errors -----------------------------------------------------------------------------


def test_latentrt_errors_cross_process_boundaries_with_their_attributes() -> None:
    errors: list[BaseException] = [
        InvalidField("steps", "steps must be in 1..150"),
        ServiceBusy("the queue is full", retry_after=7.0),
        RequestCancelled("task-1 was cancelled", "cancelled"),
        ReplicaUnavailable("gone", cause="replica_died", retry_after=3.0),
        ClusterBusy("busy", retry_after=4.0),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and vars(copy) == vars(error)


def test_ray_failures_become_retryable_latentrt_errors() -> None:
    died = map_ray_error(ActorDiedError(), retry_after=3.0)
    assert isinstance(died, ReplicaUnavailable) and died.cause == "replica_died" and died.retry_after == 3.0
    assert "send it again" in str(died) and is_retryable(died)
    unreachable = map_ray_error(ActorUnavailableError("connection lost", None))
    assert isinstance(unreachable, ReplicaUnavailable) and unreachable.cause == "replica_unreachable"
    busy = map_ray_error(BackPressureError(num_queued_requests=3, max_queued_requests=2, retry_after_s=5.0))
    assert isinstance(busy, ClusterBusy) and busy.retry_after == 5.0 and is_retryable(busy)
    invalid = InvalidField("steps", "steps must be in 1..150")
    wrapped = RayTaskError("generate", "traceback", invalid).as_instanceof_cause()
    assert map_ray_error(wrapped) is invalid and not is_retryable(invalid), "the replica's own error, unwrapped"
    other = ValueError("not a Ray failure")
    assert map_ray_error(other) is other


# -- the replica, in this process ---------------------------------------------------------


@pytest.fixture(scope="module")
def demo() -> Pipeline:
    return latentrt.load("demo", progress=False)


@pytest.fixture(scope="module")
def replica() -> Iterator[GenerationReplica]:
    """A replica outside Ray (identity ``local-<pid>``), shut down after the module."""
    made = GenerationReplica(ReplicaSpec(service=ServiceConfig(workers=2, batch_wait_s=0.05)))
    yield made
    made.shutdown()


def test_replica_loads_and_load_tests_its_model_once(replica: GenerationReplica) -> None:
    info = replica.info()
    assert info.replica.replica_id.startswith("local-") and info.loaded_models == ["latentrt-demo"]
    assert info.metrics["completed"] >= 1, "the one-step load test ran before the replica took traffic"
    assert info.task is None
    replica.check_health()
    assert replica.info().metrics["completed"] == info.metrics["completed"], "health checks do not re-run it"


def test_replica_generate_equals_a_local_service(replica: GenerationReplica, demo: Pipeline) -> None:
    result = asyncio.run(replica.generate(REQUEST))
    assert isinstance(result, ReplicaResult) and result.replica == replica.identity
    with GenerationService({"demo": demo}) as service:
        local = service.submit(REQUEST).result(timeout=60)
    assert np.abs(pixels(result.images[0]) - pixels(local.images[0])).max() <= 1  # see test_serve_ray.same_image
    assert result.parameters == local.parameters and result.seeds == local.seeds == [21]


def test_forwarded_http_requests_are_answered_by_the_same_a1111_app(replica: GenerationReplica, demo: Pipeline) -> None:
    headers = ((b"content-type", b"application/json"),)
    ok = asyncio.run(
        replica.http(ForwardedRequest("POST", "/sdapi/v1/txt2img", b"", headers, json.dumps(BODY).encode()))
    )
    assert ok.status == 200 and ok.header(REPLICA_HEADER) == replica.identity.replica_id
    image = Image.open(io.BytesIO(base64.b64decode(json.loads(ok.body)["images"][0])))
    assert np.abs(pixels(image) - pixels(demo.generate(REQUEST).images[0])).max() <= 1  # service thread vs this one
    bad = asyncio.run(replica.http(ForwardedRequest("POST", "/sdapi/v1/txt2img", b"", headers, b'{"steps": 0}')))
    assert bad.status == 422 and json.loads(bad.body)["detail"][0]["loc"] == ["body", "steps"]
    progress = asyncio.run(replica.http(ForwardedRequest("GET", "/sdapi/v1/progress", b"skip_current_image=true")))
    assert progress.status == 200 and "progress" in json.loads(progress.body)


def test_health_check_fails_after_internal_errors_in_a_row(replica: GenerationReplica) -> None:
    class Broken:
        async def generate(self, request: GenerationRequest, **options: Any) -> Any:
            raise RuntimeError("CUDA error: device lost")

    working = replica.service
    replica.service = Broken()  # type: ignore[assignment]
    try:
        for _ in range(replica.spec.unhealthy_after_failures):
            with pytest.raises(RuntimeError, match="device lost"):
                asyncio.run(replica.generate(REQUEST))
        with pytest.raises(ReplicaUnhealthy, match="the last 3 requests failed with internal errors"):
            replica.check_health()
    finally:
        replica.service = working
    asyncio.run(replica.generate(REQUEST))
    replica.check_health()  # a success resets the count


def test_a_replica_whose_model_cannot_load_says_what_to_check() -> None:
    with pytest.raises(ReplicaUnhealthy, match=r"model 'latentrt-demo' did not load .*device 'cuda:99'"):
        GenerationReplica(ReplicaSpec(service=ServiceConfig(workers=1, device="cuda:99")))


def test_shutdown_drains_the_requests_in_flight() -> None:
    drained = GenerationReplica(ReplicaSpec(service=ServiceConfig(workers=2), load_test=False))
    results: list[ReplicaResult] = []
    thread = threading.Thread(target=lambda: results.append(asyncio.run(drained.generate(replace(REQUEST, steps=20)))))
    thread.start()
    while drained.info().metrics.get("running", 0) < 1 and thread.is_alive():
        threading.Event().wait(0.02)
    drained.shutdown()  # returns once the running request has finished
    thread.join(60)
    assert len(results) == 1 and results[0].result.steps_done == 20 and not results[0].result.interrupted


# -- the ingress, over a stand-in for the replicas' handle ---------------------------------


class _Method:
    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome
        self.calls: list[Any] = []

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(args)
        outcome = self.outcome.pop(0) if isinstance(self.outcome, list) else self.outcome
        return _Response(outcome)


class _Response:
    """Stands in for a DeploymentResponse: awaitable, and ``result()`` for synchronous callers."""

    def __init__(self, outcome: Any) -> None:
        self.outcome = outcome

    def __await__(self) -> Any:
        return self._get().__await__()

    async def _get(self) -> Any:
        return self.result()

    def result(self, timeout_s: float | None = None) -> Any:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        pass


class _Handle:
    def __init__(self, **methods: Any) -> None:
        for name, outcome in methods.items():
            setattr(self, name, _Method(outcome))


def _through_ingress(handle: _Handle, **request: Any) -> httpx.Response:
    ingress = LatentRTIngress(handle, IngressSettings(max_body_bytes=1000, retry_after_s=3.0))  # type: ignore[arg-type]

    async def send() -> httpx.Response:
        transport = httpx.ASGITransport(app=_IngressApp(ingress))
        async with httpx.AsyncClient(transport=transport, base_url="http://cluster") as client:
            return await client.request(**request)

    return asyncio.run(send())


def test_ingress_forwards_requests_and_responses_unchanged() -> None:
    answer = ForwardedResponse(201, ((b"content-type", b"application/json"), (REPLICA_HEADER.encode(), b"r1")), b"{}")
    handle = _Handle(http=answer)
    response = _through_ingress(handle, method="POST", url="/sdapi/v1/txt2img?x=1", json={"prompt": "a"})
    assert response.status_code == 201 and response.headers[REPLICA_HEADER] == "r1" and response.json() == {}
    (forwarded,) = handle.http.calls[0]  # type: ignore[attr-defined]
    assert (forwarded.method, forwarded.path, forwarded.query_string) == ("POST", "/sdapi/v1/txt2img", b"x=1")
    assert json.loads(forwarded.body) == {"prompt": "a"}


def test_ingress_answers_a_dead_replica_with_a_retryable_503() -> None:
    response = _through_ingress(_Handle(http=ActorDiedError()), method="POST", url="/sdapi/v1/txt2img", json={})
    assert response.status_code == 503 and response.headers["retry-after"] == "3"
    body = response.json()
    assert body["cause"] == "replica_died" and body["retryable"] is True and "send it again" in body["detail"]
    busy = BackPressureError(num_queued_requests=64, max_queued_requests=64)
    response = _through_ingress(_Handle(http=busy), method="GET", url="/health")
    assert response.status_code == 503 and response.json()["cause"] == "backpressure"
    assert (
        _through_ingress(_Handle(http=ActorDiedError()), method="POST", url="/x", content=b"x" * 1001).status_code
        == 413
    )


def test_reading_a_request_stops_at_the_body_limit_and_at_a_disconnect() -> None:
    scope = {"type": "http", "method": "POST", "path": "/app/sdapi/v1/txt2img", "root_path": "/app", "headers": []}

    def chunks(*messages: dict[str, Any]) -> Any:
        queue = list(messages)

        async def receive() -> dict[str, Any]:
            return queue.pop(0)

        return receive

    two = chunks({"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.request", "body": b"c"})
    request = asyncio.run(read_request(scope, two, max_body_bytes=3))
    assert request.body == b"abc" and request.path == "/sdapi/v1/txt2img", "the replica's app is mounted at /"
    streamed = chunks(
        {"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.request", "body": b"cd"}
    )
    with pytest.raises(BodyTooLarge, match="more than 3 bytes"):  # no content-length: counted while reading
        asyncio.run(read_request(scope, streamed, max_body_bytes=3))
    with pytest.raises(ClientDisconnected):
        asyncio.run(read_request(scope, chunks({"type": "http.disconnect"}), max_body_bytes=3))


def test_client_retries_a_dead_replica_with_the_same_seed() -> None:
    result = ReplicaResult(None, None)  # type: ignore[arg-type]
    handle = _Handle(generate=[ActorDiedError(), result])
    client = RayGenerationClient(handle, retries=1, max_wait_s=0.01)  # type: ignore[arg-type]
    assert client.generate(replace(REQUEST, seed=-1)) is result
    first, second = (call[0] for call in handle.generate.calls)  # type: ignore[attr-defined]
    assert first.seed == second.seed != -1, "the seed is drawn once, so the retry makes the same image"
    no_retry = RayGenerationClient(_Handle(generate=[ActorDiedError()]))  # type: ignore[arg-type]
    with pytest.raises(ReplicaUnavailable) as error:
        no_retry.generate(REQUEST)
    assert error.value.cause == "replica_died" and isinstance(error.value.__cause__, ActorDiedError)
