"""The Stable Diffusion UNet (SD1.x, SD2.x, SDXL), with the LDM state-dict names.

Architecture: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models" (CompVis ``ldm/modules/diffusionmodules/openaimodel.py`` ``UNetModel`` and
``ldm/modules/attention.py`` ``SpatialTransformer``; Stability's ``sgm`` for SDXL). Module
names follow those files so a single-file checkpoint's ``model.diffusion_model.*`` tensors
load with the prefix stripped: ``time_embed``, ``label_emb``, ``input_blocks.N.M``,
``middle_block.M``, ``output_blocks.N.M``, ``out``.

One config-driven class serves every family; :meth:`UNetConfig.from_state_dict` reads the
config from tensor shapes and key indices, except what a file does not store (the head
convention and GroupNorm's 32 groups, REFERENCE.md "Checkpoint layouts").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from latentrt.core.errors import CheckpointError, InvalidRequest

__all__ = [
    "SD1_UNET",
    "SD2_UNET",
    "SDXL_UNET",
    "HeadConvention",
    "UNet",
    "UNetConfig",
    "sdxl_adm_vector",
    "timestep_embedding",
]

HeadConvention = Literal["sd1", "sd2", "sdxl"]
"""How attention heads are sized: SD1 has 8 heads per layer, SD2 and SDXL heads of 64 channels."""


class _Shaped(Protocol):
    """Anything with a shape: a tensor, a meta tensor, a lazily read checkpoint entry."""

    @property
    def shape(self) -> Sequence[int]: ...


@dataclass(frozen=True)
class UNetConfig:
    """The architecture of one UNet. Per-level tuples run from the full-resolution level down.

    ``transformer_depth[level]`` is the number of transformer blocks in each spatial
    transformer at that level; 0 means the level has no attention (SD's lowest level,
    SDXL's highest). Exactly one of ``num_heads`` (SD1: 8) and ``head_dim`` (SD2/SDXL: 64)
    is set. ``adm_in_channels`` is the width of SDXL's vector input ``y`` (2816), else None.
    """

    in_channels: int  # 4, or 9 for inpainting (latent + mask + masked-image latent)
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: tuple[int, ...]
    transformer_depth: tuple[int, ...]
    transformer_depth_middle: int
    context_dim: int
    num_heads: int | None = None
    head_dim: int | None = None
    use_linear_in_transformer: bool = False  # proj_in/proj_out as Linear (SD2, SDXL) or 1x1 conv (SD1)
    adm_in_channels: int | None = None
    num_groups: int = 32

    def __post_init__(self) -> None:
        levels = len(self.channel_mult)
        if len(self.num_res_blocks) != levels or len(self.transformer_depth) != levels:
            raise ValueError("channel_mult, num_res_blocks and transformer_depth need one entry per level")
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError("set exactly one of num_heads and head_dim")
        if self.transformer_depth_middle < 1:
            raise ValueError("the middle block needs at least one transformer block")
        for level in (*self.attention_levels, levels - 1):  # the middle block works at the last level's width
            width = self.channel_mult[level] * self.model_channels
            heads, head_dim = self.heads(width)
            if heads * head_dim != width:
                raise ValueError(f"{width} channels do not split into {heads} heads of {head_dim}")

    @property
    def attention_levels(self) -> tuple[int, ...]:
        """The levels that carry spatial transformers."""
        return tuple(level for level, depth in enumerate(self.transformer_depth) if depth > 0)

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) for an attention layer of ``channels`` width."""
        if self.num_heads is not None:
            return self.num_heads, channels // self.num_heads
        assert self.head_dim is not None
        return channels // self.head_dim, self.head_dim

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, _Shaped], *, heads: HeadConvention) -> UNetConfig:
        """Infer the config from a UNet state dict in LDM names (``model.diffusion_model.`` stripped).

        ``heads`` names the family's attention convention, which the weights do not store.
        """
        conv_in = _shape(sd, "input_blocks.0.0.weight")
        depths = _transformer_depths(sd)
        levels = _input_levels(sd, conv_in[0], depths)
        attention = next((key[: -len("attn2.to_k.weight")] for key in sd if key.endswith("attn2.to_k.weight")), None)
        if attention is None or "middle_block.1" not in depths:
            raise CheckpointError("UNet state dict lacks cross-attention ('*.attn2.to_k.weight', 'middle_block.1.*')")
        spatial_transformer = attention.split("transformer_blocks.")[0]
        try:
            return cls(
                in_channels=conv_in[1],
                out_channels=_shape(sd, "out.2.weight")[0],
                model_channels=conv_in[0],
                channel_mult=tuple(mult for mult, _, _ in levels),
                num_res_blocks=tuple(count for _, count, _ in levels),
                transformer_depth=tuple(depth for _, _, depth in levels),
                transformer_depth_middle=depths["middle_block.1"],
                context_dim=_shape(sd, attention + "attn2.to_k.weight")[1],
                num_heads=8 if heads == "sd1" else None,
                head_dim=None if heads == "sd1" else 64,
                use_linear_in_transformer=len(_shape(sd, spatial_transformer + "proj_in.weight")) == 2,
                adm_in_channels=_shape(sd, "label_emb.0.0.weight")[1] if "label_emb.0.0.weight" in sd else None,
            )
        except ValueError as error:
            raise CheckpointError(f"UNet state dict describes no valid UNet: {error}") from error


