"""Built-in sigma schedules: pure functions ``(steps, model_sampling) -> sigmas``.

Names follow ComfyUI (``comfy/samplers.py``); A1111's schedule labels
(``modules/sd_schedulers.py``) are labels or aliases. Each schedule returns ``steps + 1``
float32 sigmas, strictly decreasing, ending in 0; where ComfyUI breaks that contract
(``ddim_uniform``, ``beta``, ``kl_optimal`` at one step) the docstring says what we do
instead. Arithmetic is float64 until the final cast.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from latentrt.core.errors import InvalidRequest
from latentrt.core.hookspecs import hookimpl
from latentrt.core.protocols import ModelSampling
from latentrt.core.registry import Registry
from latentrt.core.sampling import karras_levels

__all__ = [
    "AYS_NOISE_LEVELS",
    "align_your_steps",
    "align_your_steps_sdxl",
    "align_your_steps_sigmas",
    "append_zero",
    "beta",
    "beta_ppf",
    "beta_sigmas",
    "ddim_uniform",
    "exponential",
    "exponential_sigmas",
    "karras",
    "karras_sigmas",
    "kl_optimal",
    "kl_optimal_sigmas",
    "linear_quadratic",
    "linear_quadratic_sigmas",
    "normal",
    "polyexponential",
    "polyexponential_sigmas",
    "regularized_incomplete_beta",
    "sgm_uniform",
    "simple",
]


def append_zero(sigmas: Tensor) -> Tensor:
    """``sigmas`` followed by a final 0."""
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def _finish(sigmas: Tensor | Sequence[float]) -> Tensor:
    """Noise levels (float64) plus the final 0, as float32."""
    return append_zero(torch.as_tensor(sigmas, dtype=torch.float64)).to(torch.float32)


# -- closed-form schedules between sigma_min and sigma_max (k-diffusion) ----------------


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022 eq. 5: evenly spaced in ``sigma^(1/rho)`` (k-diffusion ``get_sigmas_karras``)."""
    return _finish(karras_levels(steps, sigma_min, sigma_max, rho))


