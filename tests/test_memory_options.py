"""Memory options: layer weights stored in 16 bits (``storage_dtype``) and sequential offload.

Independent references: the layerwise-cast layers against torch's own functional ops on the
rounded weights; images against the same model loaded without the option (identical where the
arithmetic is the same, PSNR where weights are rounded); residency read from the kernel's page
tables (``/proc/self/pagemap``), not from our own bookkeeping.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from sd_fixtures import psnr, tiny_sd1
from torch import nn

import latentrt
from latentrt.cli import main
from latentrt.core.errors import InvalidRequest
from latentrt.core.layerwise import compute_dtype, install_layerwise_casting, stored_parameter_names
from latentrt.core.memory import resident_fraction
from latentrt.core.offload import component_modules
from latentrt.core.pipeline import Pipeline

PROMPTS = ["a red circle", "a small blue square"]


def _images(pipe: Pipeline, size: int = 64, seed: int = 3) -> list[np.ndarray]:
    result = pipe(PROMPTS, batch_size=2, width=size, height=size, steps=6, seed=seed)
    return [np.asarray(image) for image in result.images]


def _resident(component: object) -> float:
    """Share of a component's weight elements whose pages are mapped in right now."""
    tensors = [t for module in component_modules(component) for t in module.parameters()]
    total = sum(t.numel() for t in tensors)
    return sum(resident_fraction(t) * t.numel() for t in tensors) / total


# --- layerwise casting --------------------------------------------------------------------


