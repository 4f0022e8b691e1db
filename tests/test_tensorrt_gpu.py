"""TensorRT on an NVIDIA GPU: engines checked against torch, refusals, refit, CUDA graphs, the cache, the CLI.

Every test here needs a CUDA GPU (``gpu`` marker; conftest skips it without one) and TensorRT itself,
not only its type stubs (skipped with the reason otherwise). Run them with the command in the
README's "TensorRT (NVIDIA GPUs)" section.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from onnx_fixtures import LIMITS, TinyConv, conv_component, psnr
from sd_fixtures import tiny_sd1

import latentrt
from latentrt.cli import main
from latentrt.core.errors import ExportError, InvalidRequest, RuntimeUnavailable
from latentrt.core.pipeline import Pipeline
from latentrt.core.protocols import CompileRequest, RuntimeComponent, ShapeLimits
from latentrt.exporters import read_artifact
from latentrt.exporters import tensorrt as trt_exporter
from latentrt.exporters.tensorrt_build import require_tensorrt
from latentrt.plugins.stable_diffusion.runtime_components import CompiledUNet, CompiledVAE
from latentrt.runtimes.tensorrt import TensorRTModule, TensorRTRuntime


def _tensorrt_missing() -> str | None:
    try:
        require_tensorrt()
    except RuntimeUnavailable as exc:
        return str(exc)
    return None


MISSING = _tensorrt_missing()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(MISSING is not None, reason=f"needs TensorRT: {MISSING}")]

CUDA = torch.device("cuda")
FP32_TOL = 1e-3  # TensorRT fp32 (TF32 off) against torch fp32, relative to max(1, |torch|)
PSNR_MIN = 35.0  # dB, a TensorRT fp16 image against the torch fp16 one (issue 8)
REQUEST = {"prompt": "a red circle on a blue background", "steps": 12, "seed": 3, "batch_size": 2}


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """ONNX files TensorRT built an engine from during the test (every ``build_engine`` call)."""
    calls: list[str] = []
    real = trt_exporter.build_engine

    def counting(onnx_path: Path, *args: Any) -> bytes:
        calls.append(onnx_path.name)
        return real(onnx_path, *args)

    monkeypatch.setattr(trt_exporter, "build_engine", counting)
    return calls


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"tiny conv weights")
    return path


def _conv(seed: int = 0) -> RuntimeComponent:
    component = conv_component(seed=seed)
    component.module.to(CUDA)
    return component


def _request(component: RuntimeComponent, weights: Path, engines: Path, precision: str = "fp32") -> CompileRequest:
    return CompileRequest(component, weights, precision, CUDA, engines, progress=False)


def _max_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| relative to max(1, max |expected|), as the exporters' validation measures it."""
    return float((got.float() - expected.float()).abs().max()) / max(1.0, float(expected.abs().max()))


def test_conv_engine_matches_torch_and_is_reused(tmp_path: Path, weights: Path, builds: list[str]) -> None:
    component = _conv()
    compiled = TensorRTRuntime().compile(_request(component, weights, tmp_path))
    assert isinstance(compiled, TensorRTModule) and compiled.artifact is not None
    for shape in [(1, 4, 8, 8), (2, 4, 16, 24), (2, 4, 32, 32)]:  # smallest, non-square, largest
        latent = torch.randn(shape, device=CUDA)
        with torch.no_grad():
            expected = component.module(latent)
        got = compiled({"latent": latent})["images"]
        assert got.device.type == "cuda" and got.shape == expected.shape
        assert _max_error(got, expected) <= FP32_TOL
    manifest = compiled.artifact.manifest
    assert manifest["tensorrt"]["compute_capability"] == list(torch.cuda.get_device_capability(CUDA))
    assert manifest["validation"]["passed"] and sorted(manifest["files"]) == ["engine.plan"]
    assert Path(manifest["tensorrt"]["timing_cache"]).is_file()  # saved for the next build
    again = TensorRTRuntime().compile(_request(_conv(), weights, tmp_path))
    assert again.artifact is not None and again.artifact.directory == compiled.artifact.directory
    assert builds == ["model.onnx"]  # the second compile deserialized the cached engine


