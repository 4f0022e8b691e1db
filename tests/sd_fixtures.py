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
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from latentrt.plugins.stable_diffusion.keys.unet import diffusers_to_ldm_unet

__all__ = [
    "SCHEDULER_CONFIG",
    "TEXT_CONFIG",
    "UNET_CONFIG",
    "VAE_CONFIG",
    "TinySD",
    "build_tiny_sd1",
    "diffusers_to_ldm_vae_reference",
    "ldm_single_file_state",
    "randomize",
    "tiny_sd1",
    "tiny_text_encoder",
    "tiny_unet",
    "tiny_vae",
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

    def scheduler(self, kind: str = "euler", **overrides: Any) -> Any:
        """A fresh diffusers scheduler from the folder's config (``euler`` or ``euler_ancestral``)."""
        import diffusers

        classes = {
            "euler": diffusers.EulerDiscreteScheduler,
            "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
        }
        return classes[kind].from_config({**SCHEDULER_CONFIG, **overrides})

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


def tiny_unet(seed: int, *, inpainting: bool = False) -> Any:
    """A random SD1-style ``UNet2DConditionModel`` (9 input channels for inpainting)."""
    import diffusers

    config = {**UNET_CONFIG, "in_channels": 9 if inpainting else 4}
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


@functools.cache
def tiny_text_encoder(seed: int) -> Any:
    """A random two-layer CLIP-L-width ``CLIPTextModel`` (quick_gelu, 12 heads of 64).

    Cached: the 49408 x 768 token embedding is 150 MB, shared by the models built with one seed.
    """
    import transformers

    config = transformers.CLIPTextConfig(**TEXT_CONFIG)
    model = _materialize(lambda: transformers.CLIPTextModel(config)).eval()
    model.embeddings.position_ids.copy_(torch.arange(config.max_position_embeddings).unsqueeze(0))
    randomize(model, seed, bias_std=0.02)
    return model.requires_grad_(False)


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


def _hf_tokenizer(files: Path) -> Any:
    import transformers

    # from_pretrained reads vocab.json + merges.txt in transformers 4 and 5 alike (5 renamed the
    # constructor's vocab_file/merges_file to vocab/merges and ignores the old names)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(files), pad_token="<|endoftext|>")
    tokenizer.model_max_length = 77  # diffusers pads and truncates prompts to this; unset, it is 1e30
    return tokenizer


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


def ldm_single_file_state(unet: Any, vae: Any, text_encoder: Any) -> dict[str, Tensor]:
    """The state dict of an SD1 LDM single file holding these diffusers/transformers components."""
    state: dict[str, Tensor] = {}
    for key, tensor in diffusers_to_ldm_unet(unet.state_dict()).items():
        state["model.diffusion_model." + key] = tensor
    levels = len(vae.config.block_out_channels)
    for key, tensor in diffusers_to_ldm_vae_reference(vae.state_dict(), levels).items():
        state["first_stage_model." + key] = tensor
    for key, tensor in text_encoder.state_dict().items():
        name = key if key.startswith("text_model.") else "text_model." + key
        state["cond_stage_model.transformer." + name] = tensor
    # what real LDM files also carry: the DDPM schedule buffers and CLIP's int64 position ids
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    state["betas"] = betas.float()
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
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
