"""``dtype="auto"`` and the bf16 quality guard: bf16 images stay within 30 dB PSNR of fp32's."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from onnx_fixtures import demo_engines_dir
from sd_fixtures import psnr, tiny_sd1

import latentrt
from latentrt.core.autotune import auto_choice, auto_runtime, cpu_flags, native_bf16_cpu
from latentrt.core.loader import resolve_dtype

ICE_LAKE = frozenset({"avx512f", "avx512bw", "avx512_vnni"})
SAPPHIRE_RAPIDS = ICE_LAKE | {"avx512_bf16", "amx_bf16", "amx_tile"}


def test_auto_is_bf16_only_on_cpus_that_compute_it_natively() -> None:
    cpu = torch.device("cpu")
    assert auto_choice(cpu, SAPPHIRE_RAPIDS).dtype == torch.bfloat16
    assert auto_choice(cpu, ICE_LAKE | {"avx512_bf16"}).dtype == torch.bfloat16
    assert auto_choice(cpu, ICE_LAKE).dtype == torch.float32
    assert "no AVX512-BF16/AMX" in auto_choice(cpu, ICE_LAKE).describe()


def test_cpu_flags_read_proc_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512_bf16 amx_tile\n")
    flags = cpu_flags(info)
    assert flags == {"fpu", "sse", "avx512_bf16", "amx_tile"}
    assert native_bf16_cpu(flags)
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_auto_dtype_is_logged_in_one_line(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="latentrt.core.loader"):
        dtype = resolve_dtype("auto", torch.device("cpu"))
    assert dtype == (torch.bfloat16 if native_bf16_cpu() else torch.float32)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("auto: ")] != []


def _images(path: str | Path, dtype: str, size: int) -> list[np.ndarray]:
    pipe = latentrt.load(path, dtype=dtype, progress=False)
    result = pipe(["a red circle", "a small blue square"], batch_size=2, width=size, height=size, steps=8, seed=3)
    return [np.asarray(image) for image in result.images]


@pytest.mark.parametrize("model", ["demo", "tiny-sd1"])
def test_bf16_images_are_within_30_db_psnr_of_fp32(model: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = tiny_sd1(tmp_path_factory).single_file if model == "tiny-sd1" else "demo"
    size = 64
    for full, half in zip(_images(path, "fp32", size), _images(path, "bf16", size), strict=True):
        assert psnr(full, half) >= 30.0


# --- runtime="auto" -----------------------------------------------------------------------


def test_auto_runtime_puts_the_unet_on_onnxruntime_on_cpu_only_where_it_can(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert auto_runtime(cpu, compilable=True).plan == {"unet": "onnxruntime"}
    assert auto_runtime(cpu, compilable=False).plan is None
    assert auto_runtime(cpu, compilable=True, memory_options=True).plan is None
    assert auto_runtime(torch.device("cuda"), compilable=True).plan is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name))
    missing = auto_runtime(cpu, compilable=True)
    assert missing.plan == {"unet": "torch_channels_last"} and "pip install 'latentrt[onnx]'" in missing.describe()


@pytest.fixture
def demo_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's engine folder shared in this test process: its UNet is exported once (~1 min)."""
    return demo_engines_dir(tmp_path_factory)


def test_auto_runtime_runs_the_demo_unet_on_onnxruntime(demo_engines: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="latentrt.core.loader"):
        auto = latentrt.load("demo", runtime="auto", engines=demo_engines, progress=False)
    assert "auto runtime: unet on onnxruntime" in caplog.text
    assert type(auto.model.denoiser.backbone).__name__ == "CompiledUNet"  # type: ignore[attr-defined]
    assert [p.name for p in demo_engines.iterdir()] != []  # the export went to the engines folder
    request = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 6, "seed": 2}
    plain = np.asarray(latentrt.load("demo", progress=False)(**request).images[0])
    assert psnr(plain, np.asarray(auto(**request).images[0])) >= 40.0
    with_memory_option = latentrt.load("demo", runtime="auto", offload="sequential", progress=False)
    assert type(with_memory_option.model.denoiser.backbone).__name__ != "CompiledUNet"  # type: ignore[attr-defined]


def test_cli_says_what_auto_picked(tmp_path: Path, demo_engines: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from latentrt.cli import main

    out = tmp_path / "a.png"
    args = ["generate", "a red circle", "--checkpoint", "demo", "--steps", "2", "--width", "64", "--height", "64"]
    options = ["--runtime", "auto", "--dtype", "auto", "--engines", str(demo_engines), "--output", str(out)]
    assert main([*args, *options]) == 0
    printed = capsys.readouterr().out
    assert "auto runtime: unet on onnxruntime" in printed and "auto: " in printed and out.exists()


def test_auto_runtime_without_onnxruntime_runs_the_unet_channels_last(monkeypatch: pytest.MonkeyPatch) -> None:
    from latentrt.runtimes.memory_format import is_channels_last

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name))
    auto = latentrt.load("demo", runtime="auto", progress=False)
    unet = auto.model.denoiser.backbone.compiled.module  # type: ignore[attr-defined]
    assert is_channels_last(unet)
    request = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 6, "seed": 2}
    plain = np.asarray(latentrt.load("demo", progress=False)(**request).images[0])
    assert psnr(plain, np.asarray(auto(**request).images[0])) >= 40.0
