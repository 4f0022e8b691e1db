"""Load and faults: 200 requests at concurrency 16 against ``latentrt serve``, valid, invalid and cancelled mixed.

Every valid request succeeds, every invalid one gets a 4xx, cancelled ones end (409, or the
client's own timeout), the server's memory afterwards is within 10% of before (measured after
a warm-up run of the same mix), and it still answers ``/health``.
"""

from __future__ import annotations

import base64
import io
import json
import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from server_process import ServerProcess, rss_bytes, serve

REQUESTS = 200
CONCURRENCY = 16
SMALL = {"steps": 4, "width": 64, "height": 64, "cfg_scale": 5}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``latentrt serve`` with the demo model and small limits."""
    log = tmp_path_factory.mktemp("load") / "server.log"
    args = ["--workers", "8", "--max-queue", "128", "--max-steps", "40", "--max-size", "256", "--log-level", "warning"]
    with serve(args, log) as process:
        yield process


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


INIT = png_b64(Image.new("RGB", (64, 64), (200, 30, 30)))
MASK = png_b64(Image.new("L", (64, 64), 255))
SMALL_MASK = png_b64(Image.new("L", (32, 32), 255))
PROMPTS = ("a red circle", "a blue square", "a green triangle", "a small yellow circle", "a big purple square")
SAMPLERS = ("Euler", "Euler a", "DPM++ 2M", "Heun", "DPM++ 2M Karras")

Call = Callable[[httpx.Client, str], tuple[str, Any]]


def valid(rng: random.Random) -> Call:
    body = {**SMALL, "prompt": rng.choice(PROMPTS), "seed": rng.randrange(2**31), "sampler_name": rng.choice(SAMPLERS)}
    body["batch_size"] = rng.choice((1, 1, 2))
    path = "txt2img"
    if rng.random() < 0.3:
        path = "img2img"
        body.update(init_images=[INIT], denoising_strength=0.6, mask=MASK if rng.random() < 0.5 else None)

    def call(client: httpx.Client, url: str) -> tuple[str, Any]:
        return "valid", client.post(f"{url}/sdapi/v1/{path}", json=body).status_code

    return call


INVALID: list[tuple[str, dict[str, Any]]] = [
    ("txt2img", {"width": 65}),
    ("txt2img", {"sampler_name": "eular"}),
    ("txt2img", {"scheduler": "karas"}),
    ("txt2img", {"steps": 0}),
    ("txt2img", {"steps": 1000}),
    ("txt2img", {"steps": "many"}),
    ("txt2img", {"seed": -7}),
    ("txt2img", {"cfg_scale": 1000}),
    ("txt2img", {"n_iter": 1000}),
    ("txt2img", {"override_settings": {"sd_model_checkpoint": "missing"}}),
    ("txt2img", {"prompt": "x" * 20_001}),
    ("txt2img", {"prompt": "bad \ud800 surrogate"}),
    ("txt2img", {"styles": ["\udfff"]}),
    ("img2img", {"init_images": ["%%% not base64"]}),
    ("img2img", {"init_images": [base64.b64encode(b"GIF89a garbage").decode()]}),
    ("img2img", {"init_images": [INIT], "mask": SMALL_MASK}),
    ("img2img", {}),
]


def invalid(rng: random.Random) -> Call:
    path, change = rng.choice(INVALID)

    broken = rng.random() < 0.1
    content = b"{broken" if broken else json.dumps({**SMALL, "prompt": "a red circle", **change}).encode()

    def call(client: httpx.Client, url: str) -> tuple[str, Any]:
        headers = {"content-type": "application/json"}  # json.dumps escapes lone surrogates, as browsers send them
        response = client.post(f"{url}/sdapi/v1/{'txt2img' if broken else path}", content=content, headers=headers)
        return "invalid", response.status_code

    return call


def disconnecting(rng: random.Random) -> Call:
    """A client that gives up after 0.3 s on a long request; the server cancels it."""
    body = {**SMALL, "steps": 40, "prompt": rng.choice(PROMPTS)}

    def call(client: httpx.Client, url: str) -> tuple[str, Any]:
        try:
            return "cancelled", client.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=0.3).status_code
        except httpx.TimeoutException:
            return "cancelled", "client timeout"

    return call


def cancelled_by_id(rng: random.Random) -> Call:
    """A request cancelled through ``/latentrt/v1/tasks/{id}/cancel`` while it waits or runs."""
    task = f"load-{uuid.uuid4().hex[:12]}"
    body = {**SMALL, "steps": 40, "prompt": rng.choice(PROMPTS), "force_task_id": task}

    def call(client: httpx.Client, url: str) -> tuple[str, Any]:
        outcome: dict[str, int] = {}
        thread = threading.Thread(
            target=lambda: outcome.update(status=client.post(f"{url}/sdapi/v1/txt2img", json=body).status_code)
        )
        thread.start()
        while thread.is_alive() and client.post(f"{url}/latentrt/v1/tasks/{task}/cancel").status_code == 404:
            time.sleep(0.02)
        thread.join(120)
        return "cancelled", outcome.get("status")

    return call


def plan(seed: int) -> list[Call]:
    rng = random.Random(seed)
    makers = [valid] * 12 + [invalid] * 5 + [disconnecting, cancelled_by_id]
    return [rng.choice(makers)(rng) for _ in range(REQUESTS)]


def run(server: ServerProcess, calls: list[Call]) -> list[tuple[str, Any]]:
    with httpx.Client(timeout=300) as client, ThreadPoolExecutor(CONCURRENCY) as pool:
        return list(pool.map(lambda call: call(client, server.url), calls))


@pytest.mark.slow
def test_200_mixed_requests_at_concurrency_16(server: ServerProcess) -> None:
    # Warm up with a mix like the measured one: the first run grows the allocator's arenas and oneDNN's
    # per-shape caches to their working size (stacked calls come in many batch sizes); a leak shows after that.
    run(server, plan(seed=1))
    time.sleep(1.0)
    before = rss_bytes(server.process.pid)
    started = time.monotonic()
    outcomes = run(server, plan(seed=7))
    elapsed = time.monotonic() - started
    time.sleep(1.0)
    after = rss_bytes(server.process.pid)
    tally = Counter((kind, status) for kind, status in outcomes)
    print(f"\n{REQUESTS} requests in {elapsed:.1f} s; outcomes {dict(tally)}; RSS {before >> 20} -> {after >> 20} MiB")
    assert all(status == 200 for kind, status in outcomes if kind == "valid"), tally
    assert all(isinstance(s, int) and 400 <= s < 500 for k, s in outcomes if k == "invalid"), tally
    assert all(s in (200, 409, "client timeout") for k, s in outcomes if k == "cancelled"), tally
    assert tally["cancelled", 409] + tally["cancelled", "client timeout"] >= 5
    assert abs(after - before) <= 0.10 * before, f"RSS {before} -> {after}"
    health = httpx.get(f"{server.url}/health", timeout=10).json()
    assert health["status"] == "ok" and health["running"] == 0 and health["queued"] == 0
    metrics = health["metrics"]
    assert metrics["cancelled"] >= 5 and metrics["shared_calls"] > 0 and metrics.get("failed", 0) == 0
    assert "Traceback" not in Path(server.log).read_text()
