"""The demo model on CUDA: the same pictures as on the CPU in fp32, and sane ones in fp16/bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentrt
from latentrt import GenerationRequest
from latentrt.plugins.demo.classify import Judgement, judge

pytestmark = pytest.mark.gpu

REQUEST = {"prompt": "a red circle on a blue background", "seed": 0, "batch_size": 8, "steps": 20}


@pytest.fixture(scope="module")
def cpu_images() -> list[np.ndarray]:
    result = latentrt.load("demo", progress=False).generate(GenerationRequest(**REQUEST))
    return [np.asarray(image, dtype=np.int16) for image in result.images]


def test_cuda_fp32_draws_what_the_cpu_draws(cpu_images: list[np.ndarray]) -> None:
    """Initial noise comes from CPU generators on both; the UNet's float rounding differs a little:
    mean difference under 1 level of 255, and the judge reads the same colour and shape."""
    result = latentrt.load("demo", device="cuda", progress=False).generate(GenerationRequest(**REQUEST))
    assert result.latents.device.type == "cuda"
    for image, reference in zip(result.images, cpu_images, strict=True):
        assert np.abs(np.asarray(image, dtype=np.int16) - reference).mean() < 1.0
        assert (judge(image).colour, judge(image).shape) == (
            judge_array(reference).colour,
            judge_array(reference).shape,
        )


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_cuda_half_precision_keeps_the_colours(cpu_images: list[np.ndarray], dtype: str) -> None:
    """fp16/bf16 weights and activations: finite latents, and at least 7 of 8 colours as in fp32."""
    result = latentrt.load("demo", device="cuda", dtype=dtype, progress=False).generate(GenerationRequest(**REQUEST))
    assert torch.isfinite(result.latents).all()
    same = sum(
        judge(image).colour == judge_array(ref).colour for image, ref in zip(result.images, cpu_images, strict=True)
    )
    assert same >= 7


def judge_array(pixels: np.ndarray) -> Judgement:
    """:func:`judge` for an image given as an array."""
    from PIL import Image

    return judge(Image.fromarray(pixels.astype(np.uint8)))
