"""AutoencoderKL (plugins/stable_diffusion/vae.py) and its key layouts (keys/vae.py).

diffusers' AutoencoderKL is the test-only reference: the same tiny random weights are loaded
into both (converted through ``keys.vae``) and the outputs compared in float32.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from sd_fixtures import randomize
from torch import Tensor, nn

from latentrt.core.errors import CheckpointError, InvalidRequest, LatentRTError
from latentrt.core.pipeline import decode_finite
from latentrt.core.protocols import VAE
from latentrt.plugins.stable_diffusion.keys.vae import diffusers_to_ldm_vae, strip_vae_prefix, to_ldm_vae
from latentrt.plugins.stable_diffusion.vae import (
    SDXL_SCALING_FACTOR,
    AutoencoderKL,
    Generators,
    Tiling,
    VAEConfig,
    _blend_weights,
    _tile_spans,
    _tiled,
)

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
SD_VAE_PARAMETERS = 83_653_863
# Tiled vs untiled on the tiny random VAE below (64x64 image, 32x32 latent, 3x3 tiles of 16
# latent pixels overlapping by 8). GroupNorm statistics and mid-block attention are per tile,
# and a random decoder amplifies that: measured decode max 2.15 / RMS 0.29 (output std 0.57;
# diffusers' enable_tiling with the same tile and overlap: 2.59 / 0.35), encode max 0.18 /
# RMS 0.033 (latent std 0.107; diffusers 0.19 / 0.042). Bounds are the measurements x1.25.
TILED_DECODE_MAX, TILED_DECODE_RMS = 2.7, 0.37
TILED_ENCODE_MAX, TILED_ENCODE_RMS = 0.23, 0.042


def _tiny_diffusers(layers_per_block: int = 2, seed: int = 0) -> Any:
    """A tiny diffusers AutoencoderKL (two levels, widths 32/64) with every parameter re-drawn."""
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    ).eval()
    randomize(vae, seed)
    return vae


def _images(batch: int = 2, size: int = 32, seed: int = 1) -> Tensor:
    """Smooth image-like inputs in [-1, 1]: upsampled low-resolution noise."""
    low = torch.randn(batch, 3, size // 4, size // 4, generator=torch.Generator().manual_seed(seed))
    return torch.tanh(F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False))


def _ours(reference: Any, **kwargs: Any) -> AutoencoderKL:
    return AutoencoderKL.from_state_dict(diffusers_to_ldm_vae(reference.state_dict()), **kwargs)


@pytest.fixture(scope="module")
def pair() -> tuple[Any, AutoencoderKL]:
    """The tiny diffusers reference and our VAE with the same weights."""
    reference = _tiny_diffusers()
    return reference, _ours(reference)


def _max_diff(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max())


# --- parity with diffusers ------------------------------------------------------------------


@pytest.mark.parametrize("layers_per_block", [1, 2])
def test_matches_diffusers(layers_per_block: int) -> None:
    reference = _tiny_diffusers(layers_per_block)
    ours = _ours(reference)
    assert ours.config == VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=layers_per_block)
    assert ours.downscale == 2
    x = _images()
    with torch.no_grad():
        dist = reference.encode(x).latent_dist
        posterior = ours.posterior(x)
        assert _max_diff(posterior.mean, dist.mean) < TOL
        assert _max_diff(posterior.std, dist.std) < TOL
        assert float(dist.std.std()) > 0.01  # the log-variance path is exercised, not clamped flat

        sampled = ours.encode(x, torch.Generator().manual_seed(7))
        expected = dist.sample(torch.Generator().manual_seed(7)) * ours.scaling_factor
        assert _max_diff(sampled, expected) < TOL
        assert _max_diff(ours.encode(x), dist.mean * ours.scaling_factor) < TOL

        z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
        decoded = ours.decode(z)
        assert _max_diff(decoded, reference.decode(z / ours.scaling_factor).sample) < TOL
    assert decoded.shape == (2, 3, 32, 32)


def test_per_image_generators_match_single_runs(pair: tuple[Any, AutoencoderKL]) -> None:
    _, ours = pair
    x = _images()
    with torch.no_grad():
        both = ours.encode(x, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
        second = ours.encode(x[1:], torch.Generator().manual_seed(2))
    assert _max_diff(both[1:], second) < 1e-6
    with pytest.raises(InvalidRequest, match="3 generators for a batch of 2"):
        ours.encode(x, [torch.Generator()] * 3)


def test_shift_factor_and_scale_round_trip(pair: tuple[Any, AutoencoderKL]) -> None:
    reference, _ = pair
    shifted = _ours(reference, scaling_factor=SDXL_SCALING_FACTOR, shift_factor=0.25)
    x = _images()
    with torch.no_grad():
        mean = reference.encode(x).latent_dist.mean
        assert _max_diff(shifted.encode(x), (mean - 0.25) * SDXL_SCALING_FACTOR) < TOL
        z = torch.randn(1, 4, 8, 8)
        assert _max_diff(shifted.decode(z), reference.decode(z / SDXL_SCALING_FACTOR + 0.25).sample) < TOL


def test_implements_the_vae_protocol(pair: tuple[Any, AutoencoderKL]) -> None:
    _, ours = pair
    assert isinstance(ours, VAE)
    assert (ours.latent_channels, ours.downscale, ours.shift_factor) == (4, 2, 0.0)
    assert not any(p.requires_grad for p in ours.parameters())


# --- layouts --------------------------------------------------------------------------------


def _ldm_dict(reference: Any, attention_ndim: int) -> dict[str, Tensor]:
    sd = diffusers_to_ldm_vae(reference.state_dict())
    for key in [k for k in sd if ".attn_1." in k and k.endswith(".weight") and sd[k].ndim == 4]:
        sd[key] = sd[key].reshape(sd[key].shape[:attention_ndim])
    return sd


@pytest.mark.parametrize("attention_ndim", [4, 3, 2])
def test_ldm_attention_as_conv_or_linear(pair: tuple[Any, AutoencoderKL], attention_ndim: int) -> None:
    reference, ours = pair
    sd = _ldm_dict(reference, attention_ndim)
    assert sd["encoder.mid.attn_1.q.weight"].ndim == attention_ndim
    loaded = AutoencoderKL.from_state_dict(sd)
    assert loaded.encoder.mid.attn_1.q.weight.shape == (64, 64, 1, 1)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), ours.decode(z))


@pytest.mark.parametrize("prefix", ["first_stage_model.", "vae."])
@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_prefixed_checkpoints(pair: tuple[Any, AutoencoderKL], prefix: str, layout: str) -> None:
    reference, ours = pair
    inner = reference.state_dict() if layout == "diffusers" else _ldm_dict(reference, 4)
    checkpoint = {f"{prefix}{k}": t for k, t in inner.items()}
    checkpoint["model.diffusion_model.out.2.weight"] = torch.zeros(1)  # other components are ignored
    assert set(to_ldm_vae(checkpoint)) == set(ours.state_dict())
    assert set(strip_vae_prefix(checkpoint)) == set(inner)
    loaded = AutoencoderKL.from_state_dict(checkpoint)
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z), ours.decode(z))


def test_old_diffusers_attention_names() -> None:
    reference = _tiny_diffusers()
    renamed = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    sd = {}
    for key, t in reference.state_dict().items():
        for new, old in renamed.items():
            key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        sd[key] = t
    assert "encoder.mid_block.attentions.0.query.weight" in sd
    assert set(diffusers_to_ldm_vae(sd)) == set(diffusers_to_ldm_vae(reference.state_dict()))


def _sd_reference_on_meta() -> Any:
    with torch.device("meta"):
        return diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
        )


def test_full_size_sd_vae_on_meta() -> None:
    with torch.device("meta"):
        ours = AutoencoderKL(VAEConfig())
    reference = _sd_reference_on_meta()
    count = sum(p.numel() for p in ours.parameters())
    assert count == SD_VAE_PARAMETERS == sum(p.numel() for p in reference.parameters())
    assert ours.downscale == 8
    # the full-size diffusers layout converts onto exactly our names and shapes
    converted = diffusers_to_ldm_vae(reference.state_dict())
    expected = ours.state_dict()
    assert set(converted) == set(expected)
    assert all(converted[k].shape == t.shape for k, t in expected.items())
    loaded = AutoencoderKL.from_state_dict(converted)
    assert loaded.config == VAEConfig()
    assert converted["decoder.up.0.block.0.conv1.weight"].shape == (128, 256, 3, 3)  # up.0 = highest resolution


# --- tiling ---------------------------------------------------------------------------------


def test_single_tile_is_bit_identical(pair: tuple[Any, AutoencoderKL]) -> None:
    _, ours = pair
    x = _images(batch=1, size=32)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    one_tile = Tiling(tile_size=16, tile_overlap=4)
    with torch.no_grad():
        assert torch.equal(ours.encode(x, tiling=one_tile), ours.encode(x))
        assert torch.equal(ours.decode(z, tiling=one_tile), ours.decode(z))


@pytest.mark.parametrize(("length", "tile", "overlap"), [(64, 32, 8), (70, 32, 8), (13, 8, 4), (9, 8, 2), (40, 16, 0)])
def test_tiled_map_is_exact_for_a_pointwise_function(length: int, tile: int, overlap: int) -> None:
    """Tile placement and the overlap weights (a partition of unity) reassemble any local map exactly."""
    x = torch.randn(2, 3, length, length + 5)

    def fn(t: Tensor) -> Tensor:
        return F.interpolate(2.0 * t + 1.0, scale_factor=4.0, mode="nearest")

    assert _max_diff(_tiled(fn, x, Tiling(tile, overlap), 1, 4), fn(x)) < 1e-5
    spans = _tile_spans(length, Tiling(tile, overlap))
    assert spans[0][0] == 0
    assert spans[-1][1] == length
    assert all(e - s == min(tile, length) for s, e in spans)
    assert all(prev[1] - nxt[0] >= overlap for prev, nxt in itertools.pairwise(spans))
    total = torch.zeros(length * 4, dtype=torch.float64)
    for (s, e), w in zip(spans, _blend_weights(spans, 4), strict=True):
        total[s * 4 : e * 4] += w
    assert torch.allclose(total, torch.ones_like(total))


def test_two_tiles_cross_fade_linearly() -> None:
    spans = _tile_spans(12, Tiling(8, 4))
    assert spans == [(0, 8), (4, 12)]
    first, second = _blend_weights(spans, 1)
    assert first[4:].tolist() == pytest.approx([0.875, 0.625, 0.375, 0.125])
    assert second[:4].tolist() == pytest.approx([0.125, 0.375, 0.625, 0.875])


def _rms(a: Tensor, b: Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def _diffusers_tiling(reference: Any, tiling: Tiling, downscale: int) -> None:
    """The same tile size and overlap through diffusers' ``enable_tiling``."""
    reference.enable_tiling()
    reference.tile_latent_min_size = tiling.tile_size
    reference.tile_sample_min_size = tiling.tile_size * downscale
    reference.tile_overlap_factor = tiling.tile_overlap / tiling.tile_size


