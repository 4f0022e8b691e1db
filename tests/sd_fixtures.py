"""Tiny random Stable Diffusion 1.x models, saved as a diffusers folder and as an LDM single file.

The networks honour the SD1 conventions a single file does not store (REFERENCE.md,
"Checkpoint layouts"): GroupNorm with 32 groups, 8 UNet attention heads, CLIP heads of 64
features with quick_gelu. The context width is 768, so SD1 detection sees a CLIP-L UNet;
the text model has CLIP's 49408-token vocabulary so the shipped tokenizer works. Every
parameter is re-drawn so no layer is a near-identity or zero, then the output layers are
scaled so the pipeline's images spread over most of the pixel range (about 20..250, std ~23)
without clipping.

Sizes: the VAE has four levels (downscale 8, as SD's), so any multiple of 8 works; the
UNet has two levels, the first with cross-attention and two res blocks (SD1 detection reads
``input_blocks.2.1...attn2``), the second without. The single file is written from the
diffusers components: UNet names through ``keys.unet.diffusers_to_ldm_unet``, VAE names
through the inverse of diffusers' ``convert_ldm_vae_checkpoint`` written here (independent
of ``keys.vae``), CLIP under ``cond_stage_model.transformer.text_model.``, plus the
buffers a real LDM file carries (``betas``, ``alphas_cumprod``, CLIP's int64 ``position_ids``).

``tiny_sd1(tmp_path_factory, ...)`` builds a model once per test session and returns the
cached :class:`TinySD` afterwards; ``build_tiny_sd1(path, ...)`` always builds.

SD2 (``tiny_sd2``, ``build_tiny_sd2``) honours SD2's conventions instead: a 1024-wide
context (OpenCLIP ViT-H), UNet heads of 64 channels with linear ``proj_in``/``proj_out``
(diffusers' config says ``attention_head_dim: (1, 2)`` for channels (64, 128): its
"attention_head_dim" counts heads, as SD2's ``[5, 10, 20, 20]`` does for (320, 640, 1280,
1280)), and a gelu text model with 16 heads of 64 whose tokenizer pads with ``!`` (id 0).
The diffusers folder holds the text encoder already truncated (1 layer, as SD2 folders hold
23 of ViT-H's 24); the single file stores the OpenCLIP layout under ``cond_stage_model.model.``
with one more random resblock (the layer SD2 drops) plus ``text_projection`` and
``logit_scale``, written by :func:`transformers_to_openclip_reference` (independent of
``keys.clip``). The v-prediction variant shares the eps model's files (hard links) with a
``v_prediction`` scheduler config in the folder and a sidecar ``.yaml`` saying
``parameterization: "v"`` next to the single file.

SDXL (``tiny_sdxl``, ``build_tiny_sdxl``) builds a base and a refiner with SDXL's conventions at
small widths: CLIP-L (2 layers of 128, quick_gelu) and bigG (``CLIPTextModelWithProjection``, 10
layers of 192, gelu, projected to 96, ``!`` pads) whose contexts join to 320 channels; UNets
with the ``text_time`` additional embedding (pooled + 6 x 256 time ids, the refiner's + 5 x 256),
heads of 64 channels, linear projections, transformer depths (0, 1, 2) (base) and (0, 2, 2, 0)
(refiner); the VAE of SD1's fixture with scaling factor 0.13025. bigG has 10 layers because
detection reads ``conditioner.embedders.1.model.transformer.resblocks.9.*`` (refiner:
``embedders.0``); the folder and the single file hold the same 10. The refiner shares bigG and
the VAE with the base, as the real pair does. The single files use sgm's names: UNet and VAE as
above, CLIP-L under ``conditioner.embedders.0.transformer.text_model.`` (with int64
``position_ids``), bigG in the OpenCLIP layout under ``conditioner.embedders.1.model.``
(``text_projection`` stored ``[width, dim]``, plus ``logit_scale``); no DDPM buffers. The
folders are saved by diffusers' ``StableDiffusionXLPipeline`` / ``StableDiffusionXLImg2ImgPipeline``
(refiner: ``requires_aesthetics_score``, no zeroed negatives, as sd_xl_refiner's
``model_index.json``).
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from latentrt.plugins.stable_diffusion.keys.unet import diffusers_to_ldm_unet

__all__ = [
    "SCHEDULER_CONFIG",
    "SD2_TEXT_CONFIG",
    "SD2_UNET_CONFIG",
    "SDXL_BIG_G_WIDTH",
    "SDXL_CLIP_L_WIDTH",
    "SDXL_POOLED",
    "SDXL_REFINER_UNET_CONFIG",
    "SDXL_TEXT_2_CONFIG",
    "SDXL_TEXT_CONFIG",
    "SDXL_UNET_CONFIG",
    "SDXL_VAE_CONFIG",
    "TEXT_CONFIG",
    "UNET_CONFIG",
    "VAE_CONFIG",
    "TinySD",
    "TinySDXL",
    "build_tiny_sd1",
    "build_tiny_sd2",
    "build_tiny_sdxl",
    "diffusers_to_ldm_vae_reference",
    "hf_clip_tokenizer",
    "ldm_sd2_single_file_state",
    "ldm_sdxl_single_file_state",
    "ldm_single_file_state",
    "randomize",
    "tiny_sd1",
    "tiny_sd2",
    "tiny_sd2_text_encoder",
    "tiny_sdxl",
    "tiny_sdxl_text_encoders",
    "tiny_sdxl_vae",
    "tiny_text_encoder",
    "tiny_unet",
    "tiny_vae",
    "transformers_to_openclip_projected",
    "transformers_to_openclip_reference",
    "write_clip_tokenizer_files",
]

CA_DOWN, DOWN, CA_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"

UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "down_block_types": (CA_DOWN, DOWN),
    "up_block_types": (UP, CA_UP),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,  # SD1: diffusers' "attention_head_dim" counts heads
    "norm_num_groups": 32,
}
VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (32, 32, 64, 64),  # four levels: downscale 8
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 64,
    "scaling_factor": 0.18215,
}
TEXT_CONFIG: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,  # SD1's context width; 12 heads of 64
    "num_hidden_layers": 2,
    "num_attention_heads": 12,
    "intermediate_size": 128,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}
SD2_UNET_CONFIG: dict[str, Any] = {
    **UNET_CONFIG,
    "block_out_channels": (64, 128),  # heads of 64 channels: 1 head, then 2
    "cross_attention_dim": 1024,  # OpenCLIP ViT-H context: SD2 detection reads this width
    "attention_head_dim": (1, 2),  # diffusers counts heads here: SD2's [5, 10, 20, 20] = channels / 64
    "use_linear_projection": True,
}
SD2_TEXT_CONFIG: dict[str, Any] = {
    **TEXT_CONFIG,
    "hidden_size": 1024,  # ViT-H width: 16 heads of 64
    "num_hidden_layers": 1,  # as the diffusers folder holds it (the single file has one more)
    "num_attention_heads": 16,
    "hidden_act": "gelu",  # OpenCLIP: exact gelu
    "pad_token_id": 0,  # "!"
}
SCHEDULER_CONFIG: dict[str, Any] = {  # SD1's training schedule; "linspace" keeps init_noise_sigma = sigma_max
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}


@dataclass(frozen=True)
class TinySD:
    """One tiny SD1 model in both layouts, and the diffusers components it was written from."""

    folder: Path
    """A diffusers folder: ``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``..."""
    single_file: Path
    """The same weights as one LDM ``.safetensors`` (fp32)."""
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    inpainting: bool
    scheduler_overrides: Mapping[str, Any] = field(default_factory=dict)
    """What the folder's scheduler config changes in :data:`SCHEDULER_CONFIG` (SD2 v: ``prediction_type``)."""

    def scheduler(self, kind: str = "euler", **overrides: Any) -> Any:
        """A fresh diffusers scheduler from the folder's config (``euler`` or ``euler_ancestral``)."""
        import diffusers

        classes = {
            "euler": diffusers.EulerDiscreteScheduler,
            "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
        }
        return classes[kind].from_config({**SCHEDULER_CONFIG, **self.scheduler_overrides, **overrides})

    def pipeline(self, kind: str = "txt2img", scheduler: Any = None) -> Any:
        """A diffusers pipeline (``txt2img``, ``img2img``, ``inpaint``) over the in-memory components."""
        import diffusers

        classes: dict[str, Any] = {
            "txt2img": diffusers.StableDiffusionPipeline,
            "img2img": diffusers.StableDiffusionImg2ImgPipeline,
            "inpaint": diffusers.StableDiffusionInpaintPipeline,
        }
        pipe = classes[kind](
            vae=self.vae,
            text_encoder=self.text_encoder,
            tokenizer=self.tokenizer,
            unet=self.unet,
            scheduler=scheduler if scheduler is not None else self.scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 image arrays, in dB (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# --- random weights ---------------------------------------------------------------------


def _materialize(build: Any) -> Any:
    """``build()`` on the meta device, then given uninitialized CPU storage (every parameter is re-drawn
    by :func:`randomize`; construction-time initialization would only cost time)."""
    with torch.device("meta"):
        module = build()
    return module.to_empty(device="cpu")


def randomize(module: nn.Module, seed: int, *, bias_std: float = 0.1) -> None:
    """Re-draw every parameter: matrices ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.2^2), biases small."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim > 1:
                param.copy_(noise / math.sqrt(param[0].numel()))
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            else:
                param.copy_(bias_std * noise)


def _scale_output(layer: nn.Module, factor: float) -> None:
    with torch.no_grad():
        for param in layer.parameters():
            param.mul_(factor)


def tiny_unet(seed: int, *, inpainting: bool = False, config: Mapping[str, Any] = UNET_CONFIG) -> Any:
    """A random ``UNet2DConditionModel`` (9 input channels for inpainting); SD1-style unless ``config``
    says otherwise (:data:`SD2_UNET_CONFIG`)."""
    import diffusers

    config = {**config, "in_channels": 9 if inpainting else 4}
    unet = _materialize(lambda: cast(Any, diffusers.UNet2DConditionModel)(**config)).eval()
    randomize(unet, seed)
    # smaller eps predictions keep the final latents (std ~16) where the tiny decoder does not clip
    _scale_output(unet.conv_out, 0.5)
    return unet.requires_grad_(False)


def tiny_vae(seed: int) -> Any:
    """A random four-level ``AutoencoderKL`` whose decoder maps latents to images mostly inside [-1, 1]."""
    import diffusers

    vae = _materialize(lambda: cast(Any, diffusers.AutoencoderKL)(**VAE_CONFIG)).eval()
    randomize(vae, seed)
    _scale_output(vae.decoder.conv_out, 0.3)
    return vae.requires_grad_(False)


def _text_encoder(settings: Mapping[str, Any], seed: int) -> Any:
    import transformers

    config = transformers.CLIPTextConfig(**settings)
    model = _materialize(lambda: transformers.CLIPTextModel(config)).eval()
    model.embeddings.position_ids.copy_(torch.arange(config.max_position_embeddings).unsqueeze(0))
    randomize(model, seed, bias_std=0.02)
    return model.requires_grad_(False)


@functools.cache
def tiny_text_encoder(seed: int) -> Any:
    """A random two-layer CLIP-L-width ``CLIPTextModel`` (quick_gelu, 12 heads of 64).

    Cached: the 49408 x 768 token embedding is 150 MB, shared by the models built with one seed.
    """
    return _text_encoder(TEXT_CONFIG, seed)


@functools.cache
def tiny_sd2_text_encoder(seed: int) -> Any:
    """A random one-layer ViT-H-width ``CLIPTextModel`` (gelu, 16 heads of 64): SD2's truncated encoder.

    Cached: the 49408 x 1024 token embedding is 200 MB.
    """
    return _text_encoder(SD2_TEXT_CONFIG, seed)


# --- tokenizer files ------------------------------------------------------------------------


def _gpt2_byte_symbols() -> list[str]:
    """GPT-2 / CLIP byte symbols in vocabulary order."""
    kept = [b for b in range(256) if (33 <= b <= 126) or (161 <= b <= 172) or (174 <= b <= 255)]
    moved = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + i) for i in range(len(moved))]


def write_clip_tokenizer_files(folder: Path) -> Path:
    """``vocab.json`` + ``merges.txt`` derived from the shipped BPE file, as CLIP's SimpleTokenizer builds them."""
    data = (
        resources.files("latentrt.plugins.stable_diffusion").joinpath("data").joinpath("bpe_simple_vocab_16e6.txt.gz")
    )
    lines = gzip.decompress(data.read_bytes()).decode("utf-8").split("\n")
    merges = [line.split() for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = _gpt2_byte_symbols()
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    (folder / "merges.txt").write_text(merges_text, encoding="utf-8")
    return folder


def _hf_tokenizer(files: Path, pad_token: str = "<|endoftext|>") -> Any:
    import transformers

    # from_pretrained reads vocab.json + merges.txt in transformers 4 and 5 alike (5 renamed the
    # constructor's vocab_file/merges_file to vocab/merges and ignores the old names)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(files), pad_token=pad_token)
    tokenizer.model_max_length = 77  # diffusers pads and truncates prompts to this; unset, it is 1e30
    return tokenizer


def hf_clip_tokenizer(files: Path, pad_token: str = "<|endoftext|>") -> Any:
    """A transformers ``CLIPTokenizer`` over :func:`write_clip_tokenizer_files` output, padding with
    ``pad_token`` (``"!"`` for OpenCLIP: SD2, SDXL's ``tokenizer_2``) to ``model_max_length`` 77."""
    return _hf_tokenizer(files, pad_token)


# --- the LDM single-file layout -------------------------------------------------------------

_VAE_RESNET = r"(norm1|conv1|norm2|conv2|conv_shortcut)"
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def diffusers_to_ldm_vae_reference(state: dict[str, Tensor], levels: int) -> dict[str, Tensor]:
    """diffusers ``AutoencoderKL`` names -> LDM names, written as the inverse of diffusers'
    ``convert_ldm_vae_checkpoint`` (independently of ``latentrt...keys.vae``).

    Decoder ``up_blocks.i`` is LDM's ``up.{levels-1-i}``; mid-block attention weights become
    1x1 convs ``[out, in, 1, 1]``.
    """
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        name = key.replace("conv_shortcut", "nin_shortcut")
        name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
        name = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
        name = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", name
        )
        name = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.",
            name,
        )
        name = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", name)
        if (m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", name)) is not None:
            name = f"{m[1]}.mid.attn_1.{_VAE_ATTENTION[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                tensor = tensor.reshape(*tensor.shape, 1, 1)
        name = name.replace(".conv_norm_out.", ".norm_out.")
        out[name] = tensor
    return out


def _ldm_unet_vae_state(unet: Any, vae: Any) -> dict[str, Tensor]:
    """UNet and VAE under their LDM names, plus the DDPM schedule buffers real LDM files carry."""
    state: dict[str, Tensor] = {}
    for key, tensor in diffusers_to_ldm_unet(unet.state_dict()).items():
        state["model.diffusion_model." + key] = tensor
    levels = len(vae.config.block_out_channels)
    for key, tensor in diffusers_to_ldm_vae_reference(vae.state_dict(), levels).items():
        state["first_stage_model." + key] = tensor
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    state["betas"] = betas.float()
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    return state


def ldm_single_file_state(unet: Any, vae: Any, text_encoder: Any) -> dict[str, Tensor]:
    """The state dict of an SD1 LDM single file holding these diffusers/transformers components."""
    state = _ldm_unet_vae_state(unet, vae)
    for key, tensor in text_encoder.state_dict().items():
        name = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + name] = tensor
    # what real LDM files also carry: CLIP's int64 position ids
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return {key: tensor.contiguous() for key, tensor in state.items()}


_OPENCLIP_NAMES = {  # transformers CLIPTextModel -> OpenCLIP TextTransformer (diffusers' convert_open_clip_checkpoint)
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER_NAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def transformers_to_openclip_reference(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers ``CLIPTextModel`` names -> OpenCLIP ``TextTransformer`` names (independent of
    ``latentrt...keys.clip``): q, k and v stacked into ``attn.in_proj_weight``/``in_proj_bias``,
    position ids dropped. ``text_projection`` is not a ``CLIPTextModel`` tensor: add it yourself."""
    out: dict[str, Tensor] = {}
    stacked: dict[str, dict[str, Tensor]] = {}
    for key, tensor in state.items():
        name = key.removeprefix("text_model.")
        if name == "embeddings.position_ids":
            continue
        if name in _OPENCLIP_NAMES:
            out[_OPENCLIP_NAMES[name]] = tensor
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if m is None:
            raise KeyError(f"no OpenCLIP name for {key!r}")
        block = f"transformer.resblocks.{m[1]}"
        if (qkv := re.fullmatch(r"self_attn\.([qkv])_proj", m[2])) is not None:
            stacked.setdefault(f"{block}.attn.in_proj_{m[3]}", {})[qkv[1]] = tensor
        else:
            out[f"{block}.{_OPENCLIP_LAYER_NAMES[m[2]]}.{m[3]}"] = tensor
    for key, parts in stacked.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def _extra_openclip_layer(config: Mapping[str, Any], index: int, seed: int) -> dict[str, Tensor]:
    """One random CLIP encoder layer as OpenCLIP ``transformer.resblocks.{index}`` tensors."""
    import transformers
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    layer_config = transformers.CLIPTextConfig(**config)
    layer = _materialize(lambda: CLIPEncoderLayer(layer_config))
    randomize(layer, seed, bias_std=0.02)
    names = {f"encoder.layers.{index}.{key}": tensor for key, tensor in layer.state_dict().items()}
    return transformers_to_openclip_reference(names)


def ldm_sd2_single_file_state(unet: Any, vae: Any, text_encoder: Any, *, seed: int = 0) -> dict[str, Tensor]:
    """The state dict of an SD2 LDM single file: ``text_encoder`` (SD2's truncated encoder) in the
    OpenCLIP layout under ``cond_stage_model.model.``, plus what SD2 drops: one more random
    resblock, ``text_projection`` (``[width, dim]``, applied as ``x @ P``) and ``logit_scale``."""
    state = _ldm_unet_vae_state(unet, vae)
    text = transformers_to_openclip_reference(text_encoder.state_dict())
    config = text_encoder.config.to_dict()
    text.update(_extra_openclip_layer(config, text_encoder.config.num_hidden_layers, seed))
    width = text_encoder.config.hidden_size
    generator = torch.Generator().manual_seed(seed + 1)
    text["text_projection"] = torch.randn(width, width, generator=generator) / math.sqrt(width)
    text["logit_scale"] = torch.tensor(math.log(100.0))
    for key, tensor in text.items():
        state["cond_stage_model.model." + key] = tensor
    return {key: tensor.contiguous() for key, tensor in state.items()}


# --- building ------------------------------------------------------------------------------


def build_tiny_sd1(tmp_path: Path, *, inpainting: bool = False, seed: int = 0) -> TinySD:
    """Build a tiny SD1 (or 9-channel inpainting) model under ``tmp_path`` in both layouts."""
    import diffusers

    tmp_path.mkdir(parents=True, exist_ok=True)
    unet = tiny_unet(seed + (100 if inpainting else 0), inpainting=inpainting)
    vae = tiny_vae(seed + 1)
    text_encoder = tiny_text_encoder(seed + 2)
    tokenizer = _hf_tokenizer(write_clip_tokenizer_files(tmp_path / "tokenizer-files"))
    folder = tmp_path / ("tiny-sd1-inpainting" if inpainting else "tiny-sd1")
    pipeline = cast(Any, diffusers.StableDiffusionPipeline)(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=cast(Any, diffusers.EulerDiscreteScheduler).from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    # transformers 5 saves only tokenizer.json; SD repositories also ship the BPE tables
    write_clip_tokenizer_files(folder / "tokenizer")
    single_file = tmp_path / f"{folder.name}.safetensors"
    save_file(ldm_single_file_state(unet, vae, text_encoder), str(single_file))
    return TinySD(folder, single_file, unet, vae, text_encoder, tokenizer, inpainting)


_BUILT: dict[tuple[bool, int], TinySD] = {}


def tiny_sd1(tmp_path_factory: pytest.TempPathFactory, *, inpainting: bool = False, seed: int = 0) -> TinySD:
    """:func:`build_tiny_sd1`, built once per test session (cached in this process)."""
    key = (inpainting, seed)
    if key not in _BUILT:
        _BUILT[key] = build_tiny_sd1(tmp_path_factory.mktemp("tiny-sd1"), inpainting=inpainting, seed=seed)
    return _BUILT[key]


# --- SD 2.x ----------------------------------------------------------------------------------


def build_tiny_sd2(tmp_path: Path, *, seed: int = 0) -> TinySD:
    """Build a tiny SD2 (eps-prediction) model under ``tmp_path`` in both layouts."""
    import diffusers

    tmp_path.mkdir(parents=True, exist_ok=True)
    unet = tiny_unet(seed + 200, config=SD2_UNET_CONFIG)
    vae = tiny_vae(seed + 1)
    text_encoder = tiny_sd2_text_encoder(seed + 202)
    tokenizer = _hf_tokenizer(write_clip_tokenizer_files(tmp_path / "tokenizer-files"), pad_token="!")
    folder = tmp_path / "tiny-sd2"
    pipeline = cast(Any, diffusers.StableDiffusionPipeline)(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=cast(Any, diffusers.EulerDiscreteScheduler).from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    write_clip_tokenizer_files(folder / "tokenizer")  # transformers 5 saves only tokenizer.json
    single_file = tmp_path / f"{folder.name}.safetensors"
    save_file(ldm_sd2_single_file_state(unet, vae, text_encoder, seed=seed + 203), str(single_file))
    return TinySD(folder, single_file, unet, vae, text_encoder, tokenizer, inpainting=False)


def with_v_prediction(model: TinySD, tmp_path: Path) -> TinySD:
    """``model``'s weights (hard links) as a v-prediction model: the folder's scheduler config says
    ``v_prediction``, a sidecar ``.yaml`` next to the single file says ``parameterization: "v"``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    folder = tmp_path / f"{model.folder.name}-v"
    shutil.copytree(model.folder, folder, copy_function=os.link)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config_path.unlink()  # a hard link to the eps model's config: replace, do not overwrite
    config_path.write_text(json.dumps({**config, "prediction_type": "v_prediction"}, indent=2), encoding="utf-8")
    single_file = tmp_path / f"{folder.name}.safetensors"
    os.link(model.single_file, single_file)
    single_file.with_suffix(".yaml").write_text(
        'model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: "v"\n',
        encoding="utf-8",
    )
    return TinySD(
        folder,
        single_file,
        model.unet,
        model.vae,
        model.text_encoder,
        model.tokenizer,
        model.inpainting,
        scheduler_overrides={"prediction_type": "v_prediction"},
    )


_BUILT_SD2: dict[tuple[bool, int], TinySD] = {}


def tiny_sd2(tmp_path_factory: pytest.TempPathFactory, *, v_prediction: bool = False, seed: int = 0) -> TinySD:
    """:func:`build_tiny_sd2` (or its :func:`with_v_prediction` variant), built once per test session."""
    key = (v_prediction, seed)
    if key not in _BUILT_SD2:
        if v_prediction:
            eps = tiny_sd2(tmp_path_factory, seed=seed)
            _BUILT_SD2[key] = with_v_prediction(eps, tmp_path_factory.mktemp("tiny-sd2-v"))
        else:
            _BUILT_SD2[key] = build_tiny_sd2(tmp_path_factory.mktemp("tiny-sd2"), seed=seed)
    return _BUILT_SD2[key]


# --- SDXL -----------------------------------------------------------------------------------

SDXL_CLIP_L_WIDTH, SDXL_BIG_G_WIDTH, SDXL_POOLED = 128, 192, 96
SDXL_TEXT_CONFIG: dict[str, Any] = {
    **TEXT_CONFIG,
    "hidden_size": SDXL_CLIP_L_WIDTH,  # CLIP-L's conventions at a small width: 2 heads of 64, quick_gelu
    "num_attention_heads": 2,
    "intermediate_size": 256,
}
SDXL_TEXT_2_CONFIG: dict[str, Any] = {
    **TEXT_CONFIG,
    "hidden_size": SDXL_BIG_G_WIDTH,  # bigG's conventions: heads of 64, exact gelu, "!" pads, a projection
    "num_hidden_layers": 10,  # detection reads conditioner.embedders.1.model.transformer.resblocks.9.*
    "num_attention_heads": 3,
    "intermediate_size": 384,
    "hidden_act": "gelu",
    "pad_token_id": 0,
    "projection_dim": SDXL_POOLED,
}
SDXL_UNET_CONFIG: dict[str, Any] = {  # sd_xl_base's structure: no attention at the top level, depth growing below
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64, 128),
    "down_block_types": (DOWN, CA_DOWN, CA_DOWN),
    "up_block_types": (CA_UP, CA_UP, UP),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 1, 2),  # SDXL's (1, 2, 10); the middle block takes the last
    "attention_head_dim": (1, 1, 2),  # diffusers counts heads here: SDXL's (5, 10, 20) = channels / 64
    "use_linear_projection": True,
    "cross_attention_dim": SDXL_CLIP_L_WIDTH + SDXL_BIG_G_WIDTH,  # CLIP-L and bigG contexts joined
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": SDXL_POOLED + 6 * 256,  # pooled + 6 time ids
    "norm_num_groups": 32,
}
SDXL_REFINER_UNET_CONFIG: dict[str, Any] = {  # sd_xl_refiner's structure: four levels, attention in the middle two
    **SDXL_UNET_CONFIG,
    "block_out_channels": (32, 64, 128, 128),
    "down_block_types": (DOWN, CA_DOWN, CA_DOWN, DOWN),
    "up_block_types": (UP, CA_UP, CA_UP, UP),
    "transformer_layers_per_block": 2,  # the refiner's 4
    "attention_head_dim": (1, 1, 2, 2),
    "cross_attention_dim": SDXL_BIG_G_WIDTH,  # bigG alone
    "projection_class_embeddings_input_dim": SDXL_POOLED + 5 * 256,  # pooled + 5 time ids (aesthetic score)
}
SDXL_VAE_CONFIG: dict[str, Any] = {**VAE_CONFIG, "scaling_factor": 0.13025}


@dataclass(frozen=True)
class TinySDXL:
    """One tiny SDXL base and its refiner, each in both layouts, and the diffusers components they were
    written from. The refiner shares the base's bigG text encoder and VAE, as the real pair does."""

    folder: Path
    single_file: Path
    refiner_folder: Path
    refiner_single_file: Path
    unet: Any
    refiner_unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any

    def scheduler(self) -> Any:
        """A fresh ``EulerDiscreteScheduler`` from :data:`SCHEDULER_CONFIG` (linspace spacing)."""
        import diffusers

        return cast(Any, diffusers.EulerDiscreteScheduler).from_config(SCHEDULER_CONFIG)

    def pipeline(self) -> Any:
        """diffusers' ``StableDiffusionXLPipeline`` over the base's in-memory components (zeros for an
        absent negative prompt: ``force_zeros_for_empty_prompt``, as sd_xl_base's model_index says)."""
        import diffusers

        pipe = cast(Any, diffusers.StableDiffusionXLPipeline)(
            vae=self.vae,
            text_encoder=self.text_encoder,
            text_encoder_2=self.text_encoder_2,
            tokenizer=self.tokenizer,
            tokenizer_2=self.tokenizer_2,
            unet=self.unet,
            scheduler=self.scheduler(),
            force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def refiner_pipeline(self) -> Any:
        """diffusers' ``StableDiffusionXLImg2ImgPipeline`` over the refiner, configured as sd_xl_refiner's
        model_index.json is (aesthetic-score time ids, no zeroed negatives)."""
        import diffusers

        pipe = cast(Any, diffusers.StableDiffusionXLImg2ImgPipeline)(
            vae=self.vae,
            text_encoder=None,
            text_encoder_2=self.text_encoder_2,
            tokenizer=None,
            tokenizer_2=self.tokenizer_2,
            unet=self.refiner_unet,
            scheduler=self.scheduler(),
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
            add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


@functools.cache
def tiny_sdxl_text_encoders(seed: int) -> tuple[Any, Any]:
    """A random CLIP-L-like ``CLIPTextModel`` (2 layers, width 128, quick_gelu) and a bigG-like
    ``CLIPTextModelWithProjection`` (10 layers, width 192, gelu, projected to 96). Cached per seed."""
    import transformers

    clip_l = _text_encoder(SDXL_TEXT_CONFIG, seed)
    config = transformers.CLIPTextConfig(**SDXL_TEXT_2_CONFIG)
    big_g = _materialize(lambda: transformers.CLIPTextModelWithProjection(config)).eval()
    for name, buffer in big_g.named_buffers():  # meta-built position ids need real values
        if name.endswith("position_ids"):
            buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    randomize(big_g, seed + 1, bias_std=0.02)
    return clip_l, big_g.requires_grad_(False)


def tiny_sdxl_vae(seed: int) -> Any:
    """:func:`tiny_vae`'s network with SDXL's scaling factor (0.13025) in its config."""
    import diffusers

    vae = _materialize(lambda: cast(Any, diffusers.AutoencoderKL)(**SDXL_VAE_CONFIG)).eval()
    randomize(vae, seed)
    _scale_output(vae.decoder.conv_out, 0.3)
    return vae.requires_grad_(False)


def transformers_to_openclip_projected(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A ``CLIPTextModelWithProjection`` in OpenCLIP names: :func:`transformers_to_openclip_reference`
    plus ``text_projection`` (``[width, dim]``, applied as ``x @ P``: the Linear weight transposed)
    and ``logit_scale``, as SDXL files store bigG."""
    rest = {key: tensor for key, tensor in state.items() if key != "text_projection.weight"}
    text = transformers_to_openclip_reference(rest)
    text["text_projection"] = state["text_projection.weight"].t().contiguous()
    text["logit_scale"] = torch.tensor(math.log(100.0))
    return text


def ldm_sdxl_single_file_state(unet: Any, vae: Any, text_encoder: Any | None, text_encoder_2: Any) -> dict[str, Tensor]:
    """The state dict of an SDXL single file (sgm layout): base with ``text_encoder`` (CLIP-L under
    ``conditioner.embedders.0.transformer.``, bigG under ``conditioner.embedders.1.model.``), or the
    refiner when ``text_encoder`` is None (bigG alone, as ``conditioner.embedders.0.model.``)."""
    state: dict[str, Tensor] = {}
    for key, tensor in diffusers_to_ldm_unet(unet.state_dict()).items():
        state["model.diffusion_model." + key] = tensor
    levels = len(vae.config.block_out_channels)
    for key, tensor in diffusers_to_ldm_vae_reference(vae.state_dict(), levels).items():
        state["first_stage_model." + key] = tensor
    big_g_prefix = "conditioner.embedders.0.model."
    if text_encoder is not None:
        big_g_prefix = "conditioner.embedders.1.model."
        for key, tensor in text_encoder.state_dict().items():
            name = key if key.startswith("text_model.") else "text_model." + key
            state["conditioner.embedders.0.transformer." + name] = tensor
        state["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    for key, tensor in transformers_to_openclip_projected(text_encoder_2.state_dict()).items():
        state[big_g_prefix + key] = tensor
    return {key: tensor.contiguous() for key, tensor in state.items()}


def _save_sdxl_folder(pipeline: Any, folder: Path, tokenizers: tuple[str, ...]) -> None:
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    for name in tokenizers:  # transformers 5 saves only tokenizer.json; SDXL repositories also ship the BPE tables
        write_clip_tokenizer_files(folder / name)


def build_tiny_sdxl(tmp_path: Path, *, seed: int = 0) -> TinySDXL:
    """Build a tiny SDXL base and refiner under ``tmp_path``, each as a diffusers folder and a single file."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    unet = tiny_unet(seed + 300, config=SDXL_UNET_CONFIG)
    refiner_unet = tiny_unet(seed + 310, config=SDXL_REFINER_UNET_CONFIG)
    vae = tiny_sdxl_vae(seed + 301)
    text_encoder, text_encoder_2 = tiny_sdxl_text_encoders(seed + 302)
    files = write_clip_tokenizer_files(tmp_path / "tokenizer-files")
    tokenizer, tokenizer_2 = _hf_tokenizer(files), _hf_tokenizer(files, pad_token="!")
    folder, refiner_folder = tmp_path / "tiny-sdxl", tmp_path / "tiny-sdxl-refiner"
    parts: dict[str, Any] = {
        "folder": folder,
        "single_file": tmp_path / "tiny-sdxl.safetensors",
        "refiner_folder": refiner_folder,
        "refiner_single_file": tmp_path / "tiny-sdxl-refiner.safetensors",
    }
    tiny = TinySDXL(
        **parts,
        unet=unet,
        refiner_unet=refiner_unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
    )
    _save_sdxl_folder(tiny.pipeline(), folder, ("tokenizer", "tokenizer_2"))
    _save_sdxl_folder(tiny.refiner_pipeline(), refiner_folder, ("tokenizer_2",))
    save_file(ldm_sdxl_single_file_state(unet, vae, text_encoder, text_encoder_2), str(tiny.single_file))
    save_file(ldm_sdxl_single_file_state(refiner_unet, vae, None, text_encoder_2), str(tiny.refiner_single_file))
    return tiny


_BUILT_SDXL: dict[int, TinySDXL] = {}


def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory, *, seed: int = 0) -> TinySDXL:
    """:func:`build_tiny_sdxl`, built once per test session (cached in this process)."""
    if seed not in _BUILT_SDXL:
        _BUILT_SDXL[seed] = build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"), seed=seed)
    return _BUILT_SDXL[seed]
