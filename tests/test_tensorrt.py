"""TensorRT without a GPU: profiles, precision plans, cache keys, refusals and the missing-TensorRT errors.

Nothing here imports TensorRT; the builder and runtime code that calls it is type-checked against the
``tensorrt-stubs`` package (``test_tensorrt_types.py``) and run by ``test_tensorrt_gpu.py`` on a GPU.
"""

from __future__ import annotations

import json
import logging
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from onnx_fixtures import compile_request, conv_component, conv_spec
from torch import nn

import latentrt
import latentrt.cli_export
import latentrt.cli_generate
from latentrt.cli import main
from latentrt.core.checkpoint import file_sha256
from latentrt.core.errors import ExportError, InvalidRequest, RuntimeUnavailable
from latentrt.core.protocols import Artifact, ArtifactRuntime, ExportSpec
from latentrt.exporters import MANIFEST, MANIFEST_FORMAT, spec_to_json, tensorrt_build
from latentrt.exporters import tensorrt as trt_exporter
from latentrt.exporters.cache import cached_artifact
from latentrt.exporters.tensorrt import TensorRTExporter
from latentrt.exporters.tensorrt_build import require_tensorrt
from latentrt.exporters.tensorrt_plan import (
    BuildPlan,
    EngineLayout,
    Profile,
    bf16_supported,
    build_plan,
    derive_profiles,
    device_tag,
    engine_mismatch,
    fallback_plan,
    profile_ranges,
    select_profile,
    timing_cache_path,
)
from latentrt.exporters.tensorrt_refit import RefitMap, WeightSource, onnx_initializers, refit_map, weight_tensor
from latentrt.runtimes import tensorrt as trt_runtime
from latentrt.runtimes.tensorrt import TensorRTModule, TensorRTRuntime, missing_requirements

UNET_INPUTS = {
    "sample": ["batch", 4, "height_div8", "width_div8"],
    "timestep": ["batch"],
    "context": ["batch", "tokens", 768],
}
"""The tiny UNet's ONNX graph inputs as the ONNX manifest lists them (symbolic names, static ints)."""


def unet_spec(sizes: tuple[int, int, int] = (256, 512, 1024), batch: tuple[int, int, int] = (1, 2, 8)) -> ExportSpec:
    """An SD1 UNet's export contract (as ``unet_export_spec``) without its sample inputs."""
    latent = {0: "batch", 2: "height", 3: "width"}
    return ExportSpec(
        name="unet",
        input_names=("sample", "timestep", "context"),
        output_names=("noise_pred",),
        input_dtypes=dict.fromkeys(("sample", "timestep", "context"), torch.float32),
        dynamic_axes={
            "sample": latent,
            "timestep": {0: "batch"},
            "context": {0: "batch", 1: "tokens"},
            "noise_pred": latent,
        },
        shape_range={"batch": batch, "height": sizes, "width": sizes},
        pixel_scale={"sample": 8, "noise_pred": 8},
    )


# --- profiles -------------------------------------------------------------------------------------


def test_profile_shapes_follow_the_spec_in_tensor_units() -> None:
    spec = unet_spec()
    (profile,) = derive_profiles(spec, UNET_INPUTS, profile_ranges(spec))
    assert profile.shapes["sample"] == ((1, 4, 32, 32), (2, 4, 64, 64), (8, 4, 128, 128))  # pixels / 8
    assert profile.shapes["timestep"] == ((1,), (2,), (8,))
    assert profile.shapes["context"] == ((1, 77, 768), (2, 77, 768), (8, 231, 768))  # 1 to 3 prompt chunks
    assert profile.describe() == "batch 1..8, height 256..1024, width 256..1024, tokens 77..231"


def test_static_profiles_and_extra_ranges() -> None:
    spec = unet_spec()
    (static,) = derive_profiles(spec, UNET_INPUTS, profile_ranges(spec, static=True))
    assert static.shapes["sample"] == ((2, 4, 64, 64),) * 3
    assert static.shapes["context"] == ((2, 77, 768),) * 3
    ranges = profile_ranges(spec, [{"height": (512, 768, 768), "width": (512, 768, 768)}])
    first, second = derive_profiles(spec, UNET_INPUTS, ranges)
    assert first.ranges["height"] == (256, 512, 1024)
    assert second.shapes["sample"] == ((1, 4, 64, 64), (2, 4, 96, 96), (8, 4, 96, 96))
    with pytest.raises(ExportError, match=r"profile height \(512, 768, 2048\) is outside the compiled range"):
        profile_ranges(spec, [{"height": (512, 768, 2048)}])


