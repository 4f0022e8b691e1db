"""prompt -> conditioning -> sampling loop -> decode, for txt2img, img2img and inpainting.

Family-agnostic: a model family's loader hands over a :class:`Model` (text encoder,
denoiser over its backbone, VAE); the pipeline never asks which family or runtime runs.
It keeps no per-request state, so one instance serves many threads.

Random draws follow diffusers' pipelines so a seed gives the same image: one CPU
generator per image (seed + k). img2img draws the VAE posterior sample, then the noise;
inpainting draws the image's posterior sample (except for a 9-channel model at strength
1), the noise, then the masked image's posterior sample; ancestral and SDE samplers
continue from there.
"""

from __future__ import annotations

import copy
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn
from tqdm import tqdm

from latentrt._version import __version__
from latentrt.core.errors import InvalidRequest, LatentRTError
from latentrt.core.guidance import CFGDenoiser
from latentrt.core.memory import return_freed_heap
from latentrt.core.noise import initial_noise, make_generators, noise_for_sampler
from latentrt.core.parameters import Parameters, format_parameters
from latentrt.core.protocols import (
    VAE,
    Conditioning,
    Denoiser,
    ModelSampling,
    RuntimeComponent,
    ShapeLimits,
    StepInfo,
    TextEncoder,
)
from latentrt.core.registry import Registry, SamplerSpec, registry
from latentrt.core.request import GenerationRequest, resolve_seed

__all__ = [
    "GenerationCancelled",
    "GenerationResult",
    "Model",
    "Pipeline",
    "decode_finite",
    "image_to_tensor",
    "mask_to_tensor",
    "tensor_to_images",
]

logger = logging.getLogger(__name__)


class GenerationCancelled(LatentRTError):
    """The request was cancelled between two sampling steps."""


@dataclass
class Model:
    """Everything a pipeline needs from a loaded model, whatever its family or runtime.

    ``extra_conditioning(request, width, height, negative)`` adds family-specific tensors
    to the conditioning (SDXL's size and aesthetic ids; ``negative`` asks for the
    unconditional side's). ``zero_empty_negative`` makes an empty negative prompt an
    all-zero conditioning (SDXL's ``force_zeros_for_empty_prompt``). ``inpainting`` marks
    9-channel UNets, which receive the latent mask and masked image through
    ``Conditioning.extra["c_concat"]``. ``runtime_components(limits)`` lists the parts a runtime
    other than eager torch can take over (None: the model runs on torch only); the loader
    installs what a runtime compiles in their place, so the pipeline never sees which runtime runs.
    """

    family: str
    text_encoder: TextEncoder
    denoiser: Denoiser
    vae: VAE
    name: str
    default_size: int = 512
    inpainting: bool = False
    model_hash: Callable[[], str | None] = lambda: None
    vae_name: str | None = None
    vae_hash: Callable[[], str | None] = lambda: None
    extra_conditioning: Callable[[GenerationRequest, int, int, bool], dict[str, Tensor]] | None = None
    zero_empty_negative: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    runtime_components: Callable[[ShapeLimits], dict[str, RuntimeComponent]] | None = None


@dataclass
class GenerationResult:
    """Images with their A1111 parameters text and seeds, and the final latents."""

    images: list[Image.Image]
    parameters: list[str]
    seeds: list[int]
    latents: Tensor


def image_to_tensor(image: Image.Image, width: int, height: int) -> Tensor:
    """PIL image -> ``[1, 3, H, W]`` in ``[-1, 1]``, resized (Lanczos) when the size differs."""
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return data.permute(2, 0, 1).unsqueeze(0).to(torch.float32) / 127.5 - 1.0


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> Tensor:
    """PIL mask -> ``[1, 1, H, W]`` in ``{0, 1}`` (white = repaint), binarized at 0.5 like diffusers."""
    mask = mask.convert("L")
    if mask.size != (width, height):
        mask = mask.resize((width, height), Image.Resampling.LANCZOS)
    data = torch.frombuffer(bytearray(mask.tobytes()), dtype=torch.uint8).reshape(1, 1, height, width)
    return (data.to(torch.float32) / 255.0 >= 0.5).to(torch.float32)


