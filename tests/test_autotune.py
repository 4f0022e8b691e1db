"""``dtype="auto"`` and the bf16 quality guard: bf16 images stay within 30 dB PSNR of fp32's."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import latentrt
from latentrt.core.autotune import auto_choice, cpu_flags, native_bf16_cpu
from latentrt.core.loader import resolve_dtype
from tests.sd_fixtures import tiny_sd1

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


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two 8-bit images, in dB."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


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