def test_tiled_large_image_is_close() -> None:
    """Several overlapping tiles: close to untiled, and at least as close as diffusers' tiling."""
    reference = _tiny_diffusers()
    ours = _ours(reference)
    x = _images(batch=1, size=64, seed=4)
    tiling = Tiling(tile_size=16, tile_overlap=6)  # latent 32x32 -> 3x3 tiles of 16, overlapping by 8
    _diffusers_tiling(reference, tiling, ours.downscale)
    with torch.no_grad():
        z, z_tiled = ours.encode(x), ours.encode(x, tiling=tiling)
        z_diffusers = reference.encode(x).latent_dist.mean * ours.scaling_factor
        images, images_tiled = ours.decode(z), ours.decode(z, tiling=tiling)
        images_diffusers = reference.decode(z / ours.scaling_factor).sample
    assert 0 < _max_diff(z_tiled, z) < TILED_ENCODE_MAX
    assert _rms(z_tiled, z) < TILED_ENCODE_RMS
    assert _rms(z_tiled, z) <= _rms(z_diffusers, z)
    assert 0 < _max_diff(images_tiled, images) < TILED_DECODE_MAX
    assert _rms(images_tiled, images) < TILED_DECODE_RMS
    assert _rms(images_tiled, images) <= _rms(images_diffusers, images)


