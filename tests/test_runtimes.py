"""The runtime interface: shape-range checks, the torch and ONNX Runtime runtimes, runtime choice at load time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from onnx_fixtures import LIMITS, TinyConv, compile_request, conv_component, conv_spec
from sd_fixtures import tiny_sd1

import latentrt
from latentrt.core.errors import InvalidRequest, RuntimeUnavailable
from latentrt.core.loader import compile_model, runtime_plan
from latentrt.core.pipeline import Model
from latentrt.core.protocols import Artifact, ArtifactRuntime, CompiledModule, Runtime
from latentrt.plugins.stable_diffusion.runtime_components import CompiledUNet, CompiledVAE
from latentrt.runtimes.onnxruntime import CPU, OnnxRuntime, OrtModule
from latentrt.runtimes.torch import TorchModule, TorchRuntime

# A 3x3 conv over 4 channels in float32: ONNX Runtime and torch agree to ~1e-6 (measured 6.0e-7 over 15 inputs).
CONV_TOL = 1e-5


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"tiny conv weights")
    return path


def test_check_feeds_uses_pixel_units_and_names_the_range() -> None:
    spec = conv_spec()  # latent is 1/2 of the pixels; height and width 16..64, batch 1..2
    spec.check_feeds({"latent": torch.zeros(2, 4, 8, 32)})  # 16 x 64 pixels: inside
    with pytest.raises(InvalidRequest, match=r"width 66 is outside .*batch 1\.\.2, height 16\.\.64, width 16\.\.64"):
        spec.check_feeds({"latent": torch.zeros(1, 4, 8, 33)})
    with pytest.raises(InvalidRequest, match="batch 3 is outside"):
        spec.check_feeds({"latent": torch.zeros(3, 4, 8, 8)})
    with pytest.raises(InvalidRequest, match="missing: latent, unknown: sample"):
        spec.check_feeds({"sample": torch.zeros(1, 4, 8, 8)})


def test_torch_runtime_names_outputs_and_refuses_before_running(weights: Path, tmp_path: Path) -> None:
    component = conv_component()
    runtime = TorchRuntime()
    assert isinstance(runtime, Runtime) and not isinstance(runtime, ArtifactRuntime)
    compiled = runtime.compile(compile_request(component, weights, tmp_path))
    assert isinstance(compiled, TorchModule) and isinstance(compiled, CompiledModule)
    latent = torch.randn(2, 4, 8, 12)
    out = compiled({"latent": latent})
    assert list(out) == ["images"]
    with torch.no_grad():
        assert torch.equal(out["images"], component.module(latent))  # the same module: bit-identical
    calls: list[Any] = []
    compiled.module = lambda *args: calls.append(args)
    with pytest.raises(InvalidRequest, match="height 80 is outside"):
        compiled({"latent": torch.zeros(1, 4, 40, 8)})
    assert calls == []
    assert list(tmp_path.iterdir()) == [weights]  # nothing exported or cached


def test_torch_compile_runtime_runs_the_compiled_module(weights: Path, tmp_path: Path) -> None:
    """``torch.compile`` with the ``eager`` backend (dynamo tracing without inductor's C++ build)."""
    component = conv_component()
    compiled = TorchRuntime(name="torch_compile", compile_mode="default", backend="eager").compile(
        compile_request(component, weights, tmp_path)
    )
    assert type(compiled.module).__name__ == "OptimizedModule"
    latent = torch.randn(1, 4, 10, 8)
    with torch.no_grad():
        expected = component.module(latent)
    assert torch.allclose(compiled({"latent": latent})["images"], expected, atol=1e-6, rtol=0)


@pytest.mark.usefixtures("one_thread")
def test_onnxruntime_runs_the_export_within_tolerance(weights: Path, tmp_path: Path) -> None:
    component = conv_component()
    runtime = OnnxRuntime()
    assert isinstance(runtime, ArtifactRuntime) and runtime.exporter == "onnx"
    compiled = runtime.compile(compile_request(component, weights, tmp_path))
    assert isinstance(compiled, OrtModule) and compiled.providers == [CPU]
    for shape in [(1, 4, 8, 8), (2, 4, 16, 24), (2, 4, 32, 32)]:  # smallest, a non-square one, the largest
        latent = torch.randn(shape)
        with torch.no_grad():
            expected = component.module(latent)
        got = compiled({"latent": latent})["images"]
        assert got.shape == expected.shape and got.dtype == torch.float32
        assert float((got - expected).abs().max()) <= CONV_TOL
    assert compiled.artifact.manifest["runtime_model"] == "model.optimized.onnx"
    assert compiled.model_file.name == "model.optimized.onnx"  # optimized for the CPU provider


@pytest.mark.usefixtures("one_thread")
def test_onnxruntime_refuses_out_of_range_feeds_before_running(
    weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled = OnnxRuntime().compile(compile_request(conv_component(), weights, tmp_path))

    def run(*args: Any) -> Any:
        raise AssertionError("the session must not run")

    monkeypatch.setattr(compiled.session, "run", run)
    with pytest.raises(InvalidRequest, match=r"height 66 is outside the range .*height 16\.\.64"):
        compiled({"latent": torch.zeros(1, 4, 33, 8)})
    with pytest.raises(InvalidRequest, match="batch 3 is outside"):
        compiled({"latent": torch.zeros(3, 4, 8, 8)})


@pytest.mark.usefixtures("one_thread")
def test_unoptimized_file_is_loaded_for_other_providers(weights: Path, tmp_path: Path) -> None:
    """The offline-optimized graph holds provider-specific fused nodes: other providers get model.onnx."""
    compiled = OnnxRuntime().compile(compile_request(conv_component(), weights, tmp_path))
    other = OnnxRuntime(optimization="disabled")
    artifact = compiled.artifact
    manifest = {**artifact.manifest, "optimization": {"level": "extended", "providers": ["CUDAExecutionProvider"]}}
    reloaded = other.load(Artifact(artifact.directory, artifact.files, artifact.spec, manifest), "cpu")
    assert reloaded.model_file.name == "model.onnx"
    latent = torch.randn(1, 4, 8, 8)
    difference = (reloaded({"latent": latent})["images"] - compiled({"latent": latent})["images"]).abs().max()
    assert float(difference) <= CONV_TOL


def test_onnxruntime_providers_follow_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    import onnxruntime

    runtime = OnnxRuntime()
    assert runtime.execution_providers(torch.device("cpu")) == [CPU]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [CPU])
    with pytest.raises(RuntimeUnavailable, match="install onnxruntime-gpu"):
        runtime.execution_providers(torch.device("cuda"))
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CUDAExecutionProvider", CPU])
    assert runtime.execution_providers(torch.device("cuda:1")) == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        CPU,
    ]
    with pytest.raises(RuntimeUnavailable, match="no TensorrtExecutionProvider"):
        OnnxRuntime(providers=("TensorrtExecutionProvider",)).execution_providers(torch.device("cpu"))


