"""Full-size SD 1.5 checkpoints with random weights, in the real single-file (LDM) layout.

No real weights can be downloaded here, so benchmarks and the slow tests write one: the
state-dict names and shapes come from our own networks built on the meta device, under
the prefixes real files use (``model.diffusion_model.``, ``first_stage_model.``,
``cond_stage_model.transformer.text_model.``). Written once and cached.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from latentrt.plugins.stable_diffusion.clip import CLIP_VIT_L, CLIPTextTransformer
from latentrt.plugins.stable_diffusion.unet import SD1_UNET, UNet
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
