"""No host syncs inside the sampling loop: on a GPU, a sampler step must only queue kernels.

Each sampler runs under :class:`host_sync.FakeAccelerator`: the latent (and, in the ``device`` case,
the sigmas) play CUDA tensors, the pipeline's case keeps the sigmas on the host. Anything is allowed
until the first denoiser call (a sampler may read its sigmas to Python once); from then on a
device-to-host read (``item``, ``float``, ``bool``/Python ``if``, ``tolist``, ``cpu``) or a blocking
host-to-device copy raises. The watched run must also give the unwatched run's numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from host_sync import FakeAccelerator, HostSync, OnDevice, on_device
from torch import Tensor

from latentrt.core.model_sampling import sd_model_sampling
from latentrt.core.protocols import Conditioning, Denoiser, StepInfo
from latentrt.core.registry import build_registry
from latentrt.core.sampling import append_dims, batch_sigma, like_x

BUILTIN = build_registry(autoload=False).samplers

EXEMPT = {
    # adaptive step size: accepting or rejecting a step decides what runs next, on the host
    "dpm_adaptive": "adaptive step-size control decides on the host whether a step is accepted",
}
COMMON = ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "uni_pc"]
SIGMAS = torch.tensor([14.6146, 6.0, 2.5, 1.0, 0.4, 0.1, 0.0])


class GaussianDenoiser:
    """``D(x, sigma) = x / (1 + sigma^2)``: the exact denoiser for unit-Gaussian data; arms ``mode``."""

    def __init__(self, mode: FakeAccelerator | None) -> None:
        self.mode = mode
        self.model_sampling = sd_model_sampling()

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning | None = None) -> Tensor:
        if self.mode is not None:
            assert isinstance(x, OnDevice) and isinstance(sigma, OnDevice), "denoiser inputs left the device"
            self.mode.arm()
        assert sigma.shape == (x.shape[0],)
        return x / append_dims(sigma**2 + 1, x.ndim)


class SeededNoise:
    """Standard normal noise from one CPU generator, made on the device (what a device RNG would do)."""

    def __init__(self, like: Tensor, device: bool) -> None:
        self.shape, self.device = like.shape, device
        self.generator = torch.Generator().manual_seed(7)

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        noise = torch.randn(self.shape, generator=self.generator)
        return on_device(noise) if self.device else noise


def run(name: str, sigmas_on: str | None) -> Tensor:
    """Sample with ``name``; ``sigmas_on`` None: unwatched, else watched with sigmas on host/device."""
    spec = BUILTIN[name]
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * SIGMAS[0]
    steps: list[StepInfo] = []
    if sigmas_on is None:
        out = spec.sample(GaussianDenoiser(None), x, SIGMAS, noise=SeededNoise(x, False), callback=steps.append)
        return out
    mode = FakeAccelerator()
    with mode:
        sigmas = on_device(SIGMAS) if sigmas_on == "device" else SIGMAS
        start = on_device(x)
        noise = SeededNoise(start, True)
        out = spec.sample(GaussianDenoiser(mode), start, sigmas, noise=noise, callback=steps.append)
    assert mode.armed, "the denoiser was never called"
    assert isinstance(out, OnDevice), "the result left the device"
    return out.as_subclass(Tensor)


@pytest.mark.parametrize("sigmas_on", ["host", "device"])
@pytest.mark.parametrize("name", sorted(set(BUILTIN) - set(EXEMPT)))
def test_no_host_sync_inside_the_sampling_loop(name: str, sigmas_on: str) -> None:
    got = run(name, sigmas_on)
    torch.testing.assert_close(got, run(name, None), rtol=0, atol=0)


def test_the_common_samplers_are_covered() -> None:
    assert set(COMMON) <= set(BUILTIN) - set(EXEMPT)


@pytest.mark.parametrize("name", sorted(EXEMPT))
def test_exempt_samplers_do_sync(name: str) -> None:
    """The exemptions are real: these samplers need the host between steps."""
    with pytest.raises(HostSync):
        run(name, "device")


def _watched(fn: Callable[[], Any]) -> Any:
    mode = FakeAccelerator()
    with mode:
        mode.arm()
        return fn()


def test_the_fake_accelerator_catches_the_usual_syncs() -> None:
    x = on_device(torch.ones(2))
    checks: list[Callable[[], Any]] = [
        lambda: x.sum().item(),
        lambda: float(x[0]),
        lambda: bool(x[0] > 0),
        lambda: x.tolist(),
        lambda: x.cpu(),
        lambda: x.to("cpu"),
        lambda: torch.ones(2).to(x.device),
        lambda: torch.tensor([1.0], device=x.device),
    ]
    for check in checks:
        with pytest.raises(HostSync):
            _watched(check)
    assert isinstance(_watched(lambda: torch.full((2,), 1.0, device=x.device) * x), OnDevice)  # a kernel launch


def test_sigma_helpers_do_not_copy_host_scalars_to_the_device() -> None:
    """``batch_sigma``/``like_x`` fill device tensors from host scalars instead of copying (a sync)."""
    x = on_device(torch.ones(3, 4, 2, 2, dtype=torch.float16))
    sigma = torch.tensor(14.6146, dtype=torch.float64)
    batched = _watched(lambda: batch_sigma(sigma, x))
    coefficient = _watched(lambda: like_x(sigma, x))
    assert isinstance(batched, OnDevice) and batched.dtype == torch.float32 and batched.shape == (3,)
    assert torch.equal(batched.as_subclass(Tensor), sigma.float().expand(3))
    assert coefficient.dtype == torch.float16 and float(coefficient.as_subclass(Tensor)) == float(sigma.half())


# --- the pieces around the samplers (files outside this change; see the reasons) -----------------------


def _backbone(sample: Tensor, timestep: Tensor, context: Tensor, **extra: Tensor) -> Tensor:
    return sample * 0.1 + append_dims(timestep, sample.ndim) * 1e-4


def _gaussian(x: Tensor, sigma: Tensor, cond: Conditioning | None = None) -> Tensor:
    return x / append_dims(sigma**2 + 1, x.ndim)


def _run_pipeline_like(inner: str, rescale: float | None = None, noise: str | None = None) -> None:
    """Euler (ancestral, or DPM++ 2M SDE, with ``noise``) over CFG and the ``inner`` denoiser
    (``discrete``: the SD denoiser over a stub backbone; ``gaussian``: a formula), as the pipeline wires them."""
    from latentrt.core.denoiser import DiscreteDenoiser
    from latentrt.core.guidance import CFGDenoiser
    from latentrt.core.noise import noise_for_sampler

    mode = FakeAccelerator()
    with mode:
        denoiser = DiscreteDenoiser(_backbone, sd_model_sampling()) if inner == "discrete" else _gaussian
        cond, uncond = (Conditioning(on_device(torch.randn(1, 77, 8))) for _ in range(2))
        scale = on_device(torch.full((1,), 7.0))
        weights = None if rescale is None else on_device(torch.full((1,), rescale))
        cfg = CFGDenoiser(denoiser, cond, uncond, scale, weights)  # type: ignore[arg-type]
        x = on_device(torch.randn(1, 4, 8, 8) * SIGMAS[0])
        source = None if noise is None else noise_for_sampler(noise, x, SIGMAS, [1])
        name = "euler" if noise is None else {"gaussian": "euler_ancestral", "brownian": "dpmpp_2m_sde"}[noise]

        def armed(x: Tensor, sigma: Tensor, cond: Conditioning | None = None) -> Tensor:
            out = cfg(x, sigma, cond)
            mode.arm()  # after the first call: one-off setup inside it (a table moved once) is allowed
            return out

        BUILTIN[name].sample(cast(Denoiser, armed), x, SIGMAS, noise=source)


def test_cfg_without_rescale_has_no_host_sync() -> None:
    _run_pipeline_like("gaussian")


def test_discrete_denoiser_under_cfg_has_no_host_sync() -> None:
    _run_pipeline_like("discrete")


def test_guidance_rescale_has_no_host_sync() -> None:
    _run_pipeline_like("gaussian", rescale=0.7)


@pytest.mark.parametrize("noise", ["gaussian", "brownian"])
def test_noise_sources_have_no_host_sync(noise: str) -> None:
    _run_pipeline_like("gaussian", noise=noise)