def test_instance_tiling_is_the_default() -> None:
    reference = _tiny_diffusers()
    tiling = Tiling(tile_size=8, tile_overlap=2)
    plain, tiled = _ours(reference), _ours(reference, tiling=tiling)
    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(tiled.decode(z), plain.decode(z, tiling=tiling))
        assert not torch.equal(tiled.decode(z), plain.decode(z))


def test_tiled_sampling_uses_the_generator_like_untiled(pair: tuple[Any, AutoencoderKL]) -> None:
    _, ours = pair
    x = _images(batch=1, size=32)
    tiling = Tiling(tile_size=8, tile_overlap=2)
    with torch.no_grad():
        posterior = ours.posterior(x, tiling=tiling)
        sampled = ours.encode(x, torch.Generator().manual_seed(9), tiling=tiling)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(9))
    assert _max_diff(sampled, (posterior.mean + posterior.std * noise) * ours.scaling_factor) < 1e-6


@pytest.mark.parametrize(("size", "overlap"), [(0, 0), (8, 8), (8, -1)])
def test_bad_tiling(size: int, overlap: int) -> None:
    with pytest.raises(InvalidRequest, match="tile_overlap < tile_size"):
        Tiling(size, overlap)


# --- bad inputs and files -------------------------------------------------------------------


