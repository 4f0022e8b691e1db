"""AutoencoderKL, the Stable Diffusion VAE (Rombach et al. 2022, https://arxiv.org/abs/2112.10752, sec. 3.1).

Our own code for CompVis ``ldm/modules/diffusionmodules/model.py`` (``Encoder``, ``Decoder``)
and ``ldm/models/autoencoder.py`` (``AutoencoderKL``), with the LDM state-dict names that
single files store under ``first_stage_model.`` and standalone VAE files at the top level
(``keys.vae`` converts the other layouts). What the files do not store follows the family's
convention (REFERENCE.md): GroupNorm with 32 groups and eps 1e-6, one-head mid-block
attention, swish activations, no attention outside the mid block.

Latents are scaled as in diffusers: ``encode`` returns ``(z - shift) * scale`` and
``decode`` inverts it. Images are ``[b, 3, H, W]`` in ``[-1, 1]``; ``decode`` does not clamp,
so an fp16 overflow stays visible to :func:`latentrt.core.pipeline.decode_finite`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from latentrt.core.checkpoint import load_module
from latentrt.core.errors import CheckpointError, InvalidRequest
from latentrt.core.layerwise import compute_dtype
from latentrt.plugins.stable_diffusion.keys.vae import to_ldm_vae

__all__ = [
    "SDXL_SCALING_FACTOR",
    "SD_SCALING_FACTOR",
    "AutoencoderKL",
    "Generators",
    "LatentDistribution",
    "Tiling",
    "VAEConfig",
]

logger = logging.getLogger(__name__)

SD_SCALING_FACTOR = 0.18215  # SD 1.x / 2.x: latents scaled to roughly unit variance
SDXL_SCALING_FACTOR = 0.13025  # SDXL
_GROUPS, _EPS = 32, 1e-6  # LDM ``Normalize``
_LOGVAR_MIN, _LOGVAR_MAX = -30.0, 20.0  # LDM ``DiagonalGaussianDistribution`` clamp
_SHOWN = 5  # offending keys listed in an error

#: What ``encode`` accepts to draw a posterior sample: one generator, or one per image.
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class VAEConfig:
    """Shape of an AutoencoderKL; the defaults are SD 1.x / 2.x / XL (``ch 128, ch_mult 1,2,4,4``)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    scaling_factor: float = SD_SCALING_FACTOR
    shift_factor: float = 0.0
    use_quant_conv: bool = True

    @property
    def downscale(self) -> int:
        """Image pixels per latent pixel: one stride-2 downsample between levels."""
        return int(2 ** (len(self.ch_mult) - 1))

    @classmethod
    def from_state_dict(
        cls, sd: Mapping[str, Tensor], *, scaling_factor: float = SD_SCALING_FACTOR, shift_factor: float = 0.0
    ) -> VAEConfig:
        """Infer the shape from an LDM-named state dict; the scale cannot be read from weights."""
        ch, in_channels = _shape(sd, "encoder.conv_in.weight")[:2]
        levels = _count(sd, "encoder.down.{}.block.0.conv1.weight")
        if levels == 0:
            raise CheckpointError("VAE state dict has no encoder.down.0.block.0.conv1.weight; not an LDM AutoencoderKL")
        widths = [_shape(sd, f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(levels)]
        if any(w % ch for w in widths):
            raise CheckpointError(f"VAE level widths {widths} are not multiples of conv_in's {ch} channels")
        return cls(
            in_channels=in_channels,
            out_channels=_shape(sd, "decoder.conv_out.weight")[0],
            latent_channels=_shape(sd, "decoder.conv_in.weight")[1],
            ch=ch,
            ch_mult=tuple(w // ch for w in widths),
            num_res_blocks=_count(sd, "encoder.down.0.block.{}.conv1.weight"),
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv="quant_conv.weight" in sd,
        )


def _shape(sd: Mapping[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise CheckpointError(f"VAE state dict is missing '{key}' (needed to infer the architecture)")
    return tuple(sd[key].shape)


def _count(sd: Mapping[str, Tensor], pattern: str) -> int:
    n = 0
    while pattern.format(n) in sd:
        n += 1
    return n


@dataclass(frozen=True)
class Tiling:
    """Tiled encode/decode for large images (diffusers ``enable_tiling``, A1111/ComfyUI tiled VAE).

    Sizes are in latent pixels (x ``downscale`` for image pixels); the defaults match
    diffusers' 512-pixel tiles with 25 % overlap. Tiles are spread evenly so each is full size
    and neighbours overlap by at least ``tile_overlap``; overlaps are cross-faded linearly.
    An image that fits in one tile is processed untiled, so its result is bit-identical.
    GroupNorm statistics and mid-block attention are per tile, so a multi-tile result differs
    slightly from the untiled one (``tests/test_sd_vae.py`` measures it).
    """

    tile_size: int = 64
    tile_overlap: int = 16

    def __post_init__(self) -> None:
        """Reject tiles that cannot advance."""
        if self.tile_size < 1 or not 0 <= self.tile_overlap < self.tile_size:
            raise InvalidRequest(
                f"VAE tiling needs tile_size >= 1 and 0 <= tile_overlap < tile_size, "
                f"got tile_size={self.tile_size}, tile_overlap={self.tile_overlap}"
            )


@dataclass(frozen=True)
class LatentDistribution:
    """The diagonal Gaussian posterior q(z|x) (LDM ``DiagonalGaussianDistribution``), unscaled."""

    mean: Tensor
    logvar: Tensor

    @classmethod
    def from_moments(cls, moments: Tensor) -> LatentDistribution:
        """Split ``quant_conv`` output into mean and clamped log-variance along channels."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX))

    @property
    def std(self) -> Tensor:
        """Standard deviation ``exp(logvar / 2)``."""
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: Generators = None) -> Tensor:
        """``mean + std * eps``, drawing ``eps`` as diffusers' ``randn_tensor`` does for ``generator``."""
        return self.mean + self.std * _randn(self.mean, generator)


def _randn(like: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise shaped like ``like``: drawn on the generator's device, one draw per
    image when given a list of generators (diffusers ``randn_tensor``), then moved to ``like``."""
    gens = list(generator) if isinstance(generator, Sequence) else [generator]
    if len(gens) not in (1, like.shape[0]):
        raise InvalidRequest(f"got {len(gens)} generators for a batch of {like.shape[0]} images")
    device = gens[0].device if gens[0] is not None else like.device
    if len(gens) == 1:
        noise = torch.randn(like.shape, generator=gens[0], device=device, dtype=like.dtype)
    else:
        shape = (1, *like.shape[1:])
        noise = torch.cat([torch.randn(shape, generator=g, device=device, dtype=like.dtype) for g in gens])
    return noise.to(like.device)


def _group_norm(channels: int) -> nn.GroupNorm:
    """LDM ``Normalize``: 32 groups, eps 1e-6 (neither is stored in checkpoints)."""
    return nn.GroupNorm(_GROUPS, channels, eps=_EPS, affine=True)


class ResnetBlock(nn.Module):
    """LDM ``ResnetBlock`` without timestep embedding: (norm, swish, conv) x 2 plus a skip."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _group_norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        # 1x1 projection of the skip when the width changes (LDM ``nin_shortcut``)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        """``skip(x) + conv2(swish(norm2(conv1(swish(norm1(x))))))``."""
        h: Tensor = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip: Tensor = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """LDM ``AttnBlock``: one-head self-attention over all pixels, q/k/v/out as 1x1 convs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _group_norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        # files converted from diffusers may store these as linear [out, in] weights; the
        # public register_load_state_dict_pre_hook needs torch >= 2.5, this form works from 1.x

    def forward(self, x: Tensor) -> Tensor:
        """``x + proj_out(softmax(q k^T / sqrt(c)) v)`` with tokens = pixels."""
        b, c, height, width = x.shape
        y = self.norm(x)
        # contiguous: a transposed view (last-dim stride != 1) sends CPU SDPA to its O(pixels^2) math path
        q, k, v = (
            t.reshape(b, 1, c, height * width).transpose(-1, -2).contiguous() for t in (self.q(y), self.k(y), self.v(y))
        )
        out = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(c), as LDM
        out = out.transpose(-1, -2).reshape(b, c, height, width)
        projected: Tensor = self.proj_out(out)
        return x + projected


class Downsample(nn.Module):
    """Stride-2 3x3 conv after an asymmetric zero pad (right and bottom by one), as LDM."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        """Halve the resolution."""
        out: Tensor = self.conv(F.pad(x, (0, 1, 0, 1)))
        return out


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv, as LDM."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Double the resolution."""
        out: Tensor = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return out


class Level(nn.Module):
    """One resolution: ResnetBlocks (``block.M``) then an optional resampler (``downsample``/``upsample``)."""

    def __init__(self, blocks: list[ResnetBlock], *, downsample: bool = False, upsample: bool = False) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        width = blocks[-1].conv2.out_channels
        self.downsample = Downsample(width) if downsample else None
        self.upsample = Upsample(width) if upsample else None

    def forward(self, h: Tensor) -> Tensor:
        """Run the blocks, then resample."""
        for block in self.block:
            h = block(h)
        if self.downsample is not None:
            h = self.downsample(h)
        if self.upsample is not None:
            h = self.upsample(h)
        return h


class MidBlock(nn.Module):
    """``block_1``, ``attn_1`` (the only attention in the VAE), ``block_2`` at the lowest resolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels)

    def forward(self, h: Tensor) -> Tensor:
        """Resnet, attention, resnet."""
        out: Tensor = self.block_2(self.attn_1(self.block_1(h)))
        return out


def _blocks(in_channels: int, out_channels: int, count: int) -> list[ResnetBlock]:
    return [ResnetBlock(in_channels if i == 0 else out_channels, out_channels) for i in range(count)]


class Encoder(nn.Module):
    """LDM ``Encoder`` (``double_z``): image -> mean and log-variance, ``2 * latent_channels``."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        inputs = [config.ch, *widths[:-1]]  # level i starts from the width of level i - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.ch, 3, padding=1)
        self.down = nn.ModuleList(
            Level(_blocks(inputs[i], w, config.num_res_blocks), downsample=i != len(widths) - 1)
            for i, w in enumerate(widths)
        )
        self.mid = MidBlock(widths[-1])
        self.norm_out = _group_norm(widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        """Downsample through the levels (``down.0`` is full resolution), then the mid block."""
        h: Tensor = self.conv_in(x)
        for level in self.down:
            h = level(h)
        out: Tensor = self.conv_out(F.silu(self.norm_out(self.mid(h))))
        return out


class Decoder(nn.Module):
    """LDM ``Decoder``: latent -> image. ``up.0`` is the highest resolution and runs last."""

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        widths = [config.ch * m for m in config.ch_mult]
        self.conv_in = nn.Conv2d(config.latent_channels, widths[-1], 3, padding=1)
        self.mid = MidBlock(widths[-1])
        # level i takes the width of level i + 1 (the one below it) and has one block more
        inputs = [*widths[1:], widths[-1]]
        self.up = nn.ModuleList(
            Level(_blocks(inputs[i], w, config.num_res_blocks + 1), upsample=i != 0) for i, w in enumerate(widths)
        )
        self.norm_out = _group_norm(widths[0])
        self.conv_out = nn.Conv2d(widths[0], config.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        """Mid block, then upsample through the levels from ``up.N-1`` to ``up.0``."""
        h: Tensor = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            h = self.up[i](h)
        out: Tensor = self.conv_out(F.silu(self.norm_out(h)))
        return out


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of LDM; implements :class:`latentrt.core.protocols.VAE`."""

    def __init__(self, config: VAEConfig, *, tiling: Tiling | None = None) -> None:
        super().__init__()
        self.config = config
        self.scaling_factor = config.scaling_factor
        self.shift_factor = config.shift_factor
        self.latent_channels = config.latent_channels
        self.downscale = config.downscale
        self.tiling = tiling  # default for encode/decode; None = untiled
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        moments = 2 * config.latent_channels
        self.quant_conv = nn.Conv2d(moments, moments, 1) if config.use_quant_conv else None
        self.post_quant_conv = (
            nn.Conv2d(config.latent_channels, config.latent_channels, 1) if config.use_quant_conv else None
        )

    @classmethod
    def from_state_dict(
        cls,
        state_dict: Mapping[str, Tensor],
        *,
        scaling_factor: float = SD_SCALING_FACTOR,
        shift_factor: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        tiling: Tiling | None = None,
    ) -> AutoencoderKL:
        """Build from any VAE layout (``keys.vae.to_ldm_vae``), strictly: no missing, extra or misshapen key.

        The module is built on the meta device and takes the given tensors (``assign``), so
        memory-mapped weights are not copied unless ``dtype``/``device`` asks for it.
        """
        sd = to_ldm_vae(state_dict)
        config = VAEConfig.from_state_dict(sd, scaling_factor=scaling_factor, shift_factor=shift_factor)
        model = load_module(lambda: cls(config, tiling=tiling), sd, "VAE", device=device, dtype=dtype)
        assert isinstance(model, AutoencoderKL)
        return model

    def posterior(self, images: Tensor, *, tiling: Tiling | None = None) -> LatentDistribution:
        """q(z|x) for ``[b, 3, H, W]`` images in ``[-1, 1]`` (H, W multiples of ``downscale``)."""
        images = self._check_images(images)
        tiling = tiling or self.tiling
        if tiling is None or _fits(images, tiling, self.downscale):
            return LatentDistribution.from_moments(self._moments(images))
        return LatentDistribution.from_moments(_tiled(self._moments, images, tiling, self.downscale, 1))

    def encode(self, images: Tensor, generator: Generators = None, *, tiling: Tiling | None = None) -> Tensor:
        """Scaled latents ``(z - shift) * scale``: the posterior mean, or a sample drawn with ``generator``."""
        dist = self.posterior(images, tiling=tiling)
        z = dist.mean if generator is None else dist.sample(generator)
        return (z - self.shift_factor) * self.scaling_factor

    def decode(self, latents: Tensor, *, tiling: Tiling | None = None) -> Tensor:
        """Images (nominally ``[-1, 1]``, not clamped) from scaled latents ``[b, c, h, w]``."""
        z = self._check_latents(latents) / self.scaling_factor + self.shift_factor
        tiling = tiling or self.tiling
        if tiling is None or _fits(z, tiling, 1):
            return self._decode_unscaled(z)
        return _tiled(self._decode_unscaled, z, tiling, 1, self.downscale)

    def _moments(self, images: Tensor) -> Tensor:
        h: Tensor = self.encoder(images)
        return h if self.quant_conv is None else self.quant_conv(h)

    def _decode_unscaled(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        out: Tensor = self.decoder(z)
        return out

    def _placement(self) -> tuple[torch.device, torch.dtype]:
        """Where and in what dtype the VAE computes (its weights may be stored reduced)."""
        return self.encoder.conv_in.weight.device, compute_dtype(self)

    def _check_images(self, images: Tensor) -> Tensor:
        d, c = self.downscale, self.config.in_channels
        if images.ndim != 4 or images.shape[1] != c:
            raise InvalidRequest(f"VAE encode expects images [batch, {c}, height, width], got {list(images.shape)}")
        height, width = images.shape[-2:]
        if height % d or width % d:
            raise InvalidRequest(f"image size {width}x{height} is not divisible by the VAE downscale factor {d}")
        device, dtype = self._placement()
        return images.to(device=device, dtype=dtype)

    def _check_latents(self, latents: Tensor) -> Tensor:
        c = self.latent_channels
        if latents.ndim != 4 or latents.shape[1] != c:
            raise InvalidRequest(f"VAE decode expects latents [batch, {c}, height, width], got {list(latents.shape)}")
        device, dtype = self._placement()
        return latents.to(device=device, dtype=dtype)


def _fits(x: Tensor, tiling: Tiling, scale: int) -> bool:
    """Whether ``x`` (``scale`` pixels per latent pixel) fits in one tile."""
    return max(x.shape[-2], x.shape[-1]) <= tiling.tile_size * scale


def _tile_spans(length: int, tiling: Tiling) -> list[tuple[int, int]]:
    """Full-size tiles spread evenly over ``length`` latent pixels, overlapping >= ``tile_overlap``."""
    size = tiling.tile_size
    if length <= size:
        return [(0, length)]
    stride = size - tiling.tile_overlap
    gaps = -(-(length - size) // stride)  # ceil: number of steps between the first and last tile
    starts = [(k * (length - size) + gaps // 2) // gaps for k in range(gaps + 1)]
    return [(s, s + size) for s in starts]


def _blend_weights(spans: list[tuple[int, int]], scale: int) -> list[Tensor]:
    """Per-tile 1-D weights in output pixels: 1 inside, a linear ramp across each overlap.

    Two overlapping tiles get ``(i + 0.5) / n`` and ``1 - (i + 0.5) / n`` (diffusers'
    ``blend_h``/``blend_v`` cross-fade, centred); the weights are normalised to sum to 1
    at every pixel, which also covers the rare pixel inside three tiles.
    """
    full = []
    for k, (start, end) in enumerate(spans):
        w = torch.zeros(spans[-1][1] * scale, dtype=torch.float64)
        w[start * scale : end * scale] = 1.0
        if k > 0 and (n := (spans[k - 1][1] - start) * scale) > 0:
            rise = (torch.arange(n, dtype=torch.float64) + 0.5) / n
            w[start * scale : start * scale + n] = torch.minimum(w[start * scale : start * scale + n], rise)
        if k + 1 < len(spans) and (n := (end - spans[k + 1][0]) * scale) > 0:
            fall = (n - 0.5 - torch.arange(n, dtype=torch.float64)) / n
            w[end * scale - n : end * scale] = torch.minimum(w[end * scale - n : end * scale], fall)
        full.append(w)
    total = torch.stack(full).sum(0)
    return [(w / total)[s * scale : e * scale] for w, (s, e) in zip(full, spans, strict=True)]


def _tiled(fn: Callable[[Tensor], Tensor], x: Tensor, tiling: Tiling, in_scale: int, out_scale: int) -> Tensor:
    """Apply ``fn`` tile by tile and cross-fade the overlaps.

    ``in_scale``/``out_scale`` are the pixels of ``x`` and of ``fn``'s output per latent
    pixel (encode: ``downscale``/1, decode: 1/``downscale``); tiles lie on the latent grid.
    """
    rows = _tile_spans(x.shape[-2] // in_scale, tiling)
    cols = _tile_spans(x.shape[-1] // in_scale, tiling)
    row_w, col_w = _blend_weights(rows, out_scale), _blend_weights(cols, out_scale)
    out: Tensor | None = None
    for (y0, y1), wy in zip(rows, row_w, strict=True):
        for (x0, x1), wx in zip(cols, col_w, strict=True):
            tile = fn(x[..., y0 * in_scale : y1 * in_scale, x0 * in_scale : x1 * in_scale])
            if out is None:
                out = tile.new_zeros(*tile.shape[:2], rows[-1][1] * out_scale, cols[-1][1] * out_scale)
            weight = (wy[:, None] * wx[None, :]).to(device=tile.device, dtype=tile.dtype)
            out[..., y0 * out_scale : y1 * out_scale, x0 * out_scale : x1 * out_scale] += tile * weight
    assert out is not None  # there is always at least one tile
    return out
