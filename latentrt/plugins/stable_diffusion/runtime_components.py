"""The parts of an SD model a runtime can take over, and the drop-ins that replace them (DESIGN.md section 4).

Components, with the names their exported graphs use (inputs -> outputs):

* ``unet``: ``sample, timestep, context[, c_concat][, text_embeds, time_ids] -> noise_pred``
  (the backbone's own export spec, :mod:`.export`);
* ``vae_decoder``: ``latent`` (scaled, as the sampler leaves it) ``-> images`` in ``[-1, 1]``;
* ``vae_encoder``: ``images -> moments``, the unscaled posterior's mean and log-variance
  concatenated on channels (LDM ``DiagonalGaussianDistribution``); sampling and scaling stay in
  torch so seeded img2img draws the same noise as on torch;
* ``text_encoder`` (SDXL's bigG: ``text_encoder_2``): ``input_ids`` (``[batch, 77]`` int64) ->
  ``hidden_states`` (every layer's output, ``[batch, layers, 77, width]``),
  ``normed_hidden_states`` (the same through the final layer norm) and ``pooled``. Clip skip picks
  a layer from these, so one export serves every clip skip; prompt weighting stays in torch.

Each drop-in has the call signature of what it replaces, so the pipeline, samplers and text
encoders cannot tell which runtime runs. UNet and text encoder see the conditional and
unconditional halves together: their batch range is twice the images per request.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import cast

import torch
from torch import Tensor, nn

from latentrt.core.denoiser import DiscreteDenoiser
from latentrt.core.errors import InvalidRequest
from latentrt.core.pipeline import Model
from latentrt.core.protocols import CompiledModule, ExportSpec, RuntimeComponent, ShapeLimits
from latentrt.plugins.stable_diffusion.clip import CLIPTextConfig, CLIPTextOutput, CLIPTextTransformer
from latentrt.plugins.stable_diffusion.export import LATENT_SCALE
from latentrt.plugins.stable_diffusion.text import SDTextEncoder
from latentrt.plugins.stable_diffusion.text_xl import SDXLTextEncoder, TextBranch
from latentrt.plugins.stable_diffusion.vae import AutoencoderKL, Generators, LatentDistribution, _fits, _tiled

__all__ = [
    "CompiledTextModel",
    "CompiledUNet",
    "CompiledVAE",
    "sd_runtime_components",
    "text_export_spec",
    "vae_export_spec",
]

_SPATIAL = {0: "batch", 2: "height", 3: "width"}
Range = tuple[int, int, int]


def _sizes(default: Range, limits: ShapeLimits) -> Range:
    """The pixel size range: ``limits`` over the family's default, the optimum clamped into it."""
    lo = limits.min_size or default[0]
    hi = limits.max_size or default[2]
    if lo < 8 or lo % 8 or hi % 8 or hi < lo:
        raise InvalidRequest(f"sizes must be multiples of 8 with 8 <= min <= max, got min {lo}, max {hi}")
    return lo, min(max(default[1], lo), hi), hi


def _batch(images: int, per_image: int) -> Range:
    if images < 1:
        raise InvalidRequest(f"max batch must be at least 1, got {images}")
    return 1, min(per_image, images * per_image), images * per_image


# --- UNet ---------------------------------------------------------------------------------------


class UNetExport(nn.Module):
    """The UNet backbone with positional inputs in its spec's order (what exporters trace)."""

    def __init__(self, backbone: Callable[..., Tensor], unet: nn.Module, spec: ExportSpec) -> None:
        super().__init__()
        self.unet = unet  # registered, so its weights are the graph's initializers
        self.backbone = backbone
        self.names = spec.input_names

    def forward(self, *inputs: Tensor) -> Tensor:
        """``backbone(**dict(zip(names, inputs)))``."""
        return self.backbone(**dict(zip(self.names, inputs, strict=True)))


@dataclass
class CompiledUNet:
    """A compiled UNet in the backbone's place: ``(sample, timestep, context, **extra) -> prediction``."""

    compiled: CompiledModule

    def __call__(
        self,
        sample: Tensor,
        timestep: Tensor,
        context: Tensor,
        c_concat: Tensor | None = None,
        text_embeds: Tensor | None = None,
        time_ids: Tensor | None = None,
    ) -> Tensor:
        """One evaluation; the prediction comes back in ``sample``'s dtype and device."""
        given: dict[str, Tensor | None] = {"sample": sample, "timestep": timestep, "context": context}
        given |= {"c_concat": c_concat, "text_embeds": text_embeds, "time_ids": time_ids}
        dtypes = self.compiled.spec.input_dtypes  # an input the graph does not take is refused by name
        feeds = {name: t.to(dtypes.get(name, t.dtype)) for name, t in given.items() if t is not None}
        out = self.compiled(feeds)["noise_pred"]
        return out.to(device=sample.device, dtype=sample.dtype)