def test_onnxruntime_takes_its_tensorrt_provider_only_with_the_real_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime-gpu lists TensorRT whether or not TensorRT is installed; type stubs alone are not it."""
    import onnxruntime

    import latentrt.runtimes.onnxruntime as ort_runtime

    trt_ep, cuda_ep = "TensorrtExecutionProvider", "CUDAExecutionProvider"
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: [trt_ep, cuda_ep, CPU])
    monkeypatch.setattr(ort_runtime, "tensorrt_installed", lambda: False)
    assert [p if isinstance(p, str) else p[0] for p in OnnxRuntime().execution_providers(torch.device("cuda"))] == [
        cuda_ep,
        CPU,
    ]
    monkeypatch.setattr(ort_runtime, "tensorrt_installed", lambda: True)
    chosen = OnnxRuntime().execution_providers(torch.device("cuda:0"))
    assert chosen[0] == (trt_ep, {"device_id": 0, "trt_engine_cache_enable": True}) and chosen[-1] == CPU


def test_runtime_plan_accepts_groups_and_names_the_valid_components() -> None:
    names = ["unet", "vae_decoder", "vae_encoder", "text_encoder"]
    assert runtime_plan("onnxruntime", names) == dict.fromkeys(names, "onnxruntime")
    assert runtime_plan({"vae": "onnxruntime", "unet": "torch"}, names) == {
        "vae_decoder": "onnxruntime",
        "vae_encoder": "onnxruntime",
        "unet": "torch",
    }
    with pytest.raises(
        InvalidRequest, match=r"no component 'vea'.*unet, vae_decoder, vae_encoder, text_encoder, vae, text"
    ):
        runtime_plan({"vea": "onnxruntime"}, names)


def test_builtin_runtimes_are_registered(registry: latentrt.Registry) -> None:
    assert {"torch", "torch_compile", "onnxruntime"} <= set(registry.runtimes)
    assert registry.runtime("ort").name == "onnxruntime"
    assert registry.exporter("onnx").plugin == "latentrt.runtimes"
    assert all(isinstance(spec.factory(), Runtime) for spec in registry.runtimes.values())


def test_a_model_without_components_runs_on_torch_only(tmp_path: Path) -> None:
    model = Model(family="toy", text_encoder=None, denoiser=None, vae=None, name="toy")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="toy model, which runs on torch only"):
        compile_model(model, "onnxruntime", weights={"checkpoint": tmp_path})


def test_an_unknown_runtime_is_refused_with_the_valid_names(tmp_path: Path) -> None:
    component = conv_component()
    model = Model(family="toy", text_encoder=None, denoiser=None, vae=None, name="toy")  # type: ignore[arg-type]
    model.runtime_components = lambda limits: {"vae_decoder": component}
    with pytest.raises(latentrt.PluginError, match=r"unknown runtime 'openvino'.*onnxruntime"):
        compile_model(model, "openvino", weights={"checkpoint": tmp_path})


@pytest.mark.gpu
def test_onnxruntime_io_binding_on_cuda(weights: Path, tmp_path: Path) -> None:
    """On a GPU with onnxruntime-gpu: inputs and outputs stay on the device (I/O binding)."""
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime here has no CUDA execution provider (install onnxruntime-gpu)")
    component = conv_component()
    request = compile_request(component, weights, tmp_path)
    request = type(request)(request.component, weights, "fp32", torch.device("cuda"), tmp_path, progress=False)
    compiled = OnnxRuntime().compile(request)
    assert compiled.bind
    for _ in range(2):  # the first call learns the output shape, the second binds a preallocated tensor
        latent = torch.randn(2, 4, 8, 12, device="cuda")
        got = compiled({"latent": latent})["images"]
        assert got.device.type == "cuda"
        with torch.no_grad():
            expected = TinyConv()(latent.cpu())
        assert float((got.cpu() - expected).abs().max()) <= CONV_TOL


def test_pipeline_on_the_torch_runtime_matches_the_native_one(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Every component through ``TorchModule`` drop-ins gives the native pipeline's result: the pipeline,
    samplers and text encoders see the same calls whichever runtime runs them."""
    tiny = tiny_sd1(tmp_path_factory)
    native = latentrt.load(tiny.single_file, progress=False)
    wrapped = latentrt.load(tiny.single_file, progress=False, runtime="torch", limits=LIMITS)
    assert isinstance(wrapped.model.vae, CompiledVAE)
    assert isinstance(wrapped.model.denoiser.backbone, CompiledUNet)  # type: ignore[attr-defined]
    request = {"prompt": "a red cube", "steps": 3, "seed": 5, "width": 96, "height": 64, "batch_size": 2}
    expected, got = native(**request), wrapped(**request)
    # the same float32 kernels on the same inputs; the text encoder's final layer norm runs over all
    # layers at once, which could round differently: 1e-5 bounds that (measured 0.0, also for img2img)
    assert float((expected.latents - got.latents).abs().max()) <= 1e-5
    pixels = [
        np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()
        for a, b in zip(expected.images, got.images, strict=True)
    ]
    assert max(pixels) <= 1
    init = expected.images[0]
    img2img = {**request, "init_image": init, "strength": 0.5}
    assert float((native(**img2img).latents - wrapped(**img2img).latents).abs().max()) <= 1e-5
