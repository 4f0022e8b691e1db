"""SD 1.x and 2.x model families: detection from the weights, and loading into a core ``Model``.

Detection follows the keys diffusers' single-file loader uses (REFERENCE.md):

* SD1: ``model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight`` with
  768 input features (CLIP-L context);
* SD2: the same key with 1024 (OpenCLIP ViT-H context);
* SDXL: ``conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias`` (its own
  family, next issue) — recognised here only to refuse it with a clear message;
* inpainting: ``model.diffusion_model.input_blocks.0.0.weight`` with 9 input channels.

The prediction type (eps or v) cannot be read from the weights: it comes from the caller,
a sidecar ``.yaml`` next to the file (LDM configs say ``parameterization: "v"``), or a
diffusers folder's ``scheduler/scheduler_config.json``; otherwise eps.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from latentrt.core.checkpoint import (
    Checkpoint,
    diffusers_component,
    load_module,
    model_hash,
    open_tensors,
    read_json,
    shape_of,
)
from latentrt.core.denoiser import DiscreteDenoiser, Prediction
from latentrt.core.layerwise import compute_dtype
from latentrt.core.model_sampling import sd_model_sampling
from latentrt.core.pipeline import Model
from latentrt.core.protocols import ExportSpec
from latentrt.plugins.stable_diffusion.clip import CLIPTextTransformer, load_clip_text
from latentrt.plugins.stable_diffusion.export import LATENT_SCALE, unet_export_spec
from latentrt.plugins.stable_diffusion.keys.clip import from_transformers, sd1_text_weights, sd2_text_weights
from latentrt.plugins.stable_diffusion.keys.unet import diffusers_to_ldm_unet
from latentrt.plugins.stable_diffusion.runtime_components import sd_runtime_components
from latentrt.plugins.stable_diffusion.text import SDTextEncoder
from latentrt.plugins.stable_diffusion.tokenizer import CLIPTokenizer
from latentrt.plugins.stable_diffusion.unet import HeadConvention, UNet, UNetConfig
from latentrt.plugins.stable_diffusion.vae import SD_SCALING_FACTOR, AutoencoderKL, Tiling

__all__ = ["SD1", "SD2", "SDFamily", "UNetBackbone", "assemble_model", "detect_family"]

logger = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
_CROSS_ATTN_KEY = UNET_PREFIX + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"
_SDXL_BASE_KEY = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"
_SDXL_REFINER_KEY = "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias"
FamilyName = Literal["sd1", "sd2", "sdxl", "sdxl_refiner"]


def detect_family(checkpoint: Checkpoint) -> FamilyName | None:
    """Which family a checkpoint belongs to, from key names and shapes (or model_index.json)."""
    if checkpoint.folder is not None:
        return _detect_folder(checkpoint)
    tensors = checkpoint.tensors
    assert tensors is not None
    if _SDXL_BASE_KEY in tensors:
        return "sdxl"
    if _SDXL_REFINER_KEY in tensors:
        return "sdxl_refiner"
    if _CROSS_ATTN_KEY in tensors:
        return {768: "sd1", 1024: "sd2"}.get(shape_of(tensors, _CROSS_ATTN_KEY)[-1])  # type: ignore[return-value]
    return None


def _detect_folder(checkpoint: Checkpoint) -> FamilyName | None:
    index = checkpoint.model_index()
    if "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index:
        first_encoder = index.get("text_encoder")
        has_clip_l = isinstance(first_encoder, list) and first_encoder[0] is not None
        return "sdxl" if has_clip_l else "sdxl_refiner"
    _, unet_config = checkpoint.component("unet")
    return {768: "sd1", 1024: "sd2"}.get(int(unet_config.get("cross_attention_dim", 0)))  # type: ignore[return-value]


def read_prediction(checkpoint: Checkpoint) -> Prediction | None:
    """eps or v from a sidecar ``.yaml`` or the diffusers scheduler config; None when unknown."""
    if checkpoint.folder is not None:
        config_path = checkpoint.folder / "scheduler" / "scheduler_config.json"
        if config_path.exists():
            kind = read_json(config_path).get("prediction_type", "epsilon")
            return "v" if kind == "v_prediction" else "eps"
        return None
    sidecar = checkpoint.path.with_suffix(".yaml")
    if sidecar.exists():
        match = re.search(r"parameterization:\s*[\"']?(\w+)", sidecar.read_text(encoding="utf-8", errors="replace"))
        return "v" if match and match.group(1) == "v" else "eps"
    return None


@dataclass
class UNetBackbone:
    """The UNet as the denoiser's backbone: ``(sample, timestep, context[, c_concat]) -> eps/v``.

    Inpainting models take the latent mask and masked image concatenated to the (already
    scaled) latent on the channel axis, as LDM's ``c_concat`` conditioning does.
    """

    unet: UNet

    def __call__(self, sample: Tensor, timestep: Tensor, context: Tensor, c_concat: Tensor | None = None) -> Tensor:
        """One UNet evaluation in the UNet's dtype; returns the prediction in ``sample``'s dtype."""
        return self.run(sample, timestep, context, c_concat)

    def run(
        self, sample: Tensor, timestep: Tensor, context: Tensor, c_concat: Tensor | None, y: Tensor | None = None
    ) -> Tensor:
        """The UNet on ``sample`` (with ``c_concat`` channels appended) in the UNet's dtype."""
        dtype = compute_dtype(self.unet)
        if c_concat is not None:
            sample = torch.cat([sample, c_concat.to(sample)], dim=1)
        out: Tensor = self.unet(sample.to(dtype), timestep, context.to(dtype), None if y is None else y.to(dtype))
        return out.to(sample.dtype)

    def export_spec(self, latent_scale: int = LATENT_SCALE) -> ExportSpec:
        """Names, dynamic axes and shape range an exporter compiles this backbone for (latents
        ``latent_scale`` times smaller than the images)."""
        return unet_export_spec(self.unet.config, latent_scale=latent_scale)