def exponential_sigmas(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Evenly spaced in ``log sigma`` (k-diffusion ``get_sigmas_exponential``)."""
    return _finish(torch.linspace(math.log(sigma_max), math.log(sigma_min), steps, dtype=torch.float64).exp())


def polyexponential_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """``log sigma`` spaced by a ramp raised to ``rho`` (k-diffusion ``get_sigmas_polyexponential``)."""
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** rho
    log_min, log_max = math.log(sigma_min), math.log(sigma_max)
    return _finish(torch.exp(ramp * (log_max - log_min) + log_min))


def kl_optimal_sigmas(steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """KL-optimal schedule (Sabour et al. 2024, Align Your Steps, https://arxiv.org/abs/2404.14507).

    ``sigma_i = tan((1 - u) atan(sigma_max) + u atan(sigma_min))`` with ``u = i / (steps - 1)``,
    as ComfyUI's ``kl_optimal_scheduler``. At one step ComfyUI divides 0 by 0 (NaN); we
    use ``u = 0``, i.e. ``[sigma_max, 0]``.
    """
    u = torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1)
    return _finish(torch.tan((1 - u) * math.atan(sigma_max) + u * math.atan(sigma_min)))


def linear_quadratic_sigmas(
    steps: int, sigma_max: float, threshold_noise: float = 0.025, linear_steps: int | None = None
) -> Tensor:
    """Mochi's linear-then-quadratic schedule, scaled by ``sigma_max`` (ComfyUI ``linear_quadratic_schedule``).

    From genmoai/models ``mochi_preview/infer.py``: the first ``linear_steps`` (default
    ``steps // 2``) noise fractions fall linearly from 1 to ``1 - threshold_noise``, the
    rest follow the quadratic that continues them with matching slope down to 0.
    """
    if steps == 1:
        return _finish([sigma_max])
    linear_steps = steps // 2 if linear_steps is None else linear_steps
    if not 0 < linear_steps < steps:
        raise InvalidRequest(f"linear_steps must be between 1 and steps - 1 = {steps - 1}, got {linear_steps}")
    quadratic_steps = steps - linear_steps
    step_diff = linear_steps - threshold_noise * steps
    quadratic_coef = step_diff / (linear_steps * quadratic_steps**2)
    linear_coef = threshold_noise / linear_steps - 2 * step_diff / quadratic_steps**2
    const = quadratic_coef * linear_steps**2
    i = torch.arange(steps, dtype=torch.float64)
    done = torch.where(
        i < linear_steps, i * threshold_noise / linear_steps, quadratic_coef * i**2 + linear_coef * i + const
    )
    return _finish((1.0 - done) * sigma_max)


def karras(steps: int, model_sampling: ModelSampling) -> Tensor:
    """Karras et al. 2022 schedule (rho = 7) between the model's sigma_min and sigma_max."""
    return karras_sigmas(steps, model_sampling.sigma_min, model_sampling.sigma_max)


def exponential(steps: int, model_sampling: ModelSampling) -> Tensor:
    """Evenly spaced in log-sigma between the model's sigma_max and sigma_min (k-diffusion)."""
    return exponential_sigmas(steps, model_sampling.sigma_min, model_sampling.sigma_max)


def polyexponential(steps: int, model_sampling: ModelSampling) -> Tensor:
    """k-diffusion's polyexponential schedule with A1111's default rho = 1 (equal to exponential)."""
    return polyexponential_sigmas(steps, model_sampling.sigma_min, model_sampling.sigma_max, rho=1.0)


def kl_optimal(steps: int, model_sampling: ModelSampling) -> Tensor:
    """KL-optimal schedule (Sabour et al. 2024): evenly spaced in ``atan(sigma)``."""
    return kl_optimal_sigmas(steps, model_sampling.sigma_min, model_sampling.sigma_max)


def linear_quadratic(steps: int, model_sampling: ModelSampling) -> Tensor:
    """Mochi's linear-quadratic schedule (threshold 0.025) times the model's sigma_max (ComfyUI)."""
    return linear_quadratic_sigmas(steps, model_sampling.sigma_max)


# -- schedules over the model's timesteps ---------------------------------------------


def _uniform_in_t(steps: int, model_sampling: ModelSampling, *, sgm: bool) -> Tensor:
    """Timesteps evenly spaced from t(sigma_max) to t(sigma_min), mapped back to sigmas."""
    start = float(model_sampling.sigma_to_t(torch.tensor(model_sampling.sigma_max, dtype=torch.float64)))
    end = float(model_sampling.sigma_to_t(torch.tensor(model_sampling.sigma_min, dtype=torch.float64)))
    t = torch.linspace(start, end, steps + 1 if sgm else steps, dtype=torch.float64)
    return _finish(model_sampling.t_to_sigma(t[:-1] if sgm else t))


def normal(steps: int, model_sampling: ModelSampling) -> Tensor:
    """``steps`` timesteps evenly spaced from t_max to t_min inclusive, then 0 (ComfyUI ``normal_scheduler``).

    The same as A1111's "Uniform" (k-diffusion ``DiscreteSchedule.get_sigmas``) and
    "Normal", and diffusers' ``timestep_spacing="linspace"`` up to its linear (not
    log-linear) interpolation of sigma between table entries.
    """
    return _uniform_in_t(steps, model_sampling, sgm=False)


def sgm_uniform(steps: int, model_sampling: ModelSampling) -> Tensor:
    """``steps + 1`` timesteps evenly spaced from t_max to t_min, last replaced by 0 (ComfyUI, SGM)."""
    return _uniform_in_t(steps, model_sampling, sgm=True)


def _sigma_table(steps: int, model_sampling: ModelSampling, name: str, *, spare: int = 0) -> Tensor:
    """The model's sigma table (float64), refusing more steps than ``len(table) - spare``.

    Schedules that pick distinct table entries cannot give more steps than there are.
    """
    table = model_sampling.sigmas.detach().to("cpu", torch.float64)
    if steps > len(table) - spare:
        raise InvalidRequest(f"the {name} schedule takes at most {len(table) - spare} steps, got {steps}")
    return table


def simple(steps: int, model_sampling: ModelSampling) -> Tensor:
    """Every ``len(table) / steps``-th trained sigma from the top, then 0 (ComfyUI ``simple_scheduler``)."""
    table = _sigma_table(steps, model_sampling, "simple")
    stride = len(table) / steps
    return _finish(table[[-(1 + int(x * stride)) for x in range(steps)]])


def ddim_uniform(steps: int, model_sampling: ModelSampling) -> Tensor:
    """Trained sigmas at timesteps ``1 + i * (len(table) // steps)``, highest first, then 0 (DDIM, Song et al. 2020).

    ComfyUI's ``ddim_scheduler`` (and A1111's "DDIM") keep every such timestep below
    ``len(table)``, which returns more than ``steps + 1`` sigmas whenever ``len(table)``
    is not a multiple of ``steps`` (7 steps give 9 sigmas). We keep the first ``steps``
    timesteps, as diffusers' ``DDIMScheduler`` (``leading`` spacing, ``steps_offset=1``)
    does; where ComfyUI honours the contract the two agree exactly.
    """
    table = _sigma_table(steps, model_sampling, "ddim_uniform", spare=1)
    stride = max(len(table) // steps, 1)
    return _finish(table[[1 + i * stride for i in reversed(range(steps))]])


# -- beta schedule (Lee et al. 2024) and the Beta distribution it needs -----------------


def _lentz_step(coef: float, c: float, d: float) -> tuple[float, float, float]:
    """One modified-Lentz update of a continued fraction: new ``c``, ``d`` and the factor."""
    tiny = 1e-300
    d = 1.0 + coef * d
    d = 1.0 / (d if abs(d) > tiny else tiny)
    c = 1.0 + coef / c
    c = c if abs(c) > tiny else tiny
    return c, d, c * d


def _incomplete_beta_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of ``I_x(a, b)`` (DLMF 8.17.22), converging fast for ``x < (a+1)/(a+b+2)``."""
    c, d, f = _lentz_step(-(a + b) * x / (a + 1.0), math.inf, 1.0)  # f = 1 / (1 + d_1), c = 1
    for m in range(1, 500):
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        c, d, factor = _lentz_step(even, c, d)
        f *= factor
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        c, d, factor = _lentz_step(odd, c, d)
        f *= factor
        if abs(factor - 1.0) < 1e-16:
            break
    return f


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """``I_x(a, b)``, the Beta(a, b) CDF at ``x``, by continued fraction (DLMF 8.17.22), float64."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below the mean
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - log_beta) / a
    return front * _incomplete_beta_fraction(x, a, b)


def beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse CDF of Beta(a, b) at ``q`` by bisection on :func:`regularized_incomplete_beta` (~1e-15)."""
    if not 0.0 <= q <= 1.0:
        raise InvalidRequest(f"a quantile must lie in [0, 1], got {q}")
    if q in (0.0, 1.0):
        return q
    if q > 0.5:  # 1 - q is exact here: solve the mirrored problem so no digits of 1 - q are lost
        return 1.0 - beta_ppf(1.0 - q, b, a)
    lo, hi = 0.0, 1.0
    for _ in range(64):  # the CDF is increasing: halve the bracket to 2**-64 or float64 resolution
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if regularized_incomplete_beta(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _strictly_decreasing(timesteps: Sequence[int], top: int) -> list[int]:
    """The nearest strictly decreasing integers in ``[0, top]``: clamp into room, then step below the previous."""
    n = len(timesteps)
    out: list[int] = []
    for i, t in enumerate(timesteps):
        t = min(max(t, n - 1 - i), top - i)
        out.append(t if not out else min(t, out[-1] - 1))
    return out


def beta_sigmas(steps: int, model_sampling: ModelSampling, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """Timesteps at Beta(alpha, beta) quantiles ``1, 1 - 1/steps, ...`` (Lee et al. 2024, arXiv:2407.12173).

    As ComfyUI's ``beta_scheduler``: ``t = rint(ppf(q) * (len(table) - 1))``, sigma read
    from the table, then 0. ComfyUI drops repeated timesteps, returning fewer than
    ``steps + 1`` sigmas at high step counts (150 steps give 150 sigmas); we instead move a
    repeat to the nearest free timestep below its predecessor (or above the timesteps
    left to place), which changes nothing where ComfyUI's timesteps are already distinct.
    A1111's "Beta" interpolates linearly in sigma instead; we follow ComfyUI.
    """
    table = _sigma_table(steps, model_sampling, "beta")
    top = len(table) - 1
    quantiles = [1.0 - i * (1.0 / steps) for i in range(steps)]
    timesteps = [round(beta_ppf(q, alpha, beta) * top) for q in quantiles]  # round half to even, as numpy.rint
    return _finish(table[_strictly_decreasing(timesteps, top)])


def beta(steps: int, model_sampling: ModelSampling) -> Tensor:
    """Beta schedule (alpha = beta = 0.6) over the model's timesteps (ComfyUI ``beta_scheduler``)."""
    return beta_sigmas(steps, model_sampling)


# -- Align Your Steps (Sabour et al. 2024, arXiv:2404.14507) ---------------------------------------------

AYS_NOISE_LEVELS: Mapping[str, tuple[float, ...]] = {
    "SD1": (14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
            0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582),
    "SDXL": (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
             0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582),
}  # fmt: skip
"""NVIDIA's optimized 10-step noise levels (11 values, the last sigma_min) per model type.

From https://research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html, at the
precision ComfyUI's ``comfy_extras/nodes_align_your_steps.py`` carries.
"""


def align_your_steps_sigmas(steps: int, model_type: str = "SD1") -> Tensor:
    """Align Your Steps noise levels for ``model_type`` ("SD1" or "SDXL"), then 0.

    As ComfyUI's ``AlignYourStepsScheduler``: the 11 published levels are resampled to
    ``steps + 1`` by linear interpolation of ``log sigma`` over evenly spaced positions,
    and the last (sigma_min) becomes 0, so 10 steps give the first 10 published levels
    and 0 (diffusers' ``AysSchedules`` too). A1111 instead resamples to ``steps`` levels
    and appends 0, so its 10 steps end ..., 0.029, 0.
    """
    levels = {k.casefold(): v for k, v in AYS_NOISE_LEVELS.items()}.get(model_type.strip().casefold())
    if levels is None:
        raise InvalidRequest(f"no Align Your Steps table for {model_type!r}; valid: {', '.join(AYS_NOISE_LEVELS)}")
    if steps + 1 == len(levels):
        return _finish(levels[:-1])
    log_levels = torch.tensor(levels, dtype=torch.float64).log()
    position = torch.linspace(0, len(levels) - 1, steps + 1, dtype=torch.float64)
    low = position.floor().long().clamp(max=len(levels) - 2)
    w = position - low
    sigmas = ((1 - w) * log_levels[low] + w * log_levels[low + 1]).exp()
    return _finish(sigmas[:-1])


def align_your_steps(steps: int, model_sampling: ModelSampling) -> Tensor:
    """NVIDIA's Align Your Steps schedule for SD 1.5 (the model's table is not consulted)."""
    return align_your_steps_sigmas(steps, "SD1")


def align_your_steps_sdxl(steps: int, model_sampling: ModelSampling) -> Tensor:
    """NVIDIA's Align Your Steps schedule for SDXL (the model's table is not consulted)."""
    return align_your_steps_sigmas(steps, "SDXL")


@hookimpl
def latentrt_register(registry: Registry) -> None:
    """Register every built-in schedule, in A1111's menu order, under ComfyUI names and A1111 labels."""
    registry.add_scheduler("normal", normal, label="Normal", aliases=["Uniform"])
    registry.add_scheduler("karras", karras, label="Karras")
    registry.add_scheduler("exponential", exponential, label="Exponential")
    registry.add_scheduler("polyexponential", polyexponential, label="Polyexponential")
    registry.add_scheduler("sgm_uniform", sgm_uniform, label="SGM Uniform", aliases=["SGMUniform"])
    registry.add_scheduler("kl_optimal", kl_optimal, label="KL Optimal")
    registry.add_scheduler("align_your_steps", align_your_steps, label="Align Your Steps")
    registry.add_scheduler("align_your_steps_sdxl", align_your_steps_sdxl, label="Align Your Steps SDXL")
    registry.add_scheduler("simple", simple, label="Simple")
    registry.add_scheduler("ddim_uniform", ddim_uniform, label="DDIM")
    registry.add_scheduler("beta", beta, label="Beta")
    registry.add_scheduler("linear_quadratic", linear_quadratic, label="Linear Quadratic")
