"""Every sampler on a CUDA device: device, dtype (incl. fp16/bf16) and shape preserved.

Noise sources draw on the CPU (per-image generators, as diffusers does) and move the
noise to the latent's device; these tests prove nothing falls back to the CPU or
breaks in reduced precision. Skipped where no GPU is present.
"""

from __future__ import annotations

import pytest
import torch

from latentrt.core.noise import noise_for_sampler
from latentrt.core.registry import build_registry
from latentrt.testing import GaussianTarget, check_preserves_tensor, run_sampler

BUILTIN = build_registry(autoload=False).samplers

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("name", sorted(BUILTIN))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sampler_keeps_cuda_device_and_dtype(name: str, dtype: torch.dtype) -> None:
    check_preserves_tensor(BUILTIN[name], dtype, device="cuda")


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_cuda_matches_cpu_in_float64(name: str) -> None:
    """Same seeds on CPU and GPU give the same samples (float64, 1e-8)."""
    spec, target = BUILTIN[name], GaussianTarget()
    sigmas = torch.tensor([10.0, 4.0, 1.5, 0.5, 0.1, 0.0], dtype=torch.float64)
    cpu = run_sampler(spec, target, sigmas, batch=2)
    x = torch.cat([target.start((1, 1, 8, 8), 10.0, seed=s) for s in (0, 1)]).cuda()
    noise = noise_for_sampler(spec.noise, x, sigmas.cuda(), [1000, 1001])
    gpu = spec.sample(target.denoiser(), x, sigmas.cuda(), noise=noise)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-8)