def test_profiles_refuse_what_tensorrt_cannot_build() -> None:
    spec = unet_spec(sizes=(256, 516, 1024))
    with pytest.raises(ExportError, match="must be multiples of 8 for input sample"):
        derive_profiles(spec, UNET_INPUTS, profile_ranges(spec))
    with pytest.raises(ExportError, match="dynamic axis 'tokens' has no range"):
        profile_ranges(unet_spec(), unbounded={})
    with pytest.raises(ExportError, match=r"input timestep axis 0 is dynamic in the ONNX graph \('n'\)"):
        derive_profiles(conv_spec(), {"latent": ["batch", 4, "h", "w"], "timestep": ["n"]}, profile_ranges(conv_spec()))


def test_select_profile_picks_the_first_that_fits_and_refuses_with_the_built_ranges() -> None:
    spec = unet_spec()
    ranges = profile_ranges(spec, [{"batch": (1, 1, 2), "height": (512, 512, 512), "width": (512, 512, 512)}])
    profiles = derive_profiles(spec, UNET_INPUTS, ranges)

    def shapes(batch: int, side: int, tokens: int = 77) -> dict[str, tuple[int, ...]]:
        return {"sample": (batch, 4, side // 8, side // 8), "timestep": (batch,), "context": (batch, tokens, 768)}

    assert select_profile(profiles, spec, shapes(2, 512)) == 0
    assert select_profile(profiles[1:], spec, shapes(2, 512)) == 0
    with pytest.raises(InvalidRequest) as refused:
        select_profile(profiles, spec, shapes(2, 512, tokens=308))
    message = str(refused.value)
    assert message.startswith("unet: batch 2, height 512, width 512, tokens 308 is outside the TensorRT engine's")
    assert "(batch 1..8, height 256..1024, width 256..1024, tokens 77..231; batch 1..2, height 512..512" in message
    assert message.endswith("rebuild the engine for it (TensorRTRuntime(unbounded={'tokens': (min, opt, max)}))")
    with pytest.raises(InvalidRequest) as refused:
        select_profile(profiles[1:], spec, shapes(2, 768))
    assert str(refused.value).endswith(
        "(latentrt export --to tensorrt --device cuda with --min-size/--max-size/--max-batch)"
    )
    wrong_channels = {**shapes(2, 512), "context": (2, 77, 1024)}
    with pytest.raises(InvalidRequest, match=r"input shapes .*context \[2, 77, 1024\] do not match"):
        select_profile(profiles, spec, wrong_channels)


def test_profile_and_layout_round_trip_through_the_manifest() -> None:
    spec = unet_spec()
    profiles = derive_profiles(spec, UNET_INPUTS, profile_ranges(spec))
    manifest = {
        "profiles": [p.to_json() for p in profiles],
        "inputs": [{"name": n} for n in UNET_INPUTS],
        "outputs": [{"name": "noise_pred"}],
        "tensorrt": {"streams": 2},
    }
    layout = EngineLayout.from_manifest(json.loads(json.dumps(manifest)), spec)
    assert layout.profiles == tuple(profiles)
    assert layout.inputs == ("sample", "timestep", "context") and layout.outputs == ("noise_pred",)
    assert [layout.profile_index(slot, 0) for slot in range(2)] == [0, 1]
    with pytest.raises(ExportError, match="build the engine again"):
        Profile.from_json({"ranges": {}})


# --- precision ------------------------------------------------------------------------------------


def test_build_plans_set_the_flags_each_precision_needs() -> None:
    assert build_plan("fp32") == BuildPlan("fp32", "fp32")  # no FP16/BF16, TF32 cleared
    assert build_plan("fp16", refittable=True) == BuildPlan("fp16", "fp32", fp16=True, refit=True)
    assert build_plan("bf16") == BuildPlan("bf16", "fp32", bf16=True)
    strong = build_plan("fp16", strongly_typed=True)
    assert strong == BuildPlan("fp16", "fp16", strongly_typed=True) and not (strong.fp16 or strong.bf16)
    with pytest.raises(ExportError, match="strongly typed bf16 engine needs a bf16 ONNX"):
        build_plan("bf16", strongly_typed=True)
    with pytest.raises(ExportError, match="must be one of fp32, fp16, bf16, got 'int8'"):
        build_plan("int8")


def test_an_overflowing_vae_falls_back_to_bf16_where_the_gpu_has_it_else_fp32() -> None:
    assert bf16_supported((8, 0)) and bf16_supported((9, 0)) and not bf16_supported((7, 5))
    fp16 = build_plan("fp16", refittable=True)
    assert fallback_plan(fp16, bf16_ok=True) == BuildPlan("bf16", "fp32", bf16=True, refit=True)
    assert fallback_plan(fp16, bf16_ok=False) == BuildPlan("fp32", "fp32", refit=True)
    assert fallback_plan(build_plan("bf16"), bf16_ok=True) == BuildPlan("fp32", "fp32")
    assert fallback_plan(build_plan("fp16", strongly_typed=True), bf16_ok=True) == build_plan(
        "fp32", strongly_typed=True
    )
    assert fallback_plan(build_plan("fp32"), bf16_ok=True) is None


# --- what an engine is tied to ---------------------------------------------------------------------


def test_device_tag_and_mismatch_name_tensorrt_version_and_compute_capability() -> None:
    assert device_tag("NVIDIA H100", (9, 0), "10.13.0") == "cuda:NVIDIA H100:sm90:tensorrt 10.13.0"
    manifest = {"tensorrt": {"version": "10.13.0", "compute_capability": [8, 6]}}
    assert engine_mismatch(manifest, "10.13.0", (8, 6)) is None
    assert (
        engine_mismatch(manifest, "10.14.1", (8, 6))
        == "the engine was built with TensorRT 10.13.0, this machine has 10.14.1"
    )
    assert engine_mismatch(manifest, "10.13.0", (9, 0)) == "the engine was built for a sm86 GPU, this one is sm90"
    assert timing_cache_path(Path("/c"), "10.13.0", (8, 9)) == Path("/c/tensorrt/timing-10.13.0-sm89.cache")


class _FakeGPU:
    """What the runtime reads about the machine: the TensorRT version and the GPU (patched in)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.version, self.capability = "10.13.0", (8, 6)
        monkeypatch.setattr(trt_runtime, "tensorrt_version", lambda: self.version)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: self.capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA RTX A6000")


class _PlanWriter:
    """An exporter writing a placeholder plan and a manifest the engine cache accepts (counts its builds)."""

    name = "tensorrt"

    def __init__(self) -> None:
        self.built: list[Path] = []

    def version(self) -> str:
        return "plan writer 1"

    def export(
        self,
        backbone: nn.Module,
        spec: ExportSpec,
        out_dir: Path,
        precision: str,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> Artifact:
        out_dir.mkdir(parents=True)
        (out_dir / "engine.plan").write_bytes(b"plan for " + str(metadata).encode())
        files = {
            "engine.plan": {
                "bytes": (out_dir / "engine.plan").stat().st_size,
                "sha256": file_sha256(out_dir / "engine.plan"),
            }
        }
        manifest = {
            "format": MANIFEST_FORMAT,
            "status": "ok",
            "files": files,
            "spec": spec_to_json(spec),
            "metadata": metadata,
        }
        (out_dir / MANIFEST).write_text(json.dumps(manifest))
        self.built.append(out_dir)
        return Artifact(out_dir, ("engine.plan",), spec, manifest)


def test_cache_key_holds_tensorrt_version_and_compute_capability(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An engine built for another TensorRT or GPU is a different cache entry: rebuilt, never loaded."""
    gpu, exporter, runtime = _FakeGPU(monkeypatch), _PlanWriter(), TensorRTRuntime()
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"weights")
    request = compile_request(conv_component(), weights, tmp_path / "engines")
    cuda = torch.device("cuda")

    def artifact() -> Artifact:
        return cached_artifact(exporter, runtime, request, runtime.device_tag(cuda))

    first = artifact()
    key = first.manifest["metadata"]["cache_key"]
    assert key["runtime_version"] == "10.13.0" and key["device"] == "cuda:NVIDIA RTX A6000:sm86:tensorrt 10.13.0"
    assert artifact().directory == first.directory and len(exporter.built) == 1  # reused
    gpu.version = "10.14.1"
    assert artifact().directory != first.directory and len(exporter.built) == 2
    gpu.capability = (9, 0)
    assert len({artifact().directory, first.directory}) == 2 and len(exporter.built) == 3
    assert len(list((tmp_path / "engines").iterdir())) == 3


def test_exporter_settings_are_part_of_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trt_exporter, "tensorrt_version", lambda: "10.13.0")
    versions = {
        TensorRTExporter().version(),
        TensorRTExporter(refittable=True).version(),
        TensorRTExporter(static=True).version(),
        TensorRTExporter(strongly_typed=True).version(),
        TensorRTExporter(profiles=({"height": (512, 512, 512)},)).version(),
        TensorRTExporter(streams=2).version(),
    }
    assert len(versions) == 6 and all("tensorrt 10.13.0" in v and "opset 18" in v for v in versions)


