"""The real ``webuiapi`` client (as Krita plugins and chat bots use it) against ``latentrt serve`` in a subprocess."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import webuiapi
from PIL import Image
from server_process import ServerProcess, serve

from latentrt.core.parameters import parse_parameters

KEY = "test-key-123"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """``latentrt serve`` with the demo model, an API key from the environment, on a free loopback port."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with serve(["--log-level", "warning"], log, env={"LATENTRT_API_KEY": KEY}) as process:
        yield process


@pytest.fixture
def api(server: ServerProcess) -> Any:
    """A webuiapi client logged in as A1111's ``--api-auth`` clients are (HTTP Basic, key as password)."""
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=6,
                             username="latentrt", password=KEY)  # fmt: skip


def settings(image: Image.Image) -> dict[str, object]:
    params = parse_parameters(image.info["parameters"])
    return {"prompt": params.prompt, "negative": params.negative_prompt, **params.settings}


def test_txt2img_parameters_text_matches_the_request(api: Any) -> None:
    result = api.txt2img(prompt="a red circle", negative_prompt="blue", seed=42, width=64, height=64, cfg_scale=5,
                         batch_size=2)  # fmt: skip
    assert len(result.images) == 2 and result.image.size == (64, 64)
    assert result.info["all_seeds"] == [42, 43] and result.info["sampler_name"] == "Euler a"
    assert result.parameters["prompt"] == "a red circle"
    for k, image in enumerate(result.images):
        found = settings(image)
        assert found["prompt"] == "a red circle" and found["negative"] == "blue"
        assert (found["Steps"], found["Sampler"], found["CFG scale"]) == ("6", "Euler a", "5")
        assert (found["Seed"], found["Size"], found["Model"]) == (str(42 + k), "64x64", "latentrt-demo")


def test_img2img_with_a_mask(api: Any) -> None:
    init = api.txt2img(prompt="a blue square", seed=3, width=64, height=64).image
    mask = Image.new("L", (64, 64))
    mask.paste(255, (0, 0, 32, 64))
    result = api.img2img(images=[init], mask_image=mask, prompt="a red circle", denoising_strength=0.5, seed=9,
                         width=64, height=64, steps=8)  # fmt: skip
    found = settings(result.image)
    assert result.image.size == (64, 64) and found["Denoising strength"] == "0.5" and found["Seed"] == "9"
    assert found["Steps"] == "8" and found["prompt"] == "a red circle"
    assert any("inpaint_full_res" in w for w in result.info["warnings"]), "webuiapi's default 'only masked' is reported"


def test_samplers_schedulers_models_and_options(api: Any) -> None:
    assert {"Euler a", "DPM++ 2M", "DPM++ 2M SDE", "UniPC"} <= set(api.util_get_sampler_names())
    assert {"automatic", "karras", "exponential"} <= set(api.util_get_scheduler_names())
    (title,) = api.util_get_model_names()
    assert title.startswith("latentrt-demo.safetensors [")
    assert api.util_get_current_model() == title
    api.util_set_model("latentrt-demo")
    assert api.util_get_current_model() == title
    api.set_options({"CLIP_stop_at_last_layers": 1, "samples_save": False})
    assert api.get_options()["samples_save"] is False
    info = api.png_info(api.txt2img(prompt="a green triangle", seed=5, width=64, height=64).image)
    assert info.parameters["Seed"] == "5" and info.parameters["Prompt"] == "a green triangle"


def test_progress_and_interrupt(api: Any) -> None:
    outcome: dict[str, Any] = {}

    def generate() -> None:
        outcome["result"] = api.txt2img(prompt="a yellow circle", seed=1, width=64, height=64, steps=150)

    thread = threading.Thread(target=generate)
    thread.start()
    progress = api.get_progress()
    deadline = time.monotonic() + 60
    while progress["state"]["sampling_step"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        progress = api.get_progress()
    assert 0 < progress["progress"] < 1 and progress["state"]["sampling_steps"] == 150
    assert progress["state"]["job_count"] >= 1 and progress["current_image"]
    api.interrupt()
    thread.join(60)
    result = outcome["result"]
    assert result.info["interrupted"] is True and result.image.size == (64, 64)
    api.util_wait_for_ready(check_interval=0.1)


def test_requests_without_the_key_get_401(server: ServerProcess) -> None:
    assert httpx.get(f"{server.url}/sdapi/v1/samplers").status_code == 401
    assert httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x"}).status_code == 401
    assert httpx.get(f"{server.url}/sdapi/v1/samplers", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_the_server_listens_on_loopback_only(server: ServerProcess) -> None:
    assert "without an API key" not in server.log.read_text()
    assert listening_addresses(server.port) == ["127.0.0.1"]


def listening_addresses(port: int) -> list[str]:
    """IPv4 addresses with a socket listening on ``port`` (Linux ``/proc/net/tcp``)."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port_hex = local.split(":")
        if state == "0A" and int(port_hex, 16) == port:
            found.append(".".join(str(b) for b in reversed(bytes.fromhex(address))))
    return found