def _unet_component(model: Model, limits: ShapeLimits, default_sizes: Range | None) -> RuntimeComponent:
    denoiser = model.denoiser
    backbone = denoiser.backbone if isinstance(denoiser, DiscreteDenoiser) else None
    spec_of, unet = getattr(backbone, "export_spec", None), getattr(backbone, "unet", None)
    if backbone is None or not callable(spec_of) or not isinstance(unet, nn.Module):
        raise InvalidRequest(
            f"{model.name}: its UNet is not a torch backbone with an export spec, so it cannot be compiled"
        )
    spec: ExportSpec = spec_of(latent_scale=getattr(model.vae, "downscale", LATENT_SCALE))
    sizes = _sizes(default_sizes or spec.shape_range["height"], limits)
    spec = replace(spec, shape_range={"batch": _batch(limits.max_batch, 2), "height": sizes, "width": sizes})

    def install(compiled: CompiledModule) -> None:
        assert isinstance(denoiser, DiscreteDenoiser)
        denoiser.backbone = CompiledUNet(compiled)

    return RuntimeComponent("unet", UNetExport(backbone, unet, spec), spec, install)


# --- VAE ------------------------------------------------------------------------------------------


def vae_export_spec(vae: AutoencoderKL, part: str, sizes: Range, batch: Range) -> ExportSpec:
    """The spec of ``vae_decoder`` (``latent -> images``) or ``vae_encoder`` (``images -> moments``)."""
    scale, channels = vae.downscale, vae.latent_channels
    decoder = part == "vae_decoder"
    source, target = ("latent", "images") if decoder else ("images", "moments")

    def sample_inputs(dims: Mapping[str, int]) -> dict[str, Tensor]:
        b, h, w = dims["batch"], dims["height"], dims["width"]
        generator = torch.Generator().manual_seed(0)
        if decoder:
            return {"latent": torch.randn(b, channels, h // scale, w // scale, generator=generator)}
        return {"images": torch.rand(b, vae.config.in_channels, h, w, generator=generator) * 2 - 1}

    return ExportSpec(
        name=part,
        input_names=(source,),
        output_names=(target,),
        input_dtypes={source: torch.float32},
        dynamic_axes={source: _SPATIAL, target: _SPATIAL},
        shape_range={"batch": batch, "height": sizes, "width": sizes},
        sample_inputs=sample_inputs,
        pixel_scale={"latent" if decoder else "moments": scale},
    )


class VAEDecoderExport(nn.Module):
    """Scaled latents -> images: ``decoder(post_quant_conv(latent / scale + shift))``."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: Tensor) -> Tensor:
        """Images in ``[-1, 1]`` (not clamped), as ``AutoencoderKL.decode``."""
        return self.vae._decode_unscaled(latent / self.vae.scaling_factor + self.vae.shift_factor)


class VAEEncoderExport(nn.Module):
    """Images -> the posterior's moments, ``quant_conv(encoder(images))``."""

    def __init__(self, vae: AutoencoderKL) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, images: Tensor) -> Tensor:
        """Mean and log-variance (unclamped) on channels."""
        return self.vae._moments(images)


class CompiledVAE:
    """The core ``VAE`` protocol over compiled encoder and/or decoder; torch runs a part not compiled.

    Encode and decode follow ``AutoencoderKL``: posterior mean or a sample drawn in torch with the
    caller's generators, ``(z - shift) * scale`` on the way in, the inverse inside the decoder
    graph; tiling (``tiling``) cross-fades tiles exactly as the torch VAE does.
    """

    def __init__(self, vae: AutoencoderKL) -> None:
        self.scaling_factor = vae.scaling_factor
        self.shift_factor = vae.shift_factor
        self.latent_channels = vae.latent_channels
        self.downscale = vae.downscale
        self.tiling = vae.tiling
        self.in_channels = vae.config.in_channels
        reference = vae.encoder.conv_in.weight
        self.device, self.dtype = reference.device, reference.dtype
        self.torch_vae: AutoencoderKL | None = vae
        self.encoder: CompiledModule | None = None
        self.decoder: CompiledModule | None = None

    def install(self, part: str, compiled: CompiledModule) -> None:
        """Run ``part`` (``vae_encoder``/``vae_decoder``) on ``compiled``; torch is dropped once both are."""
        if part == "vae_encoder":
            self.encoder = compiled
        else:
            self.decoder = compiled
        if self.encoder is not None and self.decoder is not None:
            self.torch_vae = None

    def encode(self, images: Tensor, generator: Generators = None) -> Tensor:
        """``[b, 3, H, W]`` images -> scaled latents (posterior mean, or a sample with ``generator``)."""
        if self.encoder is None:
            assert self.torch_vae is not None
            return self.torch_vae.encode(images, generator)
        d, c = self.downscale, self.in_channels
        if images.ndim != 4 or images.shape[1] != c or images.shape[-2] % d or images.shape[-1] % d:
            raise InvalidRequest(
                f"VAE encode expects images [batch, {c}, height, width] with sides divisible by {d}, "
                f"got {list(images.shape)}"
            )
        fits = self.tiling is None or _fits(images, self.tiling, d)
        moments = self._moments(images) if fits else _tiled(self._moments, images, self.tiling, d, 1)  # type: ignore[arg-type]
        dist = LatentDistribution.from_moments(moments.to(self.device, self.dtype))
        z = dist.mean if generator is None else dist.sample(generator)
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images (nominally ``[-1, 1]``, not clamped)."""
        if self.decoder is None:
            assert self.torch_vae is not None
            return self.torch_vae.decode(latents)
        c = self.latent_channels
        if latents.ndim != 4 or latents.shape[1] != c:
            raise InvalidRequest(f"VAE decode expects latents [batch, {c}, height, width], got {list(latents.shape)}")
        fits = self.tiling is None or _fits(latents, self.tiling, 1)
        images = self._decode(latents) if fits else _tiled(self._decode, latents, self.tiling, 1, self.downscale)  # type: ignore[arg-type]
        return images.to(self.device, self.dtype)

    def _moments(self, images: Tensor) -> Tensor:
        assert self.encoder is not None
        return self.encoder({"images": images.float()})["moments"]

    def _decode(self, latents: Tensor) -> Tensor:
        assert self.decoder is not None
        return self.decoder({"latent": latents.float()})["images"]


def _vae_components(model: Model, limits: ShapeLimits, default: Range) -> list[RuntimeComponent]:
    vae = model.vae if isinstance(model.vae, AutoencoderKL) else getattr(model.vae, "torch_vae", None)
    if not isinstance(vae, AutoencoderKL):
        raise InvalidRequest(f"{model.name}: its VAE is not a torch AutoencoderKL, so it cannot be compiled")
    sizes, batch = _sizes(default, limits), _batch(limits.max_batch, 1)
    modules: dict[str, nn.Module] = {"vae_decoder": VAEDecoderExport(vae), "vae_encoder": VAEEncoderExport(vae)}

    def installer(part: str) -> Callable[[CompiledModule], None]:
        def install(compiled: CompiledModule) -> None:
            if not isinstance(model.vae, CompiledVAE):
                model.vae = CompiledVAE(vae)
            model.vae.install(part, compiled)

        return install

    return [
        RuntimeComponent(part, module, vae_export_spec(vae, part, sizes, batch), installer(part), source="vae")
        for part, module in modules.items()
    ]


# --- text encoders ----------------------------------------------------------------------------------


def text_export_spec(name: str, config: CLIPTextConfig, batch: Range) -> ExportSpec:
    """``input_ids [batch, 77] -> hidden_states, normed_hidden_states [batch, layers, 77, width], pooled``."""
    outputs = ("hidden_states", "normed_hidden_states", "pooled")

    def sample_inputs(dims: Mapping[str, int]) -> dict[str, Tensor]:
        """BOS, random tokens, EOS at a random place, EOS padding (pooling looks for the highest id)."""
        b, tokens = dims["batch"], config.max_positions
        generator = torch.Generator().manual_seed(0)
        bos, eos = config.vocab_size - 2, config.vocab_size - 1
        ids = torch.randint(0, bos, (b, tokens), generator=generator)
        ids[:, 0] = bos
        ends = torch.randint(2, tokens, (b,), generator=generator)
        ids[torch.arange(tokens) >= ends[:, None]] = eos
        return {"input_ids": ids}

    return ExportSpec(
        name=name,
        input_names=("input_ids",),
        output_names=outputs,
        input_dtypes={"input_ids": torch.int64},
        dynamic_axes={"input_ids": {0: "batch"}, **{out: {0: "batch"} for out in outputs}},
        shape_range={"batch": batch},
        sample_inputs=sample_inputs,
    )


class TextExport(nn.Module):
    """The text transformer returning every layer's hidden states (raw and final-normed) and the pooled output."""

    def __init__(self, model: CLIPTextTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``CLIPTextTransformer.forward`` for all clip skips at once."""
        x = self.model.embeddings(input_ids)
        layers = []
        for layer in self.model.encoder.layers:
            x = layer(x)
            layers.append(x)
        hidden = torch.stack(layers, dim=1)
        normed: Tensor = self.model.final_layer_norm(hidden)
        return hidden, normed, self.model._pool(normed[:, -1], input_ids)


@dataclass
class CompiledTextModel:
    """A compiled text transformer in ``CLIPTextTransformer``'s place (same call, same ``config``)."""

    compiled: CompiledModule
    config: CLIPTextConfig
    dtype: torch.dtype
    device: torch.device

    def __call__(self, input_ids: Tensor, clip_skip: int = 1, final_norm: bool = True) -> CLIPTextOutput:
        """``hidden_states[-clip_skip]`` (final-normed with ``final_norm``) and the pooled output."""
        layers = self.config.num_layers
        if not 1 <= clip_skip <= layers:
            raise InvalidRequest(f"clip skip must be between 1 and {layers} for this text encoder, got {clip_skip}")
        if input_ids.shape[-1] != self.config.max_positions:
            raise InvalidRequest(
                f"the compiled text encoder takes chunks of {self.config.max_positions} tokens, "
                f"got {input_ids.shape[-1]}"
            )
        out = self.compiled({"input_ids": input_ids.to(torch.int64)})
        hidden = out["normed_hidden_states" if final_norm else "hidden_states"][:, layers - clip_skip]
        return CLIPTextOutput(hidden.to(self.device, self.dtype), out["pooled"].to(self.device, self.dtype))


def _text_component(name: str, holder: SDTextEncoder | TextBranch, batch: Range, model_name: str) -> RuntimeComponent:
    text_model = holder.model
    if not isinstance(text_model, CLIPTextTransformer):
        raise InvalidRequest(f"{model_name}: its {name} is not a torch CLIP text model, so it cannot be compiled")
    config, weight = text_model.config, text_model.final_layer_norm.weight

    def install(compiled: CompiledModule) -> None:
        # a duck-typed drop-in: the encoders only call the model and read its config
        holder.model = cast(CLIPTextTransformer, CompiledTextModel(compiled, config, weight.dtype, weight.device))

    return RuntimeComponent(name, TextExport(text_model), text_export_spec(name, config, batch), install)


def _text_components(model: Model, limits: ShapeLimits) -> list[RuntimeComponent]:
    """``text_encoder`` (SD1/SD2, SDXL's CLIP-L) and ``text_encoder_2`` (SDXL's bigG, diffusers' names)."""
    encoder = model.text_encoder
    holders: list[SDTextEncoder | TextBranch]
    if isinstance(encoder, SDXLTextEncoder) and len(encoder.branches) <= 2:
        holders = list(encoder.branches)
        names = ["text_encoder", "text_encoder_2"][-len(holders) :]  # the refiner has bigG alone
    elif isinstance(encoder, SDTextEncoder):
        holders, names = [encoder], ["text_encoder"]
    else:
        raise InvalidRequest(f"{model.name}: its text encoder is not one latentrt can compile")
    batch = _batch(limits.max_batch, 2)
    return [_text_component(name, holder, batch, model.name) for name, holder in zip(names, holders, strict=True)]


def sd_runtime_components(
    model: Model, limits: ShapeLimits, default_sizes: Range | None = None
) -> dict[str, RuntimeComponent]:
    """Every component of an SD1/SD2/SDXL ``model`` a runtime can take over, for ``limits``.

    ``default_sizes`` (pixels: min, optimum, max) is the range when ``limits`` sets none; by default
    the family's (:data:`~latentrt.plugins.stable_diffusion.export.SIZE_RANGES`)."""
    unet = _unet_component(model, limits, default_sizes)
    parts = [unet, *_vae_components(model, limits, unet.spec.shape_range["height"]), *_text_components(model, limits)]
    return {part.name: part for part in parts}
