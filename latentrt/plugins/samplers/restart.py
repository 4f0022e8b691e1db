"""Restart sampling (Xu et al. 2023, https://arxiv.org/abs/2306.14878), as A1111's "Restart".

Heun steps on the probability-flow ODE, interrupted by restarts: on reaching a low noise
level ``sigma_min`` of a restart interval, fresh Gaussian noise lifts the latent back up to
``sigma_max`` (the paper's restart forward process) and the interval is solved again
with Heun steps, ``restart_times`` times. A restart list maps each ``sigma_min`` to
``(restart_steps, restart_times, sigma_max)`` with A1111's conventions: ``restart_steps``
counts the Karras sigmas of the interval including its ends, and both ends snap to the
nearest sigma of the main schedule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise

import torch
from torch import Tensor

from latentrt.core.errors import InvalidRequest
from latentrt.core.protocols import Conditioning, Denoiser, NoiseSource, SamplerCallback
from latentrt.core.registry import Registry
from latentrt.core.sampling import batch_sigma, host_sigmas, karras_levels, report, require_noise, to_d

RestartList = Mapping[float, Sequence[float]]
"""``{sigma_min: (restart_steps, restart_times, sigma_max)}``, as A1111's ``restart_list``."""


def _karras(n: int, sigma_min: float, sigma_max: float, like: Tensor, rho: float = 7.0) -> Tensor:
    """``n`` Karras sigmas from ``sigma_max`` to ``sigma_min`` then 0, in ``like``'s dtype."""
    sigmas = karras_levels(n, sigma_min, sigma_max, rho)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(like)


def default_restart_list(sigmas: Tensor) -> tuple[Tensor, dict[float, tuple[int, int, float]]]:
    """A1111's automatic plan: the main schedule (re-spaced) and one restart interval [0.1, 2].

    Under 20 steps there is no restart. From 20 steps, 9 of them go to one restart (from 36
    steps, ``steps // 4`` to each of two), and the main schedule becomes Karras over the
    remaining steps between the given first and last nonzero sigma, so the step count stays.
    """
    steps = len(sigmas) - 1
    if steps < 20:
        return sigmas, {}
    restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
    main = _karras(steps - restart_steps * restart_times, float(sigmas[-2]), float(sigmas[0]), sigmas)
    return main, {0.1: (restart_steps + 1, restart_times, 2.0)}


def _nearest(sigmas: Tensor, value: float) -> int:
    """Index of the sigma closest to ``value``."""
    return int(torch.argmin((sigmas - value).abs()))


def restart_plan(sigmas: Tensor, restart_list: RestartList) -> list[tuple[Tensor, Tensor]]:
    """The ``(sigma, sigma_next)`` of every Heun step: the main schedule with restart intervals spliced in."""
    restarts: dict[int, tuple[int, int, float]] = {}
    for sigma_min, entry in restart_list.items():
        if len(entry) != 3 or int(entry[0]) < 2 or int(entry[1]) < 0:
            raise InvalidRequest(
                f"restart_list entry {sigma_min}: {entry!r} must be (restart_steps >= 2, restart_times >= 0, sigma_max)"
            )
        restarts[_nearest(sigmas, float(sigma_min))] = (int(entry[0]), int(entry[1]), float(entry[2]))
    plan = []
    for i in range(len(sigmas) - 1):
        plan.append((sigmas[i], sigmas[i + 1]))
        if i + 1 not in restarts:
            continue
        restart_steps, restart_times, sigma_max = restarts[i + 1]
        max_idx = _nearest(sigmas, sigma_max)
        if max_idx < i + 1:  # the interval [sigmas[i + 1], sigmas[max_idx]] as restart_steps Karras sigmas
            interval = _karras(restart_steps, float(sigmas[i + 1]), float(sigmas[max_idx]), sigmas)[:-1]
            interval[0], interval[-1] = sigmas[max_idx], sigmas[i + 1]  # exact ends: rounding never restarts
            plan.extend(list(pairwise(interval)) * restart_times)
    return plan


def _heun_step(
    denoiser: Denoiser,
    x: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    cond: Conditioning | None,
    callback: SamplerCallback | None,
    i: int,
) -> Tensor:
    """One Heun step (Karras et al. 2022, Algorithm 1), an Euler step when landing on 0."""
    denoised = denoiser(x, batch_sigma(sigma, x), cond)
    report(callback, i, x, sigma, sigma_next, denoised)
    d = to_d(x, sigma, denoised)
    dt = sigma_next - sigma
    if sigma_next == 0:
        return x + d * dt
    x_2 = x + d * dt
    d_2 = to_d(x_2, sigma_next, denoiser(x_2, batch_sigma(sigma_next, x), cond))
    return x + (d + d_2) / 2 * dt


def sample_restart(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Conditioning | None = None,
    noise: NoiseSource | None = None,
    callback: SamplerCallback | None = None,
    s_noise: float = 1.0,
    restart_list: RestartList | None = None,
) -> Tensor:
    """Restart sampling with Heun steps (Xu et al. 2023; A1111's restart_sampler).

    ``restart_list=None`` takes A1111's automatic plan (:func:`default_restart_list`), which
    from 20 steps re-spaces the main schedule as Karras.
    """
    sigmas = host_sigmas(sigmas)  # branch and do scalar math on the host: no device syncs
    if restart_list is None:
        sigmas, restart_list = default_restart_list(sigmas)
    last_sigma: Tensor | None = None
    for i, (sigma, sigma_next) in enumerate(restart_plan(sigmas, restart_list)):
        if last_sigma is not None and last_sigma < sigma:  # restart: forward process back up to sigma
            eps = require_noise(noise, "restart")(last_sigma, sigma)
            x = x + eps * s_noise * (sigma**2 - last_sigma**2) ** 0.5
        x, last_sigma = _heun_step(denoiser, x, sigma, sigma_next, cond, callback, i), sigma_next
    return x


def register(registry: Registry) -> None:
    """Register the restart sampler."""
    registry.add_sampler("restart", sample_restart, label="Restart", noise="gaussian")


__all__ = ["RestartList", "default_restart_list", "register", "restart_plan", "sample_restart"]