def tensor_to_images(images: Tensor) -> list[Image.Image]:
    """``[b, 3, H, W]`` in ``[-1, 1]`` -> PIL images, rounded like diffusers' ``numpy_to_pil``."""
    pixels = ((images.detach().float().cpu() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(p.permute(1, 2, 0).contiguous().numpy(), mode="RGB") for p in pixels]


def decode_finite(vae: VAE, latents: Tensor) -> Tensor:
    """``vae.decode(latents)``, rerun in float32 when a reduced-precision result has NaN/inf.

    The SDXL VAE overflows in fp16 and decodes to black (REFERENCE.md); this reruns the
    decode on a float32 copy of the module (the shared module is untouched, so other
    threads are unaffected). Never returns non-finite images: raises instead.
    """
    images = vae.decode(latents)
    if bool(torch.isfinite(images).all()):
        return images
    if images.dtype not in (torch.float16, torch.bfloat16) or not isinstance(vae, nn.Module):
        raise LatentRTError(_nonfinite_message(images, latents))
    logger.warning("VAE decode in %s produced NaN/inf; rerunning it in float32", images.dtype)
    upcast: Any = copy.deepcopy(vae).float()
    images = upcast.decode(latents.float())
    assert isinstance(images, Tensor)
    if not bool(torch.isfinite(images).all()):
        raise LatentRTError(_nonfinite_message(images, latents))
    return images


def _nonfinite_message(images: Tensor, latents: Tensor) -> str:
    bad = int((~torch.isfinite(latents)).sum())
    hint = "the sampler diverged: try another sampler, a lower CFG scale, or float32" if bad else "run it in float32"
    return (
        f"VAE decode produced {int((~torch.isfinite(images)).sum())} NaN/inf values in {images.dtype} "
        f"({bad} non-finite latent values); {hint}"
    )


@dataclass
class _Inpaint:
    """Latent blending for ordinary (4-channel) models: outside the mask, the model sees the
    init latent noised to the current sigma and predicts it exactly (ComfyUI's KSamplerX0Inpaint;
    for deterministic samplers identical to diffusers' blend after each step).

    At strength 1 diffusers starts from pure noise everywhere and blends only after the first
    step: ``unblended_from`` (the first sigma) keeps calls at or above it unblended.
    """

    inner: Denoiser
    latent: Tensor
    noise: Tensor
    keep: Tensor  # 1 where the init image is kept
    unblended_from: float | None = None

    @property
    def model_sampling(self) -> ModelSampling:
        """The wrapped denoiser's model sampling."""
        return self.inner.model_sampling

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning | None) -> Tensor:
        """Blend the input with the noised init latent, and the output with the init latent."""
        dims = (-1, *([1] * (x.ndim - 1)))
        s = sigma.view(dims).to(x)
        keep = self.keep
        if self.unblended_from is not None:  # compared in float32: fp16 could round the first sigma down
            keep = keep * (sigma.float() < self.unblended_from).view(dims).to(x)
        x_in = x * (1 - keep) + (self.latent + s * self.noise) * keep
        return self.inner(x_in, sigma, cond) * (1 - self.keep) + self.latent * self.keep


def _secondary(request: GenerationRequest, guided: bool) -> list[str] | None:
    """Second-encoder texts for prompts (+ negatives), or None when the request has none."""
    prompts, negatives = request.secondary_prompts(), request.secondary_negatives()
    if prompts is None and negatives is None:
        return None
    first = prompts or request.prompts()
    return first + (negatives or request.negative_prompts()) if guided else first


