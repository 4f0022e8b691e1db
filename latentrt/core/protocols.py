"""The contracts every component of latentrt is written against (DESIGN.md section 2).

Conventions follow k-diffusion (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", https://arxiv.org/abs/2206.00364):

* a noisy latent is ``x = x0 + sigma * eps``;
* a :class:`Denoiser` maps ``(x, sigma, cond)`` to its estimate of ``x0``;
* a :class:`Sampler` integrates from ``sigmas[0]`` down to ``sigmas[-1] == 0``;
* a :class:`Scheduler` is a pure function ``(steps, model_sampling) -> sigmas``.

Only ``torch`` and the core's errors are imported here: the core knows nothing about plugins or runtimes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from latentrt.core.errors import InvalidRequest

__all__ = [
    "VAE",
    "Artifact",
    "ArtifactRuntime",
    "CompileRequest",
    "CompiledModule",
    "Conditioning",
    "Denoiser",
    "ExportSpec",
    "Exporter",
    "ModelSampling",
    "NoiseSource",
    "Runtime",
    "RuntimeComponent",
    "Sampler",
    "SamplerCallback",
    "Scheduler",
    "ShapeLimits",
    "StepInfo",
    "TextEncoder",
]


@dataclass(frozen=True)
class Conditioning:
    """What a text encoder hands the denoiser, batched along dim 0.

    ``context`` is the cross-attention input ``[batch, tokens, channels]``; ``pooled``
    the pooled text embedding (SDXL ``text_embeds``); ``extra`` any further per-image
    tensors the backbone takes (SDXL ``time_ids``). Conditionings concatenate along the
    batch so classifier-free guidance runs the conditional and unconditional halves in
    one backbone call.
    """

    context: Tensor
    pooled: Tensor | None = None
    extra: Mapping[str, Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        """Number of images this conditioning describes."""
        return int(self.context.shape[0])

    def tensors(self) -> dict[str, Tensor]:
        """All tensors by name (``context``, ``pooled`` when present, then ``extra``)."""
        named = {"context": self.context}
        if self.pooled is not None:
            named["pooled"] = self.pooled
        named.update(self.extra)
        return named

    def map(self, fn: Callable[[Tensor], Tensor]) -> Conditioning:
        """Apply ``fn`` to every tensor (e.g. ``.to(device)``, ``.repeat(...)``)."""
        return Conditioning(
            context=fn(self.context),
            pooled=None if self.pooled is None else fn(self.pooled),
            extra={name: fn(t) for name, t in self.extra.items()},
        )

    def select(self, index: slice | Tensor) -> Conditioning:
        """The conditioning of a subset of the batch."""
        return self.map(lambda t: t[index])

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Concatenate conditionings along the batch; all must carry the same tensors.

        Contexts of different token lengths (long prompts chunked differently) are
        padded to the longest by repeating their own chunks, as A1111 does.
        """
        if not parts:
            raise ValueError("Conditioning.cat needs at least one conditioning")
        first = parts[0]
        names = set(first.extra)
        if any(set(p.extra) != names or (p.pooled is None) != (first.pooled is None) for p in parts):
            raise ValueError("cannot concatenate conditionings that carry different tensors")
        longest = max(p.context.shape[1] for p in parts)
        return Conditioning(
            context=torch.cat([_repeat_tokens(p.context, longest) for p in parts]),
            pooled=None if first.pooled is None else torch.cat([p.pooled for p in parts]),  # type: ignore[misc]
            extra={name: torch.cat([p.extra[name] for p in parts]) for name in sorted(names)},
        )

    def with_extra(self, **extra: Tensor) -> Conditioning:
        """A copy with ``extra`` tensors added or replaced."""
        return replace(self, extra={**self.extra, **extra})


