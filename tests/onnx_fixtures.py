"""The tiny SD1 fixture exported to ONNX once per test session, and small helpers the ONNX tests share.

``TinyConv`` / ``conv_component`` is a one-convolution stand-in component that exports in seconds,
for the runtime and engine-cache tests that need an export but not a diffusion model.

Exporting the four components of the tiny model takes about a minute on two busy cores, so
``tiny_sd1_engines`` builds them once (cached in this process, like ``sd_fixtures.tiny_sd1``) for
sizes 64..128 pixels and two images per request; the tests reuse that engine cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from sd_fixtures import TinySD, psnr, tiny_sd1
from torch import Tensor, nn

import latentrt
from latentrt.core.pipeline import Pipeline
from latentrt.core.protocols import CompileRequest, ExportSpec, RuntimeComponent, ShapeLimits

__all__ = [
    "LIMITS",
    "TinyConv",
    "TinyEngines",
    "compile_request",
    "conv_component",
    "conv_spec",
    "psnr",
    "demo_engines_dir",
    "tiny_sd1_engines",
]

LIMITS = ShapeLimits(min_size=64, max_size=128, max_batch=2)
"""Sizes 64..128 pixels, two images per request (UNet and text encoder batch 1..4)."""


@dataclass(frozen=True)
class TinyEngines:
    """The tiny SD1 model, its engine cache folder, and the pipelines on torch and on ONNX Runtime."""

    model: TinySD
    engines: Path
    torch: Pipeline
    onnx: Pipeline


_BUILT: dict[str, TinyEngines] = {}


_DEMO_ENGINES: list[Path] = []


def demo_engines_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One engine folder for the demo model's exports in this test process: a demo UNet export takes
    about a minute, and every test that loads the demo with the default limits shares it."""
    if not _DEMO_ENGINES:
        _DEMO_ENGINES.append(tmp_path_factory.mktemp("demo-engines"))
    return _DEMO_ENGINES[0]


def tiny_sd1_engines(tmp_path_factory: pytest.TempPathFactory) -> TinyEngines:
    """The tiny SD1 single file loaded on torch and on ONNX Runtime (all components), built once."""
    if "sd1" not in _BUILT:
        model = tiny_sd1(tmp_path_factory)
        engines = tmp_path_factory.mktemp("engines")
        onnx = latentrt.load(model.single_file, runtime="onnxruntime", engines=engines, limits=LIMITS, progress=False)
        _BUILT["sd1"] = TinyEngines(model, engines, latentrt.load(model.single_file, progress=False), onnx)
    return _BUILT["sd1"]


class TinyConv(nn.Module):
    """A latent -> image stand-in: one 3x3 conv and a nearest x2 upsample (exports in seconds)."""

    def __init__(self, seed: int = 0, gain: float = 1.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(4, 3, 3, padding=1)
        self.gain = gain

    def forward(self, latent: Tensor) -> Tensor:
        """``upsample(conv(latent)) * gain``."""
        out: Tensor = F.interpolate(self.conv(latent), scale_factor=2.0, mode="nearest") * self.gain
        return out


def conv_spec(name: str = "vae_decoder", sizes: tuple[int, int, int] = (16, 32, 64)) -> ExportSpec:
    """``latent [batch, 4, h/2, w/2] -> images [batch, 3, h, w]``, batch 1..2, sides in ``sizes``."""

    def sample_inputs(dims: Mapping[str, int]) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(1)
        return {"latent": torch.randn(dims["batch"], 4, dims["height"] // 2, dims["width"] // 2, generator=generator)}

    axes = {0: "batch", 2: "height", 3: "width"}
    return ExportSpec(
        name=name,
        input_names=("latent",),
        output_names=("images",),
        input_dtypes={"latent": torch.float32},
        dynamic_axes={"latent": axes, "images": axes},
        shape_range={"batch": (1, 1, 2), "height": sizes, "width": sizes},
        sample_inputs=sample_inputs,
        pixel_scale={"latent": 2},
    )


def conv_component(name: str = "vae_decoder", *, seed: int = 0, gain: float = 1.0) -> RuntimeComponent:
    """A :class:`TinyConv` as a runtime component whose install does nothing."""
    return RuntimeComponent(name, TinyConv(seed, gain), conv_spec(name), lambda compiled: None)


def compile_request(
    component: RuntimeComponent, weights: Path, engines: Path, precision: str = "fp32"
) -> CompileRequest:
    """A CPU compile request for ``component`` with its cache key hashing ``weights``."""
    return CompileRequest(component, weights, precision, torch.device("cpu"), engines, progress=False)
