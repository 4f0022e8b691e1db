"""Classifier-free guidance: a denoiser -> denoiser wrapper (Ho & Salimans 2022).

The conditional and unconditional halves run in one batched backbone call
(``Conditioning.cat``). Guidance is applied to the noise prediction
``eps = (x - x0) / sigma``, as diffusers does, so ``guidance_rescale`` (Lin et al. 2023,
"Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16,
https://arxiv.org/abs/2305.08891) gives the same numbers as diffusers' pipelines. For
plain CFG the two spaces agree: ``x0`` is affine in ``eps`` at a given sigma.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from latentrt.core.errors import InvalidRequest
from latentrt.core.protocols import Conditioning, Denoiser, ModelSampling
from latentrt.core.sampling import append_dims

__all__ = ["CFGDenoiser", "rescale_guidance"]


def rescale_guidance(eps_cfg: Tensor, eps_cond: Tensor, rescale: Tensor) -> Tensor:
    """Lin et al. 2023 eq. 15-16: match the guided prediction's std to the conditional one's, per image."""
    dims = list(range(1, eps_cfg.ndim))
    ratio = eps_cond.std(dim=dims, keepdim=True) / eps_cfg.std(dim=dims, keepdim=True)
    rescale = append_dims(rescale, eps_cfg.ndim)
    return rescale * (eps_cfg * ratio) + (1 - rescale) * eps_cfg


@dataclass
class CFGDenoiser:
    """``D(x) = D_u + scale * (D_c - D_u)``, per image, with the negative prompt as ``uncond``.

    ``scale`` and ``rescale`` are per-image ``[batch]`` tensors (requests batched together
    keep their own CFG scales); images whose scale is 1 still share the batched call.
    ``cond``/``uncond`` are the batch's conditionings; the ``cond`` argument of each call
    is ignored.
    """

    inner: Denoiser
    cond: Conditioning
    uncond: Conditioning | None
    scale: Tensor
    rescale: Tensor | None = None

    def __post_init__(self) -> None:
        batch = self.cond.batch_size
        if self.uncond is not None and self.uncond.batch_size != batch:
            raise InvalidRequest(f"negative conditioning has batch {self.uncond.batch_size}, prompts have {batch}")
        if self.scale.shape != (batch,):
            raise InvalidRequest(f"CFG scale must have one value per image ({batch}), got {tuple(self.scale.shape)}")
        self._both = None if self.uncond is None else Conditioning.cat([self.cond, self.uncond])
        self._rescaled = self.rescale is not None and bool((self.rescale > 0).any())  # once, not per step

    @property
    def model_sampling(self) -> ModelSampling:
        """The wrapped denoiser's model sampling."""
        return self.inner.model_sampling

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning | None = None) -> Tensor:
        """Guided ``x0`` from one backbone call on ``[x; x]`` with ``[cond; uncond]``."""
        if self._both is None:
            return self.inner(x, sigma, self.cond)
        both = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), self._both)
        x0_cond, x0_uncond = both.chunk(2)
        s = append_dims(sigma.to(x.dtype), x.ndim)
        eps_cond, eps_uncond = (x - x0_cond) / s, (x - x0_uncond) / s
        eps = eps_uncond + append_dims(self.scale.to(x), x.ndim) * (eps_cond - eps_uncond)
        if self._rescaled and self.rescale is not None:
            eps = rescale_guidance(eps, eps_cond, self.rescale.to(x))
        return x - s * eps