def _shape(sd: Mapping[str, _Shaped], key: str) -> tuple[int, ...]:
    """The shape of ``sd[key]``, or a CheckpointError naming the missing key."""
    if key not in sd:
        raise CheckpointError(f"UNet state dict is missing '{key}' (names without 'model.diffusion_model.')")
    return tuple(sd[key].shape)


def _transformer_depths(sd: Mapping[str, _Shaped]) -> dict[str, int]:
    """Transformer blocks per spatial transformer, keyed by its prefix (``input_blocks.1.1``)."""
    depths: dict[str, int] = {}
    for key in sd:
        match = re.match(r"(.+)\.transformer_blocks\.(\d+)\.", key)
        if match:
            depths[match[1]] = max(depths.get(match[1], 0), int(match[2]) + 1)
    return depths


def _input_levels(
    sd: Mapping[str, _Shaped], model_channels: int, depths: Mapping[str, int]
) -> list[tuple[int, int, int]]:
    """(channel multiplier, res blocks, transformer depth) per level, walking ``input_blocks``.

    Input block 0 is the stem conv; then each level's res blocks, with a ``Downsample``
    (``N.0.op``) between levels (openaimodel.py ``UNetModel.__init__``).
    """
    count = 1 + max(int(m[1]) for key in sd if (m := re.match(r"input_blocks\.(\d+)\.", key)))
    levels: list[list[tuple[int, int]]] = [[]]
    for n in range(1, count):
        if f"input_blocks.{n}.0.op.weight" in sd:
            levels.append([])
            continue
        width = _shape(sd, f"input_blocks.{n}.0.in_layers.2.weight")[0]
        levels[-1].append((width, depths.get(f"input_blocks.{n}.1", 0)))
    result = []
    for blocks in levels:
        if not blocks or len(set(blocks)) != 1 or blocks[0][0] % model_channels:
            raise CheckpointError(f"UNet input blocks do not form regular levels: {levels}")
        width, depth = blocks[0]
        result.append((width // model_channels, len(blocks), depth))
    return result


SD1_UNET = UNetConfig(4, 4, 320, (1, 2, 4, 4), (2, 2, 2, 2), (1, 1, 1, 0), 1, 768, num_heads=8)
"""SD 1.x (v1-inference.yaml): 859,520,964 parameters."""
SD2_UNET = UNetConfig(
    4, 4, 320, (1, 2, 4, 4), (2, 2, 2, 2), (1, 1, 1, 0), 1, 1024, head_dim=64, use_linear_in_transformer=True
)
"""SD 2.x (v2-inference.yaml): 865,910,724 parameters."""
SDXL_UNET = UNetConfig(
    4,
    4,
    320,
    (1, 2, 4),
    (2, 2, 2),
    (0, 2, 10),
    10,
    2048,
    head_dim=64,
    use_linear_in_transformer=True,
    adm_in_channels=2816,
)
"""SDXL base (sd_xl_base.yaml): 2,567,463,684 parameters."""


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[cos(t f_i) | sin(t f_i)]``, ``f_i = max_period^(-i/half)`` (LDM).

    Equals diffusers' ``get_timestep_embedding`` with ``flip_sin_to_cos=True`` and
    ``downscale_freq_shift=0``, the SD configs' settings. Returns float32 ``[N, dim]``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps.float()[:, None] * torch.exp(exponent)[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


def sdxl_adm_vector(text_embeds: Tensor, time_ids: Tensor, dim: int = 256) -> Tensor:
    """SDXL's vector input ``y``: pooled text embedding, then each time id embedded with ``dim`` features.

    ``time_ids`` is ``[batch, 6]``: original size, crop top-left, target size (sgm
    ``ConcatTimestepEmbedderND``; diffusers ``add_time_proj``).
    """
    time_embeds = timestep_embedding(time_ids.flatten(), dim).reshape(time_ids.shape[0], -1)
    return torch.cat([text_embeds, time_embeds.to(text_embeds.dtype)], dim=-1)


def _mlp(in_features: int, out_features: int) -> nn.Sequential:
    """Linear, SiLU, Linear: the timestep and ADM embedding MLPs (``time_embed``, ``label_emb.0``)."""
    return nn.Sequential(nn.Linear(in_features, out_features), nn.SiLU(), nn.Linear(out_features, out_features))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding added in between (openaimodel.py ``ResBlock``)."""

    def __init__(self, channels: int, out_channels: int, emb_channels: int, groups: int) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(  # index 2 is LDM's dropout
            nn.GroupNorm(groups, out_channels),
            nn.SiLU(),
            nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``skip(x) + out_layers(in_layers(x) + emb_layers(emb))``."""
        h: Tensor = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        out: Tensor = self.skip_connection(x) + self.out_layers(h)
        return out


class Attention(nn.Module):
    """Multi-head attention through ``scaled_dot_product_attention`` (attention.py ``CrossAttention``)."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim))  # LDM's dropout would be index 1

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(head_dim)) v, heads split from and merged back into the channels."""
        batch, tokens, _ = x.shape
        q, k, v = (
            t.view(batch, -1, self.heads, self.head_dim).transpose(1, 2)
            for t in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        heads_merged = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, -1)
        out: Tensor = self.to_out(heads_merged)
        return out


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        """``a * gelu(b)`` for ``a, b`` the two halves of the projection."""
        projected: Tensor = self.proj(x)
        a, b = projected.chunk(2, dim=-1)
        return a * F.gelu(b)


class FeedForward(nn.Module):
    """GEGLU up-projection to 4x the width, then back down (attention.py ``FeedForward``, ``glu=True``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim))  # 1: LDM's dropout

    def forward(self, x: Tensor) -> Tensor:
        """``W2 geglu(x)``."""
        out: Tensor = self.net(x)
        return out


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention on the text context, GEGLU feed-forward (``BasicTransformerBlock``)."""

    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = Attention(dim, dim, heads, head_dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """Three residual sub-layers: self-attention, cross-attention, feed-forward."""
        h = self.norm1(x)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm2(x), context)
        ff: Tensor = self.ff(self.norm3(x))
        return x + ff


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, plus the input (``SpatialTransformer``)."""

    def __init__(self, channels: int, depth: int, config: UNetConfig) -> None:
        super().__init__()
        self.linear = config.use_linear_in_transformer
        self.norm = nn.GroupNorm(config.num_groups, channels, eps=1e-6)
        heads, head_dim = config.heads(channels)
        inner = heads * head_dim
        self.proj_in = nn.Linear(channels, inner) if self.linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(inner, config.context_dim, heads, head_dim) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if self.linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """Project in (1x1 conv before or Linear after flattening), attend, project out, add ``x``."""
        batch, _, height, width = x.shape
        h: Tensor = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.flatten(2).transpose(1, 2)  # b c h w -> b (h w) c
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.transpose(1, 2).reshape(batch, -1, height, width)
        if not self.linear:
            h = self.proj_out(h)
        return h + x


class Downsample(nn.Module):
    """Strided 3x3 conv halving height and width."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Halve the resolution."""
        out: Tensor = self.op(x)
        return out


class Upsample(nn.Module):
    """Nearest-neighbour upsampling, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """Upsample to ``size`` (the next skip's height and width; odd sizes), else by 2."""
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:  # as diffusers: the size, not a factor, so odd skip sizes line up
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        out: Tensor = self.conv(x)
        return out


class UNetBlock(nn.ModuleList):
    """One ``input_blocks``/``middle_block``/``output_blocks`` entry (LDM ``TimestepEmbedSequential``)."""

    def forward(self, h: Tensor, emb: Tensor, context: Tensor, size: Sequence[int] | None = None) -> Tensor:
        """Run the layers in order, each given what it needs: ``emb``, ``context`` or the output size."""
        for layer in self:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, SpatialTransformer):
                h = layer(h, context)
            elif isinstance(layer, Upsample):
                h = layer(h, size)
            else:
                h = layer(h)
        return h


class UNet(nn.Module):
    """Noise-prediction UNet: ``(sample, timestep, context[, y]) -> noise_pred`` (openaimodel.py ``UNetModel``)."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        emb_dim = config.model_channels * 4
        self.time_embed = _mlp(config.model_channels, emb_dim)
        self.label_emb = (
            None if config.adm_in_channels is None else nn.Sequential(_mlp(config.adm_in_channels, emb_dim))
        )
        self.input_blocks, skip_channels = self._input_blocks(emb_dim)
        ch = skip_channels[-1]
        self.middle_block = UNetBlock(
            [
                ResBlock(ch, ch, emb_dim, config.num_groups),
                SpatialTransformer(ch, config.transformer_depth_middle, config),
                ResBlock(ch, ch, emb_dim, config.num_groups),
            ]
        )
        self.output_blocks = self._output_blocks(emb_dim, skip_channels)
        self.out = nn.Sequential(
            nn.GroupNorm(config.num_groups, config.model_channels),
            nn.SiLU(),
            nn.Conv2d(config.model_channels, config.out_channels, 3, padding=1),
        )

    def _input_blocks(self, emb_dim: int) -> tuple[nn.ModuleList, list[int]]:
        """Stem conv, then per level: res blocks (+ attention), a Downsample between levels."""
        c = self.config
        blocks = [UNetBlock([nn.Conv2d(c.in_channels, c.model_channels, 3, padding=1)])]
        skip_channels = [c.model_channels]
        ch = c.model_channels
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks[level]):
                layers: list[nn.Module] = [ResBlock(ch, mult * c.model_channels, emb_dim, c.num_groups)]
                ch = mult * c.model_channels
                if c.transformer_depth[level]:
                    layers.append(SpatialTransformer(ch, c.transformer_depth[level], c))
                blocks.append(UNetBlock(layers))
                skip_channels.append(ch)
            if level < len(c.channel_mult) - 1:
                blocks.append(UNetBlock([Downsample(ch)]))
                skip_channels.append(ch)
        return nn.ModuleList(blocks), skip_channels

    def _output_blocks(self, emb_dim: int, skip_channels: list[int]) -> nn.ModuleList:
        """Per level, deepest first: one more res block than on the way down, each fed a skip."""
        c = self.config
        skips, ch, blocks = list(skip_channels), skip_channels[-1], []
        for level in reversed(range(len(c.channel_mult))):
            width = c.channel_mult[level] * c.model_channels
            for i in range(c.num_res_blocks[level] + 1):
                layers: list[nn.Module] = [ResBlock(ch + skips.pop(), width, emb_dim, c.num_groups)]
                ch = width
                if c.transformer_depth[level]:
                    layers.append(SpatialTransformer(ch, c.transformer_depth[level], c))
                if level > 0 and i == c.num_res_blocks[level]:
                    layers.append(Upsample(ch))
                blocks.append(UNetBlock(layers))
        return nn.ModuleList(blocks)

    def forward(
        self, sample: Tensor, timestep: Tensor | float, encoder_hidden_states: Tensor, y: Tensor | None = None
    ) -> Tensor:
        """Predict the noise in ``sample`` [B, C, H, W] at ``timestep`` (scalar or [B]).

        ``encoder_hidden_states`` is the text context [B, tokens, context_dim]; ``y`` the
        ADM vector [B, adm_in_channels] for models that take one (SDXL, see
        :func:`sdxl_adm_vector`).
        """
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        emb: Tensor = self.time_embed(timestep_embedding(t, self.config.model_channels).to(sample.dtype))
        if self.label_emb is not None:
            if y is None:
                raise InvalidRequest(f"this UNet needs the vector input y [batch, {self.config.adm_in_channels}]")
            emb = emb + self.label_emb(y)
        h, skips = sample, []
        for block in self.input_blocks:
            h = block(h, emb, encoder_hidden_states)
            skips.append(h)
        h = self.middle_block(h, emb, encoder_hidden_states)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = block(h, emb, encoder_hidden_states, skips[-1].shape[-2:] if skips else None)
        out: Tensor = self.out(h)
        return out