@dataclass(frozen=True)
class SDFamily:
    """One SD family: how its single-file and diffusers layouts map onto our networks."""

    name: FamilyName
    label: str
    heads: Literal["sd1", "sd2"]
    activation: Literal["quick_gelu", "gelu"]
    default_size: int
    pad_with_zero: bool  # OpenCLIP tokenizers pad with id 0 ("!"), CLIP-L with EOS

    def detect(self, checkpoint: Checkpoint) -> bool:
        """Whether ``checkpoint`` is of this family."""
        return detect_family(checkpoint) == self.name

    def __call__(
        self,
        checkpoint: Checkpoint,
        *,
        vae: str | Path | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        prediction: Prediction | None = None,
        vae_tiling: bool = False,
    ) -> Model:
        """Load the text encoder, UNet and VAE (optionally a separate VAE file) into a ``Model``.

        ``vae_tiling`` makes the VAE encode and decode in overlapping 512-pixel tiles
        (seamlessly blended), for images too large to decode at once.
        """
        device = torch.device(device)
        unet_weights, text_model, tokenizer, vae_weights = self._components(checkpoint, device, dtype)
        unet = load_unet(unet_weights, self.heads, self.label, device, dtype)
        autoencoder, vae_name, vae_hash = load_vae(vae, vae_weights, SD_SCALING_FACTOR, device, dtype, vae_tiling)
        chosen = prediction or read_prediction(checkpoint) or "eps"
        logger.info("loaded %s (%s, %s prediction) on %s in %s", checkpoint.name, self.label, chosen, device, dtype)
        text_encoder = SDTextEncoder(text_model, tokenizer, device)
        return assemble_model(self.name, checkpoint, text_encoder, UNetBackbone(unet), chosen,
                              (autoencoder, vae_name, vae_hash), default_size=self.default_size, device=device,
                              dtype=dtype)  # fmt: skip

    def _components(
        self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype
    ) -> tuple[Mapping[str, Tensor], CLIPTextTransformer, CLIPTokenizer, Mapping[str, Tensor]]:
        """UNet weights (LDM names), the loaded text model, the tokenizer and the VAE weights."""
        pad = 0 if self.pad_with_zero else None
        if checkpoint.tensors is not None:
            tensors = checkpoint.tensors
            text = sd1_text_weights(tensors) if self.heads == "sd1" else sd2_text_weights(tensors)
            text_model = load_clip_text(text, self.activation, device=device, dtype=dtype)
            return tensors.with_prefix(UNET_PREFIX), text_model, CLIPTokenizer.from_package(pad_id=pad), tensors
        assert checkpoint.folder is not None
        unet_source, _ = checkpoint.component("unet")
        text_source, _ = checkpoint.component("text_encoder")
        text_model = load_clip_text(from_transformers(text_source), self.activation, device=device, dtype=dtype)
        tokenizer_dir = checkpoint.folder / "tokenizer"
        has_own = tokenizer_dir.is_dir()
        tokenizer = CLIPTokenizer.from_folder(tokenizer_dir) if has_own else CLIPTokenizer.from_package(pad_id=pad)
        vae_source, _ = checkpoint.component("vae")
        return diffusers_to_ldm_unet(unet_source), text_model, tokenizer, vae_source