def _repeat_tokens(context: Tensor, length: int) -> Tensor:
    """Repeat a ``[batch, tokens, channels]`` context along tokens up to ``length``."""
    tokens = context.shape[1]
    if tokens == length:
        return context
    if length % tokens:
        raise ValueError(f"cannot pad a context of {tokens} tokens to {length} tokens")
    return context.repeat(1, length // tokens, 1)


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports to its callback after each step.

    ``x`` is the latent step ``i`` started from (k-diffusion's convention), ``denoised``
    the model's ``x0`` estimate at ``sigma``; ``sigma_next`` is where the step lands.
    """

    i: int
    x: Tensor
    sigma: Tensor
    sigma_next: Tensor
    denoised: Tensor


SamplerCallback = Callable[[StepInfo], None]


@runtime_checkable
class ModelSampling(Protocol):
    """How a model's discrete timesteps relate to noise levels sigma."""

    @property
    def sigma_min(self) -> float:
        """Smallest sigma the model was trained on."""
        ...

    @property
    def sigma_max(self) -> float:
        """Largest sigma the model was trained on."""
        ...

    @property
    def sigmas(self) -> Tensor:
        """The discrete sigma table, increasing, one entry per training timestep."""
        ...

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep for ``sigma`` (interpolated in log-sigma)."""
        ...

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Sigma at continuous timestep ``t`` (interpolated in log-sigma)."""
        ...


@runtime_checkable
class Denoiser(Protocol):
    """``denoiser(x, sigma, cond) -> x0``; ``sigma`` has shape ``[batch]``."""

    @property
    def model_sampling(self) -> ModelSampling:
        """The noise levels the model was trained on."""
        ...

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning | None) -> Tensor:
        """Estimate the clean latent ``x0`` from ``x = x0 + sigma * eps``."""
        ...


@runtime_checkable
class NoiseSource(Protocol):
    """Fresh standard-normal noise for the step ``sigma -> sigma_next``, shaped like x.

    Built from per-image seeds, so image k of a batch receives the same noise as the
    same seed run alone.
    """

    def __call__(self, sigma: Tensor, sigma_next: Tensor) -> Tensor:
        """Noise for one step; unit variance per element."""
        ...


class Sampler(Protocol):
    """``fn(denoiser, x, sigmas, *, cond, noise, callback, **options) -> x0``.

    ``sigmas`` is decreasing and ends with 0; ``x`` is already scaled to ``sigmas[0]``.
    A sampler that injects noise raises :class:`~latentrt.core.errors.InvalidRequest`
    when ``noise`` is None.
    """

    def __call__(
        self,
        denoiser: Denoiser,
        x: Tensor,
        sigmas: Tensor,
        *,
        cond: Conditioning | None = None,
        noise: NoiseSource | None = None,
        callback: SamplerCallback | None = None,
        **options: Any,
    ) -> Tensor:
        """Run the sampler and return the final latent."""
        ...


class Scheduler(Protocol):
    """``fn(steps, model_sampling) -> sigmas``: ``steps + 1`` decreasing sigmas ending in 0."""

    def __call__(self, steps: int, model_sampling: ModelSampling) -> Tensor:
        """Noise levels for a sampling run of ``steps`` steps."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    """Prompts -> :class:`Conditioning`; owns its tokenizer, weighting and clip skip."""

    def encode(self, prompts: Sequence[str], *, clip_skip: int = 1) -> Conditioning:
        """Encode a batch of prompts (A1111 weighting syntax, long prompts chunked)."""
        ...


@runtime_checkable
class VAE(Protocol):
    """Images in ``[-1, 1]`` to scaled latents and back."""

    scaling_factor: float
    shift_factor: float
    latent_channels: int
    downscale: int

    def encode(self, images: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
        """``[b, 3, H, W]`` images -> ``[b, c, H/d, W/d]`` scaled latents.

        The posterior mean without ``generator``; a posterior sample drawn from it (one
        generator per image, as diffusers' ``latent_dist.sample``) with one.
        """
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in ``[-1, 1]``."""
        ...


@dataclass(frozen=True)
class ExportSpec:
    """The exportable contract of a backbone (DESIGN.md section 4).

    ``dynamic_axes`` maps each tensor name to ``{axis: symbolic name}``; ``shape_range``
    maps each symbolic name (``batch``, ``height``, ``width``) to ``(min, opt, max)``.
    Sizes in ``shape_range`` are image pixels: ``pixel_scale`` says how many pixels one
    element of a tensor covers along its non-batch dynamic axes (8 for SD latents; tensors
    not listed count 1). Symbolic names without a range (``tokens``) are unbounded.
    """

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    input_dtypes: Mapping[str, torch.dtype]
    dynamic_axes: Mapping[str, Mapping[int, str]]
    shape_range: Mapping[str, tuple[int, int, int]]
    sample_inputs: Callable[[Mapping[str, int]], dict[str, Tensor]] | None = None
    pixel_scale: Mapping[str, int] = field(default_factory=dict)

    def describe_range(self) -> str:
        """The shape range as ``batch 1..4, height 64..1024`` for error messages."""
        return ", ".join(f"{k} {lo}..{hi}" for k, (lo, _, hi) in self.shape_range.items())

    def axis_size(self, tensor: str, axis: int, length: int) -> int:
        """``length`` of ``tensor``'s ``axis`` in the units of ``shape_range`` (pixels for spatial axes)."""
        symbol = self.dynamic_axes.get(tensor, {}).get(axis)
        return length if symbol in (None, "batch") else length * self.pixel_scale.get(tensor, 1)

    def check_feeds(self, feeds: Mapping[str, Tensor]) -> None:
        """Refuse feeds with missing or unknown names, or sizes outside ``shape_range``, before running."""
        missing = [n for n in self.input_names if n not in feeds]
        unknown = [n for n in feeds if n not in self.input_names]
        if missing or unknown:
            raise InvalidRequest(
                f"{self.name} takes inputs {', '.join(self.input_names)}; "
                f"missing: {', '.join(missing) or 'none'}, unknown: {', '.join(unknown) or 'none'}"
            )
        for name in self.input_names:
            shape = tuple(feeds[name].shape)
            for axis, symbol in self.dynamic_axes.get(name, {}).items():
                if symbol not in self.shape_range:
                    continue
                if axis >= len(shape):
                    raise InvalidRequest(f"{self.name}: input {name} has shape {list(shape)}, no axis {axis}")
                lo, _, hi = self.shape_range[symbol]
                size = self.axis_size(name, axis, shape[axis])
                if not lo <= size <= hi:
                    raise InvalidRequest(
                        f"{self.name}: {symbol} {size} is outside the range it was compiled for "
                        f"({self.describe_range()}); compile it again for a wider range "
                        "(latentrt export --min-size/--max-size/--max-batch)"
                    )


@dataclass(frozen=True)
class Artifact:
    """What an exporter produced: files in ``directory`` and the manifest describing them."""

    directory: Path
    files: tuple[str, ...]
    spec: ExportSpec
    manifest: Mapping[str, Any]


@runtime_checkable
class CompiledModule(Protocol):
    """A backbone behind a runtime: named tensors in, named tensors out."""

    spec: ExportSpec

    def __call__(self, feeds: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Run once; refuses inputs outside ``spec.shape_range`` before running."""
        ...


class Exporter(Protocol):
    """Compiles a backbone into an :class:`Artifact`.

    ``backbone`` takes the spec's inputs positionally, in ``spec.input_names`` order, and
    returns its outputs in ``spec.output_names`` order (one tensor or a tuple).
    """

    name: str

    def version(self) -> str:
        """Versions of everything that shapes the exported files (part of the engine-cache key)."""
        ...

    def export(
        self,
        backbone: torch.nn.Module,
        spec: ExportSpec,
        out_dir: Path,
        precision: str,
        *,
        metadata: Mapping[str, Any] | None = None,
    ) -> Artifact:
        """Export, validate against torch, and write the manifest (``metadata`` is copied into it)."""
        ...


@dataclass(frozen=True)
class ShapeLimits:
    """Image sizes (pixels) and images per request a compiled model accepts.

    ``None`` sizes take the model family's default range; components that see the
    conditional and unconditional halves together (UNet, text encoder) get twice the batch.
    """

    min_size: int | None = None
    max_size: int | None = None
    max_batch: int = 4


@dataclass(frozen=True)
class RuntimeComponent:
    """A part of a loaded model that a runtime can take over (UNet, VAE decoder, text encoder, ...).

    ``module`` follows the :class:`Exporter` calling convention for ``spec``; ``install`` puts a
    compiled module into the model in place of the torch one, as a drop-in with the same call
    signature. ``source`` says which weights file the component comes from (``"checkpoint"``, or
    ``"vae"`` for a VAE loaded from a separate file): its content hash keys the engine cache.
    """

    name: str
    module: torch.nn.Module
    spec: ExportSpec
    install: Callable[[CompiledModule], None]
    source: str = "checkpoint"


@dataclass(frozen=True)
class CompileRequest:
    """What a runtime needs to compile one component: the component, where its weights came from,
    the precision and device, and the engine cache (``None``: ``$LATENTRT_CACHE`` or the default)."""

    component: RuntimeComponent
    weights: Path
    precision: str
    device: torch.device
    engines: Path | None = None
    progress: bool = True


@runtime_checkable
class Runtime(Protocol):
    """Turns model components into :class:`CompiledModule` objects."""

    name: str

    def available(self) -> bool:
        """Whether this runtime can run on this machine now."""
        ...

    def version(self) -> str:
        """The runtime's version (part of the engine-cache key)."""
        ...

    def compile(self, request: CompileRequest) -> CompiledModule:
        """A compiled module for ``request.component``: built, or reused from the engine cache."""
        ...


@runtime_checkable
class ArtifactRuntime(Runtime, Protocol):
    """A runtime that runs exported files: ``exporter`` names the exporter that writes them."""

    exporter: str

    def load(self, artifact: Artifact, device: torch.device) -> CompiledModule:
        """Deserialize ``artifact`` onto ``device``."""
        ...
