"""Seeds, initial latents and the noise that stochastic samplers inject.

Every image of a batch owns its seed and its own CPU ``torch.Generator``, so image k of
a batch is bit-identical to the same seed run alone, whatever the batch size.

* :func:`initial_noise` follows diffusers' convention (a CPU generator per image,
  ``randn`` of the per-image latent shape), so a seed gives the same starting latent as
  diffusers' pipelines with ``generator=[torch.Generator().manual_seed(s) ...]``.
* :class:`GaussianNoise` continues those generators for ancestral samplers, as
  diffusers' ancestral schedulers draw from the same generator after the initial latent.
* :class:`BrownianTreeNoise` gives SDE samplers Brownian-motion increments that are
  consistent over any subdivision of the interval (a virtual Brownian tree, Li et al.
  2020, "Scalable Gradients for Stochastic Differential Equations",
  https://arxiv.org/abs/2001.01328), so the result barely changes with step count and
  never with batch composition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from latentrt.core.errors import InvalidRequest
from latentrt.core.protocols import NoiseSource

__all__ = [
    "BrownianTree",
    "BrownianTreeNoise",
    "GaussianNoise",
    "batch_seeds",
    "initial_noise",
    "make_generators",
    "noise_for_sampler",
]

_MASK64 = (1 << 64) - 1


def batch_seeds(seed: int, batch_size: int) -> list[int]:
    """Seeds of a batch as A1111 numbers them: ``seed, seed + 1, ...``."""
    if batch_size < 1:
        raise InvalidRequest(f"batch size must be at least 1, got {batch_size}")
    return [seed + k for k in range(batch_size)]


def make_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded like ``torch.Generator().manual_seed(seed)``."""
    return [torch.Generator(device="cpu").manual_seed(_check_seed(seed)) for seed in seeds]


def _check_seed(seed: int) -> int:
    if not 0 <= seed <= _MASK64:
        raise InvalidRequest(f"seed must be an integer in 0..2**64-1, got {seed}")
    return int(seed)


def _randn_per_image(generators: Sequence[torch.Generator], shape: Sequence[int]) -> Tensor:
    """Stack fp32 ``randn(shape)`` drawn on the CPU from each generator in turn."""
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators])