def test_requests_outside_the_profiles_are_refused_before_running(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = TensorRTRuntime().compile(_request(_conv(), weights, tmp_path))

    def refuse(*args: Any) -> None:
        raise AssertionError("the engine must not run")

    monkeypatch.setattr(compiled, "_execute", refuse)
    with pytest.raises(InvalidRequest, match=r"height 66 is outside the range .*height 16\.\.64"):
        compiled({"latent": torch.zeros(1, 4, 33, 8, device=CUDA)})
    static = TensorRTRuntime(static=True).compile(_request(_conv(), weights, tmp_path))
    assert static.spec.shape_range == {"batch": (1, 1, 1), "height": (32, 32, 32), "width": (32, 32, 32)}
    monkeypatch.setattr(static, "_execute", refuse)
    with pytest.raises(InvalidRequest, match="height 16 is outside the range it was compiled for"):
        static({"latent": torch.zeros(1, 4, 8, 16, device=CUDA)})


def test_refit_changes_outputs_to_the_new_weights(tmp_path: Path, weights: Path) -> None:
    compiled = TensorRTRuntime(refittable=True).compile(_request(_conv(seed=0), weights, tmp_path))
    latent = torch.randn(2, 4, 12, 16, device=CUDA)
    old, new = TinyConv(seed=0).to(CUDA), TinyConv(seed=1).to(CUDA)
    with torch.no_grad():
        old_out, new_out = old(latent), new(latent)
    before = compiled({"latent": latent})["images"]
    assert _max_error(before, old_out) <= FP32_TOL
    report = compiled.refit(new.state_dict())
    assert report.updated == 2 and report.unused == ()  # conv weight and bias
    after = compiled({"latent": latent})["images"]
    assert _max_error(after, new_out) <= FP32_TOL
    assert _max_error(after, old_out) > 100 * FP32_TOL  # the outputs did change
    plain = TensorRTRuntime().compile(_request(_conv(), weights, tmp_path))
    with pytest.raises(InvalidRequest, match="was not built refittable"):
        plain.refit(new.state_dict())


def test_cuda_graphs_give_the_plain_runs_results(tmp_path: Path, weights: Path) -> None:
    plain = TensorRTRuntime().compile(_request(_conv(), weights, tmp_path))
    assert plain.artifact is not None
    graphed = TensorRTRuntime(cuda_graphs=True).load(plain.artifact, CUDA)
    shapes = [(2, 4, 16, 24), (1, 4, 8, 8), (2, 4, 16, 24), (2, 4, 16, 24)]  # capture, capture, re-bind, replay
    for shape in shapes:
        latent = torch.randn(shape, device=CUDA)
        assert torch.equal(graphed({"latent": latent})["images"], plain({"latent": latent})["images"])


def test_strongly_typed_fp16_engine(tmp_path: Path, weights: Path) -> None:
    component = _conv()
    compiled = TensorRTRuntime(strongly_typed=True).compile(_request(component, weights, tmp_path, "fp16"))
    assert compiled.artifact is not None and compiled.artifact.manifest["build"]["strongly_typed"]
    latent = torch.randn(2, 4, 16, 16, device=CUDA)
    with torch.no_grad():
        expected = component.module(latent)
    assert _max_error(compiled({"latent": latent})["images"], expected) <= 2e-2


def test_engine_for_another_gpu_is_refused_on_load(tmp_path: Path, weights: Path) -> None:
    compiled = TensorRTRuntime().compile(_request(_conv(), weights, tmp_path))
    assert compiled.artifact is not None
    manifest_path = compiled.artifact.directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tensorrt"]["compute_capability"] = [7, 0]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match=r"built for a sm70 GPU, this one is sm\d+; rebuild it here"):
        TensorRTRuntime().load(read_artifact(compiled.artifact.directory), CUDA)


# --- whole pipelines -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One model on torch fp16 and on TensorRT fp16 (every component), and its engine folder."""

    torch: Pipeline
    tensorrt: Pipeline
    engines: Path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    path = tiny_sd1(tmp_path_factory).single_file
    engines = tmp_path_factory.mktemp("tensorrt-engines")
    options: dict[str, Any] = {"device": "cuda", "dtype": "fp16", "progress": False}
    trt = latentrt.load(path, runtime="tensorrt", engines=engines, limits=LIMITS, **options)
    return Pair(latentrt.load(path, **options), trt, engines)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Pair:
    engines = tmp_path_factory.mktemp("tensorrt-demo")
    options: dict[str, Any] = {"device": "cuda", "dtype": "fp16", "progress": False}
    limits = ShapeLimits(min_size=64, max_size=64, max_batch=2)
    trt = latentrt.load("demo", runtime="tensorrt", engines=engines, limits=limits, **options)
    return Pair(latentrt.load("demo", **options), trt, engines)


def _images_psnr(pair: Pair, **request: Any) -> list[float]:
    expected, got = pair.torch(**request), pair.tensorrt(**request)
    pixels = [(np.asarray(a), np.asarray(b)) for a, b in zip(expected.images, got.images, strict=True)]
    assert all(a.std() > 5 for a, _ in pixels)  # real pictures, not flat ones
    return [psnr(a, b) for a, b in pixels]


def test_tiny_sd1_on_tensorrt_matches_torch_fp16(tiny: Pair) -> None:
    assert isinstance(tiny.tensorrt.model.denoiser.backbone, CompiledUNet)  # type: ignore[attr-defined]
    assert isinstance(tiny.tensorrt.model.vae, CompiledVAE)
    request = {**REQUEST, "width": 96, "height": 64}
    assert min(_images_psnr(tiny, **request)) >= PSNR_MIN
    img2img = {**request, "init_image": tiny.torch(**request).images[0], "strength": 0.5}
    assert min(_images_psnr(tiny, **img2img)) >= PSNR_MIN


def test_demo_model_on_tensorrt_matches_torch_fp16(demo: Pair) -> None:
    assert min(_images_psnr(demo, **REQUEST)) >= PSNR_MIN


def test_pipeline_refuses_a_size_outside_the_engines(tiny: Pair) -> None:
    with pytest.raises(InvalidRequest, match=r"outside the range it was compiled for .*height 64\.\.128"):
        tiny.tensorrt(**{**REQUEST, "width": 256, "height": 64})


def test_cli_export_then_generate_reuses_the_engines(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], builds: list[str]
) -> None:
    out = tmp_path / "engines"
    export = ["export", "--checkpoint", "demo", "--to", "tensorrt", "--device", "cuda", "--precision", "fp16"]
    assert main([*export, "--out", str(out), "--components", "unet,vae_decoder", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "max |tensorrt - torch|" in printed and printed.count("exported in") == 2
    assert len(builds) == 2
    png = tmp_path / "demo.png"
    runtime = ["--runtime", "unet=tensorrt,vae_decoder=tensorrt", "--device", "cuda", "--dtype", "fp16"]
    command = ["generate", "a red circle", "--steps", "8", "--seed", "1", "--output", str(png)]
    assert main([*command, *runtime, "--engines", str(out)]) == 0
    assert png.is_file() and len(builds) == 2  # both engines reused, nothing built
