"""Full-size SD 1.5 and SDXL checkpoints with random weights, in the real single-file (LDM) layouts.

No real weights can be downloaded here, so benchmarks and the slow tests write one: the
state-dict names and shapes come from our own networks built on the meta device, under
the prefixes real files use (``model.diffusion_model.``, ``first_stage_model.``,
``cond_stage_model.transformer.text_model.``; SDXL: ``conditioner.embedders.0.transformer.``
for CLIP-L and ``conditioner.embedders.1.model.`` for OpenCLIP bigG, whose names are written
out here from open_clip's layout). SD 1.5 and the float32 SDXL file are written once and cached.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from latentrt.plugins.stable_diffusion.clip import CLIP_VIT_L, CLIPTextTransformer
from latentrt.plugins.stable_diffusion.unet import SD1_UNET, SDXL_UNET, UNet
from latentrt.plugins.stable_diffusion.vae import AutoencoderKL, VAEConfig

CACHE = Path(__file__).resolve().parent / ".cache"
PARTS = (
    ("model.diffusion_model.", lambda: UNet(SD1_UNET)),
    ("first_stage_model.", lambda: AutoencoderKL(VAEConfig())),
    ("cond_stage_model.transformer.text_model.", lambda: CLIPTextTransformer(CLIP_VIT_L)),
)


def sd15_shapes() -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of an SD 1.5 single file (EMA-only)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, build in PARTS:
        with torch.device("meta"):
            module = build()
        shapes.update({prefix + name: tuple(t.shape) for name, t in module.state_dict().items()})
    return shapes


# What real files carry besides the networks (v1-5-pruned.ckpt converted to safetensors):
# the DDPM schedule buffers, EMA bookkeeping, CLIP's position ids, the VAE's training loss.
REAL_FILE_EXTRAS = {
    "alphas_cumprod": (1000,),
    "betas": (1000,),
    "model_ema.decay": (),
    "model_ema.num_updates": (),
    "cond_stage_model.transformer.text_model.embeddings.position_ids": (1, 77),
    "first_stage_model.loss.logvar": (),
}


def write_random_sd15(path: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write a random-weight SD 1.5 single file to ``path`` (about 4.3 GB in fp32), with the
    non-network tensors real files carry."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {**sd15_shapes(), **REAL_FILE_EXTRAS}
    tensors = {name: (torch.randn(shape, generator=generator) * 0.02).to(dtype) for name, shape in shapes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def cached_sd15(dtype: torch.dtype = torch.float32) -> Path:
    """The cached random SD 1.5 file, written on first use."""
    path = CACHE / f"sd15-random-{str(dtype).removeprefix('torch.')}.safetensors"
    return path if path.exists() else write_random_sd15(path, dtype)


# --- SDXL base (sd_xl_base_1.0 layout) --------------------------------------------------------


def openclip_text_shapes(
    width: int, layers: int, mlp: int, *, vocab: int = 49408, context: int = 77, projection: int | None = None
) -> dict[str, tuple[int, ...]]:
    """The tensors of an OpenCLIP ``TextTransformer`` as SD2/SDXL files store it, written out from
    open_clip's module layout (independent of ``latentrt...keys.clip``): q, k, v stacked in
    ``attn.in_proj_*``, ``text_projection`` as ``[width, projection]``, and ``logit_scale``."""
    shapes: dict[str, tuple[int, ...]] = {
        "token_embedding.weight": (vocab, width),
        "positional_embedding": (context, width),
        "ln_final.weight": (width,),
        "ln_final.bias": (width,),
        "logit_scale": (),
    }
    if projection is not None:
        shapes["text_projection"] = (width, projection)
    for n in range(layers):
        block = f"transformer.resblocks.{n}."
        shapes.update(
            {
                block + "ln_1.weight": (width,),
                block + "ln_1.bias": (width,),
                block + "attn.in_proj_weight": (3 * width, width),
                block + "attn.in_proj_bias": (3 * width,),
                block + "attn.out_proj.weight": (width, width),
                block + "attn.out_proj.bias": (width,),
                block + "ln_2.weight": (width,),
                block + "ln_2.bias": (width,),
                block + "mlp.c_fc.weight": (mlp, width),
                block + "mlp.c_fc.bias": (mlp,),
                block + "mlp.c_proj.weight": (width, mlp),
                block + "mlp.c_proj.bias": (width,),
            }
        )
    return shapes


SDXL_BIG_G_PREFIX = "conditioner.embedders.1.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_PARTS = (
    ("model.diffusion_model.", lambda: UNet(SDXL_UNET)),
    ("first_stage_model.", lambda: AutoencoderKL(VAEConfig())),
    (SDXL_CLIP_L_PREFIX, lambda: CLIPTextTransformer(CLIP_VIT_L)),
)


def sdxl_shapes() -> dict[str, tuple[int, ...]]:
    """Every network tensor name and shape of an SDXL base single file: the UNet, VAE and CLIP-L from
    our networks on the meta device, OpenCLIP bigG (32 layers of 1280, projection 1280) from
    :func:`openclip_text_shapes`."""
    shapes: dict[str, tuple[int, ...]] = {}
    for prefix, build in SDXL_PARTS:
        with torch.device("meta"):
            module = build()
        shapes.update({prefix + name: tuple(t.shape) for name, t in module.state_dict().items()})
    big_g = openclip_text_shapes(1280, 32, 5120, projection=1280)
    shapes.update({SDXL_BIG_G_PREFIX + name: shape for name, shape in big_g.items()})
    return shapes


def write_random_sdxl(path: Path, dtype: torch.dtype = torch.float16, seed: int = 0) -> Path:
    """Write a random-weight SDXL base single file to ``path`` (about 6.9 GB in fp16), with CLIP-L's
    int64 ``position_ids`` as real files carry them. Tensors are drawn one at a time, so memory
    holds the file's tensors once (in ``dtype``) plus one float32 tensor."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in sdxl_shapes().items():
        tensors[name] = torch.randn(shape, generator=generator).mul_(0.02).to(dtype)
    tensors[SDXL_CLIP_L_PREFIX + "embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def write_random_sdxl_streaming(path: Path, dtype: torch.dtype = torch.float32, seed: int = 0) -> Path:
    """Write the same file as :func:`write_random_sdxl`, one tensor at a time: memory holds one
    tensor, not the file (13.9 GB in float32, more than a small machine can spare). The
    safetensors layout is an 8-byte little-endian header length, a JSON header of names, dtypes,
    shapes and byte offsets (space-padded to 8 bytes), then the tensors' bytes in that order."""
    position_ids = SDXL_CLIP_L_PREFIX + "embeddings.position_ids"
    entries = [(name, shape, dtype) for name, shape in sdxl_shapes().items()] + [(position_ids, (1, 77), torch.int64)]
    header: dict[str, dict[str, object]] = {}
    offset = 0
    for name, shape, entry_dtype in entries:
        size = torch.Size(shape).numel() * entry_dtype.itemsize
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[entry_dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator().manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with partial.open("wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for _, shape, _ in entries[:-1]:
            f.write(
                torch.randn(shape, generator=generator).mul_(0.02).to(dtype).reshape(-1).view(torch.uint8).numpy().data
            )
        f.write(torch.arange(77).unsqueeze(0).numpy().data)
    partial.rename(path)  # a killed write leaves no half file under the cached name
    return path


def cached_sdxl(dtype: torch.dtype = torch.float32) -> Path:
    """The cached random SDXL base file (float32: 13.9 GB on disk), written on first use."""
    path = CACHE / f"sdxl-random-{str(dtype).removeprefix('torch.')}.safetensors"
    return path if path.exists() else write_random_sdxl_streaming(path, dtype)
