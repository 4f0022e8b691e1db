"""The built-in demo model's architecture: Stable Diffusion's networks at a small size.

The demo model is an SD 1.x-style latent-diffusion model (eps prediction, SD's 1000-step
scaled-linear schedule) whose three networks are our ordinary SD classes with small
configs:

* VAE: :class:`~latentrt.plugins.stable_diffusion.vae.AutoencoderKL`, 64x64x3 images to
  4x16x16 latents (three levels, downscale 4);
* UNet: :class:`~latentrt.plugins.stable_diffusion.unet.UNet` with cross-attention at the
  8x8 and 4x4 levels, 64-feature heads (the SD2 convention) and a 128-wide context;
* text encoder: :class:`~latentrt.plugins.stable_diffusion.clip.CLIPTextTransformer`, two
  layers of width 128, fed by the real CLIP tokenizer. Its token table is *pruned* to the
  few dozen CLIP tokens the demo captions use (:class:`PrunedTokenEmbedding`), which keeps
  the package small; any other token reads the "unknown" row 0.

Weights are stored in the single-file LDM layout real SD checkpoints use
(``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.transformer.``) plus
LDM's top-level ``scale_factor`` (the latent scale measured after training the VAE, which
``scale_by_std`` LDM checkpoints store the same way).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from latentrt.plugins.demo.dataset import caption_vocabulary
from latentrt.plugins.stable_diffusion.clip import CLIPTextConfig, CLIPTextTransformer
from latentrt.plugins.stable_diffusion.tokenizer import CLIPTokenizer
from latentrt.plugins.stable_diffusion.unet import UNetConfig
from latentrt.plugins.stable_diffusion.vae import VAEConfig

__all__ = [
    "DEMO_UNET",
    "DEMO_VAE",
    "TOKEN_IDS_KEY",
    "UNKNOWN_TOKEN",
    "PrunedTokenEmbedding",
    "demo_text_config",
    "demo_text_model",
    "demo_token_ids",
]

#: The demo VAE: 64x64 RGB <-> 4x16x16 latents. Its scale factor is measured by training.
DEMO_VAE = VAEConfig(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, scaling_factor=1.0)

#: The demo UNet: three levels (32, 64, 128 channels) over 16x16 latents, cross-attention at 8x8 and 4x4.
DEMO_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2, 4),
    num_res_blocks=(1, 1, 1),
    transformer_depth=(0, 1, 1),
    transformer_depth_middle=1,
    context_dim=128,
    head_dim=64,
    use_linear_in_transformer=True,
)

#: The pruned table's "unknown" marker: row 0 has this id, which no real token has.
UNKNOWN_TOKEN = -1

#: Where the pruned table stores which CLIP id each row is (transformers names, under
#: ``cond_stage_model.transformer.`` in the single file).
TOKEN_IDS_KEY = "text_model.embeddings.token_embedding.token_ids"


def demo_token_ids(tokenizer: CLIPTokenizer, words: Iterable[str] | None = None) -> list[int]:
    """The pruned vocabulary: :data:`UNKNOWN_TOKEN`, then every CLIP id of ``words``, start, end and pad, sorted."""
    ids = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.comma_id}
    for word in caption_vocabulary() if words is None else words:
        ids.update(tokenizer.encode(word))
    return [UNKNOWN_TOKEN, *sorted(ids)]


class PrunedTokenEmbedding(nn.Module):
    """A token table holding only some CLIP ids: row ``i`` embeds CLIP id ``token_ids[i]``.

    Lookup compares each id with ``token_ids`` and takes the first matching row; an id with
    no row matches nothing and reads row 0, the unknown-token row. The comparison is a plain
    ``Equal`` + ``ArgMax``, so the table traces and exports like any embedding.
    """

    def __init__(self, token_ids: Tensor, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(len(token_ids), hidden_size, device=token_ids.device))
        self.register_buffer("token_ids", token_ids.to(torch.int64))
        nn.init.normal_(self.weight, std=0.02)

    def rows(self, input_ids: Tensor) -> Tensor:
        """The table row of each CLIP id (0 for ids outside the table)."""
        token_ids: Tensor = self.token_ids  # type: ignore[assignment]
        matches = input_ids.unsqueeze(-1) == token_ids.to(input_ids.device)
        return matches.to(torch.int32).argmax(dim=-1)

    def forward(self, input_ids: Tensor) -> Tensor:
        """``[..., tokens]`` CLIP ids -> ``[..., tokens, hidden]``."""
        return nn.functional.embedding(self.rows(input_ids), self.weight)


def demo_text_config(vocab_rows: int) -> CLIPTextConfig:
    """The demo text encoder's config for a pruned table of ``vocab_rows`` rows."""
    return CLIPTextConfig(vocab_size=vocab_rows, hidden_size=128, num_layers=2, intermediate_size=512)


def demo_text_model(token_ids: Tensor) -> CLIPTextTransformer:
    """A CLIP text transformer whose token table is pruned to ``token_ids``.

    Built on whatever device ``token_ids`` is on (``meta`` for loading with ``assign``).
    """
    model = CLIPTextTransformer(demo_text_config(len(token_ids)))
    model.embeddings.token_embedding = PrunedTokenEmbedding(token_ids, model.config.hidden_size)  # type: ignore[assignment]
    return model