def initial_noise(
    shape: Sequence[int],
    generators: Sequence[torch.Generator],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Standard-normal starting latent ``[len(generators), *shape]``, drawn on the CPU in fp32."""
    return _randn_per_image(generators, shape).to(device=device, dtype=dtype)


class GaussianNoise:
    """Independent standard-normal noise per call, from per-image generators.

    ``GaussianNoise(like, generators)`` draws ``randn`` of ``like.shape[1:]`` from each
    generator in turn and returns it with ``like``'s device and dtype.
    """

    def __init__(self, like: Tensor, generators: Sequence[torch.Generator]) -> None:
        if len(generators) != like.shape[0]:
            raise InvalidRequest(f"need one generator per image: {len(generators)} for a batch of {like.shape[0]}")
        self._like = like
        self._generators = list(generators)

    @classmethod
    def from_seeds(cls, like: Tensor, seeds: Sequence[int]) -> GaussianNoise:
        """Fresh generators from ``seeds``, one per image of ``like``."""
        return cls(like, make_generators(seeds))

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        """Fresh ``N(0, I)`` noise shaped like the latent (sigmas are ignored)."""
        noise = _randn_per_image(self._generators, self._like.shape[1:])
        return to_like(noise, self._like)


def to_like(noise: Tensor, like: Tensor) -> Tensor:
    """CPU-drawn ``noise`` in ``like``'s device and dtype; to a GPU through pinned memory without
    blocking, so the host never waits for the GPU between sampler steps."""
    if like.device.type == "cuda":
        noise = noise.pin_memory().to(like.device, non_blocking=True)
    return noise.to(device=like.device, dtype=like.dtype)


def _splitmix64(value: int) -> int:
    """One round of SplitMix64 (Steele et al. 2014): a well-mixed 64-bit hash."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


class BrownianTree:
    """A Brownian motion ``W`` on ``[t0, t1]`` with ``W(t0) = 0``, for one image.

    ``W(t1) ~ N(0, t1 - t0)`` comes from the seed; any other point is found by bisection,
    each midpoint drawn from the Brownian bridge between its interval's ends,
    ``W(m) = (W(a) + W(b)) / 2 + sqrt((b - a) / 4) * z``, with ``z`` seeded by the
    node's position in the tree. The same seed therefore gives the same path whatever
    points are asked for and in whatever order. Bisection stops at an interval of
    ``tol * (t1 - t0)`` and interpolates linearly inside it.
    """

    def __init__(
        self, seed: int, shape: Sequence[int], t0: float, t1: float, *, tol: float = 1e-6, max_cached: int = 8
    ) -> None:
        if not t1 > t0:
            raise InvalidRequest(f"a Brownian tree needs t0 < t1, got t0={t0}, t1={t1}")
        self.seed = _check_seed(seed)
        self.shape = tuple(shape)
        self.t0, self.t1 = float(t0), float(t1)
        self._min_width = tol * (self.t1 - self.t0)
        self._w1 = math.sqrt(self.t1 - self.t0) * self._normal(0)
        self._cache: dict[float, Tensor] = {}
        self._max_cached = max_cached

    def _normal(self, node: int) -> Tensor:
        """The standard-normal draw of tree node ``node`` (0: ``W(t1)``; 1: the root's midpoint)."""
        generator = torch.Generator(device="cpu").manual_seed(_splitmix64(self.seed ^ _splitmix64(node)))
        return torch.randn(self.shape, generator=generator, dtype=torch.float64)

    def __call__(self, t: float) -> Tensor:
        """``W(t)`` in float64 on the CPU; ``t`` is clamped to ``[t0, t1]``."""
        t = min(max(float(t), self.t0), self.t1)
        if t not in self._cache:
            if len(self._cache) >= self._max_cached:
                self._cache.pop(next(iter(self._cache)))
            self._cache[t] = self._walk(t)
        return self._cache[t]

    def _walk(self, t: float) -> Tensor:
        a, b = self.t0, self.t1
        w_a, w_b = torch.zeros(self.shape, dtype=torch.float64), self._w1
        node = 1
        while b - a > self._min_width:
            if t == a:
                return w_a
            if t == b:
                return w_b
            m = 0.5 * (a + b)
            w_m = 0.5 * (w_a + w_b) + math.sqrt(0.25 * (b - a)) * self._normal(node)
            if t < m:
                b, w_b, node = m, w_m, 2 * node
            else:
                a, w_a, node = m, w_m, 2 * node + 1
        return w_a + (w_b - w_a) * ((t - a) / (b - a))


class BrownianTreeNoise:
    """Normalized Brownian increments ``(W(sigma_next) - W(sigma)) / sqrt(|sigma - sigma_next|)``.

    One :class:`BrownianTree` per image over ``[sigma_min, sigma_max]``, seeded by that
    image's seed, so a batch equals its images run one by one. This is the noise the
    k-diffusion SDE samplers (``dpmpp_sde``, ``dpmpp_2m_sde``, ``dpmpp_3m_sde``) expect.
    """

    def __init__(self, like: Tensor, seeds: Sequence[int], sigma_min: float, sigma_max: float) -> None:
        if len(seeds) != like.shape[0]:
            raise InvalidRequest(f"need one seed per image: {len(seeds)} for a batch of {like.shape[0]}")
        self._like = like
        self._trees = [BrownianTree(seed, like.shape[1:], sigma_min, sigma_max) for seed in seeds]

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        """Unit-variance Brownian increment for the step ``sigma -> sigma_next``."""
        s, s_next = float(sigma), float(sigma_next)
        scale = math.sqrt(abs(s_next - s))
        if scale == 0.0:
            raise InvalidRequest(f"cannot draw a Brownian increment over an empty step at sigma {s}")
        increments = torch.stack([(tree(s_next) - tree(s)) / scale for tree in self._trees])
        return to_like(increments, self._like)


def noise_for_sampler(
    kind: str,
    like: Tensor,
    sigmas: Tensor,
    seeds: Sequence[int],
    *,
    generators: Sequence[torch.Generator] | None = None,
) -> NoiseSource | None:
    """The noise source a sampler registered with noise ``kind`` consumes, one seed per image.

    ``"none"`` -> None; ``"gaussian"`` -> :class:`GaussianNoise`, continuing
    ``generators`` when given (pass the ones that drew the initial latent, as diffusers
    does) or fresh ones from ``seeds``; ``"brownian"`` -> :class:`BrownianTreeNoise`
    over the positive sigmas (from 0 when there is only one).
    """
    if kind == "none":
        return None
    if kind == "gaussian":
        return GaussianNoise(like, generators if generators is not None else make_generators(seeds))
    if kind == "brownian":
        positive = sigmas[sigmas > 0]
        low, high = float(positive.min()), float(positive.max())
        return BrownianTreeNoise(like, seeds, low if low < high else 0.0, high)
    raise InvalidRequest(f"unknown noise kind {kind!r}; expected 'none', 'gaussian' or 'brownian'")
