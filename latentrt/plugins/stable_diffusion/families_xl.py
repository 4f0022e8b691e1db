"""SDXL base and refiner families (Podell et al. 2023, https://arxiv.org/abs/2307.01952).

Single files keep CLIP ViT-L under ``conditioner.embedders.0.transformer.text_model.`` and
OpenCLIP bigG under ``conditioner.embedders.1.model.`` (the refiner has bigG alone, as
``embedders.0.model.``); diffusers folders use ``text_encoder/`` + ``tokenizer/`` and
``text_encoder_2/`` + ``tokenizer_2/``. The UNet takes SDXL's vector input
``y = [pooled text embedding, embedded time ids]`` through its ``label_emb``:

* base: time ids = original size (h, w), crop top-left (top, left), target size (h, w);
* refiner: original size, crop top-left, aesthetic score (6.0, negative side 2.5).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from latentrt.core.checkpoint import Checkpoint
from latentrt.core.denoiser import Prediction
from latentrt.core.pipeline import Model
from latentrt.core.protocols import ExportSpec
from latentrt.core.request import GenerationRequest
from latentrt.plugins.stable_diffusion.clip import load_clip_text
from latentrt.plugins.stable_diffusion.export import LATENT_SCALE, unet_export_spec
from latentrt.plugins.stable_diffusion.families import (
    UNET_PREFIX,
    UNetBackbone,
    assemble_model,
    detect_family,
    load_unet,
    load_vae,
    read_prediction,
)
from latentrt.plugins.stable_diffusion.keys.clip import (
    OPENCLIP_SDXL_PREFIX,
    OPENCLIP_SDXL_REFINER_PREFIX,
    SDXL_CLIP_L_PREFIX,
    from_openclip,
    from_transformers,
)
from latentrt.plugins.stable_diffusion.keys.unet import diffusers_to_ldm_unet
from latentrt.plugins.stable_diffusion.text_xl import SDXLTextEncoder, TextBranch
from latentrt.plugins.stable_diffusion.tokenizer import CLIPTokenizer
from latentrt.plugins.stable_diffusion.unet import sdxl_adm_vector
from latentrt.plugins.stable_diffusion.vae import SDXL_SCALING_FACTOR

__all__ = ["SDXL", "SDXL_REFINER", "SDXLBackbone", "SDXLFamily", "sdxl_time_ids"]

logger = logging.getLogger(__name__)


@dataclass
class SDXLBackbone(UNetBackbone):
    """The SDXL UNet as the denoiser's backbone: ``(sample, t, context, text_embeds, time_ids[, c_concat])``.

    The inputs are the ones the export spec declares; SDXL's vector input ``y`` (pooled
    text embedding and embedded time ids) is built here.
    """

    time_ids: int = 6  # base: original size, crop, target size; refiner: original size, crop, aesthetic score

    def export_spec(self, latent_scale: int = LATENT_SCALE) -> ExportSpec:
        """Names, dynamic axes and shape range an exporter compiles this backbone for (latents
        ``latent_scale`` times smaller than the images)."""
        return unet_export_spec(self.unet.config, time_ids=self.time_ids, latent_scale=latent_scale)

    def __call__(  # type: ignore[override]
        self,
        sample: Tensor,
        timestep: Tensor,
        context: Tensor,
        text_embeds: Tensor,
        time_ids: Tensor,
        c_concat: Tensor | None = None,
    ) -> Tensor:
        """One UNet evaluation with ``y = [text_embeds, embedded time_ids]``."""
        return self.run(sample, timestep, context, c_concat, sdxl_adm_vector(text_embeds, time_ids))


def sdxl_time_ids(request: GenerationRequest, width: int, height: int, *, refiner: bool, negative: bool) -> Tensor:
    """``[batch, 6]`` base or ``[batch, 5]`` refiner time ids (diffusers' ``_get_add_time_ids`` order)."""
    original = request.original_size or (width, height)
    top, left = request.crop
    if refiner:
        score = request.negative_aesthetic_score if negative else request.aesthetic_score
        ids = [original[1], original[0], top, left, score]
    else:
        target = request.target_size or (width, height)
        ids = [original[1], original[0], top, left, target[1], target[0]]
    return torch.tensor([ids] * request.batch_size, dtype=torch.float32)


@dataclass(frozen=True)
class SDXLFamily:
    """SDXL base (two text encoders) or refiner (bigG alone, aesthetic-score time ids)."""

    name: Literal["sdxl", "sdxl_refiner"]
    label: str

    @property
    def refiner(self) -> bool:
        """Whether this is the refiner family."""
        return self.name == "sdxl_refiner"

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
        """Load text encoders, UNet and VAE into a ``Model`` whose conditioning carries SDXL's ids."""
        device = torch.device(device)
        unet_weights, branches, vae_weights = self._components(checkpoint, device, dtype)
        unet = load_unet(unet_weights, "sdxl", self.label, device, dtype)
        autoencoder, vae_name, vae_hash = load_vae(vae, vae_weights, SDXL_SCALING_FACTOR, device, dtype, vae_tiling)
        chosen = prediction or read_prediction(checkpoint) or "eps"
        logger.info("loaded %s (%s, %s prediction) on %s in %s", checkpoint.name, self.label, chosen, device, dtype)

        def extra(request: GenerationRequest, width: int, height: int, negative: bool) -> dict[str, Tensor]:
            ids = sdxl_time_ids(request, width, height, refiner=self.refiner, negative=negative)
            return {"time_ids": ids.to(device)}

        backbone = SDXLBackbone(unet, 5 if self.refiner else 6)
        return assemble_model(self.name, checkpoint, SDXLTextEncoder(branches, device), backbone, chosen,
                              (autoencoder, vae_name, vae_hash), default_size=1024, device=device, dtype=dtype,
                              extra_conditioning=extra, zero_empty_negative=not self.refiner)  # fmt: skip

    def _components(
        self, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype
    ) -> tuple[Mapping[str, Tensor], list[TextBranch], Mapping[str, Tensor]]:
        """UNet weights (LDM names), the text branches, and the VAE weights."""
        if checkpoint.tensors is not None:
            tensors = checkpoint.tensors
            big_prefix = OPENCLIP_SDXL_REFINER_PREFIX if self.refiner else OPENCLIP_SDXL_PREFIX
            big = load_clip_text(
                from_openclip(tensors, big_prefix),
                "gelu",
                device=device,
                dtype=dtype,
                what=f"{self.label} bigG text encoder",
            )
            branches = [TextBranch(big, CLIPTokenizer.from_package(pad_id=0))]
            if not self.refiner:
                clip_l = load_clip_text(
                    from_transformers(tensors, SDXL_CLIP_L_PREFIX),
                    "quick_gelu",
                    device=device,
                    dtype=dtype,
                    what=f"{self.label} CLIP-L text encoder",
                )
                branches.insert(0, TextBranch(clip_l, CLIPTokenizer.from_package()))
            return tensors.with_prefix(UNET_PREFIX), branches, tensors
        unet_source, _ = checkpoint.component("unet")
        names: list[tuple[str, str, Literal["quick_gelu", "gelu"]]] = [("text_encoder_2", "tokenizer_2", "gelu")]
        if not self.refiner:
            names.insert(0, ("text_encoder", "tokenizer", "quick_gelu"))
        branches = [self._folder_branch(checkpoint, *name, device, dtype) for name in names]
        return diffusers_to_ldm_unet(unet_source), branches, checkpoint.component("vae")[0]

    @staticmethod
    def _folder_branch(
        checkpoint: Checkpoint,
        encoder: str,
        tokenizer: str,
        activation: Literal["quick_gelu", "gelu"],
        device: torch.device,
        dtype: torch.dtype,
    ) -> TextBranch:
        assert checkpoint.folder is not None
        source, _ = checkpoint.component(encoder)
        model = load_clip_text(from_transformers(source), activation, device=device, dtype=dtype)
        folder = checkpoint.folder / tokenizer
        pad = 0 if activation == "gelu" else None
        words = CLIPTokenizer.from_folder(folder) if folder.is_dir() else CLIPTokenizer.from_package(pad_id=pad)
        return TextBranch(model, words)


SDXL = SDXLFamily("sdxl", "SDXL base")
SDXL_REFINER = SDXLFamily("sdxl_refiner", "SDXL refiner")