def load_unet(
    weights: Mapping[str, Tensor], heads: HeadConvention, label: str, device: torch.device, dtype: torch.dtype
) -> UNet:
    """The UNet of ``weights`` (LDM names), its config read from the shapes."""
    config = UNetConfig.from_state_dict(weights, heads=heads)
    unet = load_module(lambda: UNet(config), weights, f"{label} UNet", device=device, dtype=dtype)
    assert isinstance(unet, UNet)
    return unet


def load_vae(
    override: str | Path | None,
    weights: Mapping[str, Tensor],
    scaling_factor: float,
    device: torch.device,
    dtype: torch.dtype,
    tiling: bool,
) -> tuple[AutoencoderKL, str | None, Any]:
    """The checkpoint's VAE, or the one in ``override`` (LDM or diffusers layout, file or folder),
    with its name and lazy hash for the parameters text (None for the checkpoint's own)."""
    name, hasher = None, lambda: None
    if override is not None:
        path = Path(override).expanduser()
        weights, name, hasher = _vae_source(path), path.stem, _hasher(path if path.is_file() else None)
    autoencoder = AutoencoderKL.from_state_dict(weights, scaling_factor=scaling_factor, device=device, dtype=dtype)
    autoencoder.tiling = Tiling() if tiling else None
    return autoencoder, name, hasher


def assemble_model(
    family: str,
    checkpoint: Checkpoint,
    text_encoder: Any,
    backbone: UNetBackbone,
    prediction: Prediction,
    vae: tuple[AutoencoderKL, str | None, Any],
    *,
    default_size: int,
    device: torch.device,
    dtype: torch.dtype,
    sizes: tuple[int, int, int] | None = None,
    **extra: Any,
) -> Model:
    """The ``Model`` of an SD-like family (SD1/SD2, SDXL, the demo) from its loaded parts: the UNet
    ``backbone`` on SD's discrete schedule with ``prediction``, ``vae`` as :func:`load_vae` returns it,
    and the runtime components (:func:`sd_runtime_components`, export sizes ``sizes`` or the family's
    default). ``extra``: further ``Model`` fields (SDXL's ``extra_conditioning``, ...)."""
    autoencoder, vae_name, vae_hash = vae
    model = Model(
        family=family,
        text_encoder=text_encoder,
        denoiser=DiscreteDenoiser(backbone, sd_model_sampling(), prediction),
        vae=autoencoder,
        name=checkpoint.name,
        default_size=default_size,
        inpainting=backbone.unet.config.in_channels == 9,
        model_hash=checkpoint_hasher(checkpoint),
        vae_name=vae_name,
        vae_hash=vae_hash,
        device=device,
        dtype=dtype,
        **extra,
    )
    model.runtime_components = functools.partial(sd_runtime_components, model, default_sizes=sizes)
    return model


def checkpoint_hasher(checkpoint: Checkpoint) -> Any:
    """The lazy A1111 hash of a single file (diffusers folders have none)."""
    return _hasher(checkpoint.path if checkpoint.tensors is not None else None)


def _vae_source(path: Path) -> Mapping[str, Tensor]:
    if path.is_dir():
        folder = path.parent if (path / "config.json").exists() else path
        component = path.name if (path / "config.json").exists() else "vae"
        return diffusers_component(folder, component)[0]
    return open_tensors(path)


def _hasher(path: Path | None) -> Any:
    """A lazily computed, cached A1111 short hash (hashing a 4 GB file takes seconds)."""
    if path is None:
        return lambda: None
    return functools.cache(lambda: model_hash(path))


SD1 = SDFamily("sd1", "Stable Diffusion 1.x", "sd1", "quick_gelu", 512, pad_with_zero=False)
SD2 = SDFamily("sd2", "Stable Diffusion 2.x", "sd2", "gelu", 768, pad_with_zero=True)