def test_timing_cache_defaults_under_the_cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trt_exporter, "tensorrt_version", lambda: "10.13.0")
    monkeypatch.setenv("LATENTRT_CACHE", str(tmp_path))
    assert TensorRTExporter()._timing_cache((8, 6)) == tmp_path / "tensorrt" / "timing-10.13.0-sm86.cache"
    assert TensorRTExporter(timing_cache=tmp_path / "mine.cache")._timing_cache((8, 6)) == tmp_path / "mine.cache"


class _TimingConfig:
    """The four ``IBuilderConfig`` timing-cache calls, recording what they were given."""

    def __init__(self, accepts: bool = True) -> None:
        self.accepts, self.created, self.cache = accepts, [], b""

    def create_timing_cache(self, data: bytes) -> bytes:
        self.created.append(bytes(data))
        return bytes(data)

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
        self.cache = cache
        return self.accepts or cache == b""

    def get_timing_cache(self) -> Any:
        return types.SimpleNamespace(serialize=lambda: self.cache + b"+new tactics")


def test_timing_cache_is_loaded_before_and_saved_after_a_build(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "tensorrt" / "timing.cache"
    config = _TimingConfig()
    tensorrt_build._load_timing_cache(config, path)
    assert config.created == [b""]  # none yet: a new cache
    tensorrt_build._save_timing_cache(config, path)
    assert path.read_bytes() == b"+new tactics"
    config = _TimingConfig()
    tensorrt_build._load_timing_cache(config, path)
    assert config.created == [b"+new tactics"]  # reused
    foreign = _TimingConfig(accepts=False)
    with caplog.at_level(logging.WARNING):
        tensorrt_build._load_timing_cache(foreign, path)
    assert foreign.created == [b"+new tactics", b""] and "starting a new one" in caplog.text


# --- refusals before anything runs -----------------------------------------------------------------


class _Untouchable:
    """An engine stand-in that fails the test if anything reads it."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the engine was used ({name}) before the request was checked")


def _module(engine: Any, artifact: Artifact | None = None) -> TensorRTModule:
    spec = unet_spec(sizes=(64, 64, 128), batch=(1, 2, 4))
    layout = EngineLayout(
        spec, tuple(derive_profiles(spec, UNET_INPUTS, profile_ranges(spec))), tuple(UNET_INPUTS), ("noise_pred",)
    )
    return TensorRTModule(engine, None, layout, torch.device("cuda"), artifact=artifact)


def test_requests_outside_the_engine_are_refused_before_running() -> None:
    module = _module(_Untouchable())
    feeds = {"sample": torch.zeros(2, 4, 8, 8), "timestep": torch.zeros(2), "context": torch.zeros(2, 77, 768)}
    with pytest.raises(
        InvalidRequest, match=r"unet: height 136 is outside the range it was compiled for \(batch 1\.\.4"
    ):
        module({**feeds, "sample": torch.zeros(2, 4, 17, 8)})
    with pytest.raises(
        InvalidRequest, match=r"tokens 308 is outside the TensorRT engine's profiles .*tokens 77\.\.231"
    ):
        module({**feeds, "context": torch.zeros(2, 308, 768)})


def test_refit_is_refused_for_an_engine_not_built_refittable(tmp_path: Path) -> None:
    module = _module(types.SimpleNamespace(refittable=False))
    with pytest.raises(InvalidRequest, match=r"was not built refittable.*TensorRTRuntime\(refittable=True\)"):
        module.refit({"unet.conv.weight": torch.zeros(1)})
    artifact = Artifact(tmp_path, (), module.spec, {})
    with pytest.raises(InvalidRequest, match=r"no refit_map\.json beside it; build it again"):
        _module(types.SimpleNamespace(refittable=True), artifact).refit({})


# --- missing TensorRT or GPU -------------------------------------------------------------------------


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> dict[str, bool]:
    """Which of TensorRT and a CUDA GPU the machine has (both absent until a test says otherwise)."""
    has = {"tensorrt": False, "gpu": False}

    def require() -> None:
        if not has["tensorrt"]:
            raise RuntimeUnavailable("TensorRT is not installed")

    monkeypatch.setattr(tensorrt_build, "require_tensorrt", require)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has["gpu"])
    return has


def test_require_tensorrt_sees_through_the_type_stubs(monkeypatch: pytest.MonkeyPatch) -> None:
    """``pip install tensorrt-stubs`` leaves an importable, empty ``tensorrt`` namespace: not TensorRT."""
    monkeypatch.setattr(tensorrt_build.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeUnavailable, match=r"TensorRT is not installed: pip install 'latentrt\[gpu\]'"):
        require_tensorrt()
    monkeypatch.setattr(tensorrt_build.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(RuntimeUnavailable, match="only TensorRT's type stubs are installed, not TensorRT"):
        require_tensorrt()


@pytest.mark.parametrize(
    ("tensorrt", "gpu", "missing"),
    [(False, False, "TensorRT and a CUDA GPU"), (False, True, "TensorRT"), (True, False, "a CUDA GPU")],
)
def test_runtime_names_what_is_missing(machine: dict[str, bool], tensorrt: bool, gpu: bool, missing: str) -> None:
    machine.update(tensorrt=tensorrt, gpu=gpu)
    runtime = TensorRTRuntime()
    assert not runtime.available() and missing_requirements() == missing.split(" and ")
    with pytest.raises(RuntimeUnavailable) as info:
        runtime.require(torch.device("cuda"))
    assert str(info.value).startswith(f"the tensorrt runtime needs {missing}, which this machine lacks")
    assert str(info.value).endswith("pip install 'latentrt[gpu]'")


def test_runtime_refuses_a_cpu_device(machine: dict[str, bool]) -> None:
    machine.update(tensorrt=True, gpu=True)
    assert TensorRTRuntime().available()
    with pytest.raises(RuntimeUnavailable, match="TensorRT runs on CUDA GPUs, not on cpu: pass --device cuda"):
        TensorRTRuntime().require(torch.device("cpu"))


@pytest.fixture
def no_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the CLI loads a model."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was loaded before the runtime was checked")

    monkeypatch.setattr(latentrt.cli_export, "load", refuse)
    monkeypatch.setattr(latentrt.cli_generate, "load", refuse)


@pytest.mark.usefixtures("no_load")
@pytest.mark.parametrize(
    ("command", "has", "message"),
    [
        (["generate", "a cat", "--runtime", "tensorrt", "--device", "cuda"], {}, "needs TensorRT and a CUDA GPU"),
        (["generate", "a cat", "--runtime", "unet=trt,vae=torch"], {"gpu": True}, "needs TensorRT, which"),
        (
            ["export", "--checkpoint", "x.safetensors", "--to", "tensorrt", "--device", "cuda"],
            {"tensorrt": True},
            "needs a CUDA GPU",
        ),
        (
            ["export", "--checkpoint", "x.safetensors", "--to", "tensorrt"],
            {"tensorrt": True, "gpu": True},
            "pass --device cuda",
        ),
    ],
)
def test_cli_stops_at_once_with_one_line(
    machine: dict[str, bool],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    command: list[str],
    has: dict[str, bool],
    message: str,
) -> None:
    machine.update(has)
    extra = ["--out", str(tmp_path / "engines")] if command[0] == "export" else ["--output", str(tmp_path / "x.png")]
    assert main([*command, *extra]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("latentrt: error: ") and message in error
    if "GPU" in message or "TensorRT" in message:
        assert "pip install 'latentrt[gpu]'" in error
    assert not (tmp_path / "engines").exists() and not (tmp_path / "x.png").exists()


def test_tensorrt_is_registered_without_importing_it(registry: latentrt.Registry) -> None:
    assert registry.exporter("tensorrt").plugin == "latentrt.runtimes"
    runtime = registry.runtime("trt").factory()
    assert isinstance(runtime, ArtifactRuntime) and runtime.exporter == "tensorrt" and runtime.name == "tensorrt"
    assert runtime.available() == (not missing_requirements())


# --- refit map ------------------------------------------------------------------------------------


def test_refit_map_matches_names_reshapes_and_transposes() -> None:
    generator = torch.Generator().manual_seed(0)
    parameters = {
        "unet.conv.weight": torch.randn(4, 3, 3, 3, generator=generator),
        "unet.norm.weight": torch.randn(4, generator=generator),
        "unet.proj.weight": torch.randn(6, 4, generator=generator),
        "unet.a.bias": torch.ones(4),
        "unet.b.bias": torch.ones(4),
        "unet.unused.weight": torch.randn(2, generator=generator),
    }
    initializers = {
        "module.unet.conv.weight": parameters["unet.conv.weight"].numpy(),
        "val_1": parameters["unet.norm.weight"].numpy().reshape(4, 1, 1),  # folded reshape
        "val_2": parameters["unet.proj.weight"].numpy().T.copy(),  # folded transpose for MatMul
        "val_3": np.ones(4, np.float32),  # equal to two parameters: ambiguous
        "val_4": np.arange(16, dtype=np.float32),  # a constant (timestep frequencies)
        "val_5": np.array([2, 3], np.int64),  # a shape
    }
    mapping = refit_map(initializers, parameters)
    assert set(mapping.weights) == {"module.unet.conv.weight", "val_1", "val_2"}
    assert mapping.weights["val_1"].parameter == "unet.norm.weight" and mapping.weights["val_1"].shape == (4, 1, 1)
    assert mapping.weights["val_2"].transpose and mapping.weights["val_2"].parameter == "unet.proj.weight"
    assert mapping.ambiguous == ("val_3",) and mapping.constants == 1
    assert set(mapping.unmapped_parameters) == {"unet.a.bias", "unet.b.bias", "unet.unused.weight"}
    for name, source in mapping.weights.items():
        rebuilt = weight_tensor(parameters[source.parameter], source, torch.float32, torch.device("cpu"))
        assert np.array_equal(rebuilt.numpy(), initializers[name])


def test_refit_map_round_trips_and_refuses_a_damaged_file(tmp_path: Path) -> None:
    mapping = RefitMap({"val_2": WeightSource("proj.weight", (4, 6), transpose=True)}, ("val_3",), 2)
    path = tmp_path / "refit_map.json"
    path.write_text(json.dumps(mapping.to_json()))
    assert RefitMap.read(path) == mapping
    path.write_text('{"format": 1, "weights": {"x": {}}}')
    with pytest.raises(ExportError, match="no usable refit map"):
        RefitMap.read(path)
    with pytest.raises(ExportError, match="a different architecture needs a new engine"):
        weight_tensor(torch.zeros(5, 4), mapping.weights["val_2"], torch.float32, torch.device("cpu"))


class _NormLinear(nn.Module):
    """GroupNorm, a 1x1 conv and a linear over channels: the folds the ONNX exporter makes in a UNet."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.norm, self.conv, self.proj = nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 1), nn.Linear(4, 4)
        for parameter in self.parameters():
            nn.init.normal_(parameter)  # distinct values everywhere, as in a trained model

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """``proj`` over the channels of ``conv(norm(latent))``."""
        x = self.conv(self.norm(latent))
        out: torch.Tensor = self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return out


@pytest.mark.usefixtures("one_thread")
def test_refit_map_covers_every_parameter_of_a_real_onnx_export(tmp_path: Path) -> None:
    """The ONNX exporter's own output: named initializers, folded GroupNorm scales and transposed weights."""
    from latentrt.exporters.onnx import OnnxExporter

    module = _NormLinear().eval()
    spec = ExportSpec(
        name="vae_decoder",
        input_names=("latent",),
        output_names=("images",),
        input_dtypes={"latent": torch.float32},
        dynamic_axes={"latent": {0: "batch", 2: "height", 3: "width"}, "images": {0: "batch", 2: "height", 3: "width"}},
        shape_range={"batch": (1, 1, 2), "height": (8, 16, 16), "width": (8, 16, 16)},
        sample_inputs=lambda dims: {"latent": torch.randn(dims["batch"], 4, dims["height"], dims["width"])},
    )
    artifact = OnnxExporter(optimization="disabled", progress=False).export(module, spec, tmp_path / "onnx", "fp32")
    initializers = onnx_initializers(artifact.directory / "model.onnx")
    mapping = refit_map(initializers, dict(module.named_parameters()))
    assert mapping.unmapped_parameters == () and mapping.ambiguous == ()
    assert {s.parameter for s in mapping.weights.values()} == dict(module.named_parameters()).keys()
    for name, source in mapping.weights.items():
        value = dict(module.named_parameters())[source.parameter]
        rebuilt = weight_tensor(value, source, torch.float32, torch.device("cpu"))
        assert np.array_equal(rebuilt.detach().numpy(), initializers[name]), name