def test_image_size_not_divisible(pair: tuple[Any, AutoencoderKL]) -> None:
    _, ours = pair
    with pytest.raises(InvalidRequest, match=r"32x33 is not divisible by the VAE downscale factor 2"):
        ours.encode(torch.zeros(1, 3, 33, 32))
    with pytest.raises(InvalidRequest, match=r"images \[batch, 3, height, width\], got \[1, 4, 32, 32\]"):
        ours.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(InvalidRequest, match=r"latents \[batch, 4, height, width\], got \[1, 3, 8, 8\]"):
        ours.decode(torch.zeros(1, 3, 8, 8))


def test_missing_unexpected_and_misshapen_keys(pair: tuple[Any, AutoencoderKL]) -> None:
    reference, _ = pair
    sd = _ldm_dict(reference, 4)
    missing = {k: t for k, t in sd.items() if k != "decoder.up.1.upsample.conv.bias"}
    with pytest.raises(CheckpointError, match=r"1 missing: decoder\.up\.1\.upsample\.conv\.bias"):
        AutoencoderKL.from_state_dict(missing)
    with pytest.raises(CheckpointError, match=r"1 unexpected: decoder\.extra\.weight"):
        AutoencoderKL.from_state_dict({**sd, "decoder.extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"1 misshapen: quant_conv\.bias \(7,\) \(expected \(8,\)\)"):
        AutoencoderKL.from_state_dict({**sd, "quant_conv.bias": torch.zeros(7)})
    without_conv_in = {k: t for k, t in sd.items() if not k.startswith("encoder.conv_in.")}
    with pytest.raises(CheckpointError, match=r"missing 'encoder\.conv_in\.weight'"):
        AutoencoderKL.from_state_dict(without_conv_in)


def test_unmapped_diffusers_key() -> None:
    sd = dict(_tiny_diffusers().state_dict())
    sd["encoder.down_blocks.0.attentions.0.to_q.weight"] = torch.zeros(32, 32)
    with pytest.raises(CheckpointError, match=r"1 diffusers VAE key\(s\) have no LDM equivalent.*attentions.0.to_q"):
        diffusers_to_ldm_vae(sd)
    with pytest.raises(CheckpointError, match="no VAE tensors"):
        to_ldm_vae({})


# --- NaN / inf upcast -----------------------------------------------------------------------


class _OverflowingVAE(nn.Module):
    """A stub whose decode overflows in fp16 (1000 * 1000 > 65504) and is exact in fp32."""

    scaling_factor = 1.0
    shift_factor = 0.0
    latent_channels = 4
    downscale = 1

    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Parameter(torch.tensor(1000.0), requires_grad=False)

    def encode(self, images: Tensor, generator: Generators = None) -> Tensor:
        return images

    def decode(self, latents: Tensor) -> Tensor:
        x = latents.to(self.big.dtype)
        return (x * self.big * self.big) / (self.big * self.big)  # inf / inf = nan in fp16


def test_decode_upcast_on_nan_reruns_in_float32() -> None:
    stub = _OverflowingVAE().half()
    latents = torch.full((1, 4, 2, 2), 0.5, dtype=torch.float16)
    assert torch.isnan(stub.decode(latents)).all()
    images = decode_finite(stub, latents)
    assert images.dtype == torch.float32
    assert torch.equal(images, torch.full((1, 4, 2, 2), 0.5))
    assert stub.big.dtype == torch.float16  # the shared module is not touched


def test_decode_upcast_on_nan_with_a_real_fp16_overflow() -> None:
    """A VAE whose activations exceed fp16's 65504 decodes to NaN in fp16 and recovers in fp32."""
    ours = _ours(_tiny_diffusers())
    with torch.no_grad():
        ours.decoder.conv_in.weight.mul_(3e4)
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
        expected = ours.decode(z)
        half = AutoencoderKL.from_state_dict(ours.state_dict(), dtype=torch.float16)
        assert not torch.isfinite(half.decode(z)).all()
        images = decode_finite(half, z)
    assert images.dtype == torch.float32
    assert _max_diff(images, expected) < 1e-2  # the weights were rounded to fp16
    assert half.decoder.conv_in.weight.dtype == torch.float16


def test_decode_upcast_on_nan_passes_finite_results_through(pair: tuple[Any, AutoencoderKL]) -> None:
    _, ours = pair
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(decode_finite(ours, z), ours.decode(z))


def test_decode_upcast_on_nan_never_returns_nan(pair: tuple[Any, AutoencoderKL]) -> None:
    _, ours = pair
    z = torch.randn(1, 4, 8, 8)
    z[0, 0, 0, 0] = float("nan")
    with torch.no_grad(), pytest.raises(LatentRTError, match="1 non-finite latent values"):
        decode_finite(ours, z)
    stub = _OverflowingVAE().half()
    with pytest.raises(LatentRTError, match="NaN/inf"):
        decode_finite(stub, torch.full((1, 4, 2, 2), float("inf"), dtype=torch.float16))