@dataclass
class _Handoff:
    """Base model above ``sigma_switch``, refiner at and below it (SDXL base -> refiner, A1111's
    ``refiner_switch_at``); one sampler run, so samplers keep their state across the handoff."""

    base: Denoiser
    refiner: Denoiser
    sigma_switch: float

    @property
    def model_sampling(self) -> ModelSampling:
        """The base model's sampling (SDXL base and refiner share it)."""
        return self.base.model_sampling

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning | None) -> Tensor:
        """The base model's estimate above the switch sigma, the refiner's below."""
        model = self.base if float(sigma.max()) > self.sigma_switch else self.refiner
        return model(x, sigma, cond)


class Pipeline:
    """Generates images from a :class:`Model`: ``pipeline(prompt, **options)`` or ``generate(request)``.

    With a ``refiner`` (SDXL), requests with ``refiner_switch_at`` hand the latent over to
    it after that fraction of the steps.
    """

    def __init__(
        self, model: Model, plugins: Registry | None = None, *, progress: bool = True, refiner: Model | None = None
    ) -> None:
        if refiner is not None and refiner.family != f"{model.family}_refiner":
            raise InvalidRequest(
                f"{refiner.name} is a {refiner.family} model, not a refiner for the {model.family} model {model.name}"
            )
        self.model = model
        self.refiner = refiner
        self._registry = plugins
        self.progress = progress
        self.offload: Any = None  # the OffloadGroup when loaded with offload="sequential"

    @property
    def registry(self) -> Registry:
        """The registry samplers and schedules are looked up in."""
        return self._registry or registry()

    def __call__(self, prompt: str | list[str], **options: Any) -> GenerationResult:
        """Generate from keyword options named as :class:`GenerationRequest` fields."""
        return self.generate(GenerationRequest(prompt=prompt, **options))

    def generate(
        self,
        request: GenerationRequest,
        *,
        callback: Callable[[StepInfo], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationResult:
        """Run one request; ``cancel.set()`` from another thread stops it between steps."""
        request.validate()
        self._check_model_options(request)
        sampler = self.registry.sampler(request.sampler)
        width, height = request.size(self.model.default_size, self.model.vae.downscale)
        seeds = [resolve_seed(request.seed) + k for k in range(request.batch_size)]
        sigmas = self._sigmas(request, sampler)
        generators = make_generators(seeds)
        with torch.inference_mode():
            x, denoiser = self._prepare(request, sigmas, generators, width, height)
            denoiser = self._with_refiner(request, denoiser, sigmas, width, height)
            noise = noise_for_sampler(sampler.noise, x, sigmas, seeds, generators=generators)
            on_step, bar = self._step_reporter(len(sigmas) - 1, callback, cancel)
            with bar:
                options = dict(request.sampler_options)
                latents = sampler.sample(denoiser, x, sigmas, noise=noise, callback=on_step, **options)
            if latents.device.type == "cpu":
                return_freed_heap()  # the UNet's freed activations, before the decode needs memory of its own
            images = tensor_to_images(decode_finite(self.model.vae, latents))
        texts = [self._parameters(request, sampler, seeds[k], k, (width, height)) for k in range(len(seeds))]
        return GenerationResult(images=images, parameters=texts, seeds=seeds, latents=latents)

    def _check_model_options(self, request: GenerationRequest) -> None:
        """Refuse SDXL-only options for a model without SDXL's size conditioning."""
        given = [
            name
            for name, value in (
                ("original_size", request.original_size),
                ("target_size", request.target_size),
                ("crop", request.crop != (0, 0)),
            )
            if value
        ]
        if given and self.model.extra_conditioning is None:
            raise InvalidRequest(
                f"{', '.join(given)} only apply to SDXL models; {self.model.name} is {self.model.family}"
            )

    def _with_refiner(self, request: GenerationRequest, base: Denoiser, sigmas: Tensor, w: int, h: int) -> Denoiser:
        """``base``, or a handoff to the refiner after ``refiner_switch_at`` of the steps."""
        switch = request.refiner_switch_at
        if switch is None:
            return base
        if self.refiner is None:
            raise InvalidRequest("refiner_switch_at needs a refiner: load the pipeline with refiner=PATH")
        if request.mask is not None:
            raise InvalidRequest("the refiner cannot be combined with inpainting (mask=...)")
        steps = len(sigmas) - 1
        first_refined = math.ceil(round(switch * steps, 6))  # A1111: refine from step >= switch * steps
        if first_refined >= steps:
            return base
        refiner = self._guided(request, w, h, {}, model=self.refiner)
        return refiner if first_refined == 0 else _Handoff(base, refiner, float(sigmas[first_refined]))

    def _step_reporter(
        self, steps: int, callback: Callable[[StepInfo], None] | None, cancel: threading.Event | None
    ) -> tuple[Callable[[StepInfo], None], tqdm[Any]]:
        bar: tqdm[Any] = tqdm(total=steps, desc="sampling", unit="step", disable=not self.progress, leave=False)

        def on_step(info: StepInfo) -> None:
            if cancel is not None and cancel.is_set():
                raise GenerationCancelled("generation cancelled between steps")
            bar.update(1)
            if callback is not None:
                callback(info)

        return on_step, bar

    def _sigmas(self, request: GenerationRequest, sampler: SamplerSpec) -> Tensor:
        """The schedule (or the request's own sigmas), cut for img2img strength like diffusers."""
        if request.sigmas is not None:
            return request.sigmas.to(torch.float32)
        extra = int(sampler.discard_penultimate_sigma)
        schedule = self.registry.scheduler(request.scheduler)
        sigmas = schedule.sigmas(request.steps + extra, self.model.denoiser.model_sampling)
        if extra:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        if request.init_image is None or request.strength >= 1.0:
            return sigmas
        kept = min(int(request.steps * request.strength), request.steps)
        if kept < 1:
            raise InvalidRequest(
                f"strength {request.strength} leaves no steps out of {request.steps}: raise steps or strength"
            )
        return sigmas[request.steps - kept :]

    def _encode(self, request: GenerationRequest, generators: list[torch.Generator], w: int, h: int) -> Tensor:
        assert request.init_image is not None
        image = image_to_tensor(request.init_image, w, h).to(self.model.device, self.model.dtype)
        batch = image.expand(request.batch_size, -1, -1, -1)
        return self.model.vae.encode(batch, generators)

    def _prepare(
        self, request: GenerationRequest, sigmas: Tensor, generators: list[torch.Generator], w: int, h: int
    ) -> tuple[Tensor, Denoiser]:
        """Initial latent and the (guided, maybe inpainting) denoiser, drawing in diffusers' order."""
        model, vae = self.model, self.model.vae
        shape = (vae.latent_channels, h // vae.downscale, w // vae.downscale)
        inpaint = request.mask is not None
        needs_latent = request.init_image is not None and not (inpaint and model.inpainting and request.strength >= 1)
        latent = self._encode(request, generators, w, h) if needs_latent else None
        noise = initial_noise(shape, generators, device=model.device, dtype=model.dtype)
        from_noise = inpaint and request.strength >= 1  # diffusers' inpainting at strength 1 starts from pure noise
        x = noise * sigmas[0] if latent is None or from_noise else latent + noise * sigmas[0]
        extra: dict[str, Tensor] = {}
        keep: Tensor | None = None
        if inpaint:
            assert request.mask is not None and request.init_image is not None
            mask = mask_to_tensor(request.mask, w, h).to(model.device, model.dtype)
            masked = image_to_tensor(request.init_image, w, h).to(model.device, model.dtype) * (mask < 0.5)
            # drawn for 4-channel models too, as diffusers does, so later noise stays in step with it
            masked_latent = vae.encode(masked.expand(request.batch_size, -1, -1, -1), generators)
            small = torch.nn.functional.interpolate(mask, size=shape[1:]).expand(request.batch_size, -1, -1, -1)
            if model.inpainting:
                extra["c_concat"] = torch.cat([small, masked_latent], dim=1)
            else:
                keep = 1 - small
        denoiser = self._guided(request, w, h, extra)
        if keep is not None and latent is not None:
            denoiser = _Inpaint(denoiser, latent, noise, keep, float(sigmas[0]) if from_noise else None)
        return x, denoiser

    def _guided(
        self, request: GenerationRequest, w: int, h: int, extra: dict[str, Tensor], model: Model | None = None
    ) -> Denoiser:
        """The CFG-wrapped denoiser; cond and uncond are encoded in one call (same chunk count)."""
        model = model or self.model
        batch, guided = request.batch_size, request.cfg_scale != 1.0
        cond, uncond = self._conditionings(request, model, guided)
        if model.extra_conditioning is not None:
            cond = cond.with_extra(**model.extra_conditioning(request, w, h, False))
            if uncond is not None:
                uncond = uncond.with_extra(**model.extra_conditioning(request, w, h, True))
        cond = cond.with_extra(**extra)
        uncond = None if uncond is None else uncond.with_extra(**extra)
        scale = torch.full((batch,), float(request.cfg_scale), device=model.device)
        rescale = torch.full((batch,), float(request.guidance_rescale), device=model.device)
        return CFGDenoiser(model.denoiser, cond, uncond, scale, rescale if request.guidance_rescale else None)

    def _conditionings(
        self, request: GenerationRequest, model: Model, guided: bool
    ) -> tuple[Conditioning, Conditioning | None]:
        """Prompts and negatives encoded together, the empty negatives zeroed where the model asks."""
        prompts, negatives = request.prompts(), request.negative_prompts()
        texts = prompts + negatives if guided else prompts
        secondary = _secondary(request, guided)
        options: dict[str, Any] = {"clip_skip": request.clip_skip}
        if secondary is not None:
            options["secondary"] = secondary
        encoded = model.text_encoder.encode(texts, **options).map(lambda t: t.to(model.device))
        batch = request.batch_size
        cond = encoded.select(slice(0, batch))
        if not guided:
            return cond, None
        uncond = encoded.select(slice(batch, 2 * batch))
        seconds = request.secondary_negatives() or negatives
        empty = [not first and not second for first, second in zip(negatives, seconds, strict=True)]
        if model.zero_empty_negative and any(empty):
            keep = torch.tensor([0.0 if e else 1.0 for e in empty], device=model.device)
            uncond = uncond.map(lambda t: t * keep.view(-1, *([1] * (t.ndim - 1))).to(t))
        return cond, uncond

    def parameters_text(self, request: GenerationRequest, k: int = 0) -> str:
        """The A1111 parameters text image ``k`` of ``request`` gets (its seed must be resolved: not -1)."""
        size = request.size(self.model.default_size, self.model.vae.downscale)
        return self._parameters(request, self.registry.sampler(request.sampler), request.seed + k, k, size)

    def _parameters(
        self, request: GenerationRequest, sampler: SamplerSpec, seed: int, k: int, size: tuple[int, int]
    ) -> str:
        """The A1111 parameters text of image ``k``."""
        schedule = "Custom" if request.sigmas is not None else self.registry.scheduler(request.scheduler).label
        settings: dict[str, object] = {
            "Steps": request.steps,
            "Sampler": sampler.label,
            "Schedule type": schedule,
            "CFG scale": request.cfg_scale,
            "Seed": seed,
            "Size": f"{size[0]}x{size[1]}",
            "Model hash": self.model.model_hash(),
            "Model": self.model.name,
            "VAE hash": self.model.vae_hash() if self.model.vae_name else None,
            "VAE": self.model.vae_name,
            "Denoising strength": request.strength if request.init_image is not None else None,
            "Clip skip": request.clip_skip,
            "Guidance rescale": request.guidance_rescale or None,
            "Refiner": self.refiner.name if self.refiner and request.refiner_switch_at is not None else None,
            "Refiner switch at": request.refiner_switch_at if self.refiner else None,
            "Version": f"latentrt {__version__}",
        }
        return format_parameters(Parameters(request.prompts()[k], request.negative_prompts()[k], settings))