class Layers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.linear = nn.Linear(8, 6)
        self.conv = nn.Conv2d(6, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.table = nn.Parameter(torch.randn(4))


def test_stored_layers_compute_on_upcast_weights_exactly() -> None:
    torch.manual_seed(0)
    module = Layers()
    reference = {name: t.clone() for name, t in module.state_dict().items()}
    assert stored_parameter_names(module) == {
        "embed.weight", "linear.weight", "linear.bias", "conv.weight", "conv.bias"
    }  # fmt: skip
    for name in stored_parameter_names(module):
        module.get_parameter(name).data = module.get_parameter(name).data.half()
    install_layerwise_casting(module, torch.float32)
    ids = torch.tensor([[1, 7, 3]])
    x = torch.randn(2, 8)
    image = torch.randn(1, 6, 5, 5)
    rounded = {name: t.half().float() for name, t in reference.items()}
    assert torch.equal(module.embed(ids), F.embedding(ids, rounded["embed.weight"]))
    assert torch.equal(module.linear(x), F.linear(x, rounded["linear.weight"], rounded["linear.bias"]))
    assert torch.equal(module.conv(image), F.conv2d(image, rounded["conv.weight"], rounded["conv.bias"], padding=1))
    assert module.embed(ids).dtype == torch.float32
    assert compute_dtype(module) == torch.float32
    assert module.norm.weight.dtype == torch.float32 and module.table.dtype == torch.float32


def test_fp16_storage_halves_the_weights_and_keeps_the_image(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tiny SD1 stored in fp32: fp16 storage rounds the layer weights (relative error 2^-11), so the
    images are close, not equal; norms and loose parameters stay fp32."""
    path = tiny_sd1(tmp_path_factory).single_file
    full = latentrt.load(path, progress=False)
    half = latentrt.load(path, progress=False, storage_dtype="fp16")
    unet_full, unet_half = component_modules(full.model.denoiser)[0], component_modules(half.model.denoiser)[0]
    dtypes = Counter(p.dtype for p in unet_half.parameters())
    assert dtypes[torch.float16] > 0 and dtypes[torch.float32] > 0
    stored = stored_parameter_names(unet_half)
    for name, parameter in unet_half.named_parameters():
        assert parameter.dtype == (torch.float16 if name in stored else torch.float32), name
    expected = sum(p.numel() * (2 if n in stored else 4) for n, p in unet_full.named_parameters())
    assert sum(p.numel() * p.element_size() for p in unet_half.parameters()) == expected
    assert half.model.dtype == torch.float32 and compute_dtype(unet_half) == torch.float32
    for a, b in zip(_images(full), _images(half), strict=True):
        assert psnr(a, b) >= 40.0


def test_storage_of_an_fp16_file_is_lossless() -> None:
    """The demo's weights are stored fp16 in its file: storing them fp16 loses nothing, so the
    images equal the fp32-upcast model's exactly."""
    full = latentrt.load("demo", progress=False)
    half = latentrt.load("demo", progress=False, storage_dtype="fp16")
    for a, b in zip(_images(full), _images(half), strict=True):
        assert np.array_equal(a, b)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"storage_dtype": "fp32"}, "storage_dtype must be fp16 or bf16"),
        ({"storage_dtype": "int8"}, "storage_dtype must be fp16 or bf16"),
        ({"offload": "lazy"}, "offload must be one of none, sequential"),
        ({"offload": "sequential", "runtime": "onnxruntime"}, "drop runtime= or the memory option"),
        ({"storage_dtype": "bf16", "runtime": "onnxruntime"}, "drop runtime= or the memory option"),
    ],
)
def test_bad_memory_options_are_refused_before_loading(options: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        latentrt.load("demo", progress=False, **options)  # type: ignore[arg-type]


# --- sequential offload -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_offload_makes_the_same_images(dtype: str) -> None:
    """fp32 from the demo's fp16 file converts every tensor (spilled to a file); bf16 likewise."""
    plain = latentrt.load("demo", dtype=dtype, progress=False)
    offloaded = latentrt.load("demo", dtype=dtype, progress=False, offload="sequential")
    for a, b in zip(_images(plain), _images(offloaded), strict=True):
        assert np.array_equal(a, b)


def test_only_the_running_network_is_resident(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tiny SD1 in fp32 from an fp32 file: its weights are the file's own pages."""
    pipe = latentrt.load(tiny_sd1(tmp_path_factory).single_file, progress=False, offload="sequential")
    model = pipe.model
    assert max(_resident(model.text_encoder), _resident(model.denoiser), _resident(model.vae)) < 0.3
    during: list[tuple[float, float, float]] = []
    pipe.generate(
        latentrt.GenerationRequest(prompt="a red circle", steps=3, seed=1, width=64, height=64),
        callback=lambda _: during.append(
            (_resident(model.text_encoder), _resident(model.denoiser), _resident(model.vae))
        ),
    )
    assert len(during) == 3
    for text, unet, vae in during:
        assert unet > 0.9 and text < 0.3 and vae < 0.3
    assert _resident(model.denoiser) < 0.3 and _resident(model.text_encoder) < 0.3
    assert _resident(model.vae) > 0.3  # the decoder ran last and stays


def test_offload_leaves_no_spill_files_and_is_thread_safe(isolated_cache: Path) -> None:
    pipe = latentrt.load("demo", progress=False, offload="sequential")
    assert os.listdir(isolated_cache / "offload") == []  # unlinked once mapped
    reference = _images(latentrt.load("demo", progress=False), seed=5)
    results: list[list[np.ndarray]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(_images(pipe, seed=5))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for images in results:
        for a, b in zip(reference, images, strict=True):
            assert psnr(a, b) >= 45.0  # threads may split kernels differently (one level at most)


def test_offload_says_what_to_fix_when_the_spill_folder_is_not_writable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LATENTRT_CACHE", str(blocker))
    with pytest.raises(InvalidRequest, match="offload needs a writable folder"):
        latentrt.load("demo", progress=False, offload="sequential")


def test_cli_takes_the_memory_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "a.png"
    args = ["generate", "a red circle", "--checkpoint", "demo", "--steps", "2", "--width", "64", "--height", "64"]
    code = main([*args, "--seed", "1", "--storage-dtype", "fp16", "--offload", "sequential", "--output", str(out)])
    assert code == 0 and out.exists()
    with pytest.raises(SystemExit):
        main([*args, "--offload", "sometimes", "--output", str(out)])
    assert "invalid choice: 'sometimes'" in capsys.readouterr().err


def test_a_component_is_entered_before_its_entry_point_reads_where_its_weights_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The VAE moves latents to its weights' device before any of its modules runs: on CUDA a parked
    VAE would get them on the host. ``decode``/``encode`` are entered as a whole, so it is resident."""
    pipe = latentrt.load("demo", progress=False, offload="sequential")
    vae = pipe.model.vae
    seen: list[str | None] = []
    placement = type(vae)._placement

    def spy(self: object) -> tuple[torch.device, torch.dtype]:
        seen.append(pipe.offload.active)
        return placement(self)  # type: ignore[arg-type]

    monkeypatch.setattr(type(vae), "_placement", spy)
    pipe("a red circle", width=64, height=64, steps=2, seed=1)
    assert seen == ["vae"]
    assert pipe.offload.components["vae"].running == 0 and pipe.offload.components["unet"].running == 0
