"""An example latentrt plugin: the explicit midpoint sampler (2nd-order Runge-Kutta).

latentrt finds this module through the entry point in ``pyproject.toml``::

    [project.entry-points.latentrt]
    example_sampler = "latentrt_example_sampler"

and calls its ``latentrt_register`` hook once while it builds its registry. After
``pip install``, the sampler is available everywhere latentrt takes a sampler name::

    import latentrt

    spec = latentrt.registry().sampler("Euler Midpoint")  # or "euler_midpoint"
"""

from __future__ import annotations

from torch import Tensor

import latentrt
from latentrt.core.protocols import Conditioning, Denoiser, NoiseSource, SamplerCallback
from latentrt.core.registry import Registry
from latentrt.core.sampling import batch_sigma, report, to_d

__all__ = ["latentrt_register", "sample_euler_midpoint"]

__version__ = "0.1.0"


def sample_euler_midpoint(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
) -> Tensor:
    """Explicit midpoint method on the probability-flow ODE ``dx/dsigma = (x - D) / sigma``.

    Each step evaluates the slope at ``sigma``, takes a half step to the midpoint
    ``(sigma + sigma_next) / 2``, evaluates the slope there and uses it for the full step:
    two denoiser calls per step, second order. The step to ``sigma = 0`` is a plain Euler
    step (the ODE is singular at 0 and Euler's step there simply returns ``D``).

    The sampler is deterministic: it ignores ``noise``. It takes no options; a sampler
    that does declares them as extra keyword parameters with defaults (``eta: float = 1.0``),
    and latentrt checks callers' options against them.
    """
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = denoiser(x, batch_sigma(sigma, x), cond)
        report(callback, i, x, sigma, sigma_next, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)  # Euler step to 0
            continue
        sigma_mid = (sigma + sigma_next) / 2
        x_mid = x + d * (sigma_mid - sigma)
        d_mid = to_d(x_mid, sigma_mid, denoiser(x_mid, batch_sigma(sigma_mid, x_mid), cond))
        x = x + d_mid * (sigma_next - sigma)
    return x


@latentrt.hookimpl
def latentrt_register(registry: Registry) -> None:
    """Add ``euler_midpoint`` (label "Euler Midpoint") to latentrt's registry."""
    registry.add_sampler(
        "euler_midpoint",
        sample_euler_midpoint,
        label="Euler Midpoint",
        aliases=("rk2_midpoint",),
    )
