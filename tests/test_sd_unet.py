"""The Stable Diffusion UNet against diffusers' UNet2DConditionModel (test-only reference).

Tiny random models honour the conventions a single file does not store (GroupNorm 32
groups; SD1 8 heads, SD2/SDXL heads of 64), so the config inferred from the converted
weights is the one diffusers ran. Full-size models are built on the ``meta`` device.
"""

from __future__ import annotations

import functools
import math
from typing import Any, cast

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.models.embeddings import get_timestep_embedding

from latentrt.core.errors import CheckpointError, InvalidRequest
from latentrt.plugins.stable_diffusion.keys.unet import diffusers_to_ldm_unet
from latentrt.plugins.stable_diffusion.unet import (
    SD1_UNET,
    SD2_UNET,
    SDXL_UNET,
    HeadConvention,
    UNet,
    UNetConfig,
    sdxl_adm_vector,
    timestep_embedding,
)

TOL = 1e-4
CA_DOWN, DOWN, CA_UP, UP = "CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"

SD1_TINY: dict[str, Any] = {  # SD1: 8 heads ("attention_head_dim" counts heads in diffusers' SD1 config)
    "block_out_channels": (32, 64, 64),
    "down_block_types": (CA_DOWN, CA_DOWN, DOWN),
    "up_block_types": (UP, CA_UP, CA_UP),
    "layers_per_block": 2,
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
}
SD1_INPAINT_TINY = {**SD1_TINY, "in_channels": 9, "layers_per_block": 1}
SD2_TINY: dict[str, Any] = {  # SD2: heads of 64 channels, linear projections
    "block_out_channels": (64, 128),
    "down_block_types": (CA_DOWN, DOWN),
    "up_block_types": (UP, CA_UP),
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": (1, 2),
    "use_linear_projection": True,
}
SDXL_TINY: dict[str, Any] = {  # SDXL: no attention at the top level, deeper transformers below, ADM vector
    "block_out_channels": (32, 64, 128),
    "down_block_types": (DOWN, CA_DOWN, CA_DOWN),
    "up_block_types": (CA_UP, CA_UP, UP),
    "layers_per_block": 2,
    "cross_attention_dim": 64,
    "attention_head_dim": (1, 1, 2),
    "transformer_layers_per_block": (1, 1, 2),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 32 + 6 * 256,
}


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter so no layer is near-zero or identity (norm scales around 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim > 1:
                fan_in = param[0].numel()
                param.copy_(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in))
            else:
                base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                param.copy_(base + 0.2 * torch.randn(param.shape, generator=generator))


TINY: dict[str, tuple[dict[str, Any], HeadConvention]] = {
    "sd1": (SD1_TINY, "sd1"),
    "sd1-inpaint": (SD1_INPAINT_TINY, "sd1"),
    "sd2": (SD2_TINY, "sd2"),
    "sdxl": (SDXL_TINY, "sdxl"),
}


def _diffusers_unet(**config: Any) -> Any:
    """diffusers' UNet2DConditionModel (untyped, hence ``Any``)."""
    return cast(Any, UNet2DConditionModel)(**config)


@functools.cache
def _pair(name: str) -> tuple[Any, UNet]:
    """A random diffusers UNet and ours, built from its converted weights alone (built once per module)."""
    config, heads = TINY[name]
    torch.manual_seed(0)
    ref = _diffusers_unet(sample_size=16, **config).eval()
    _randomize(ref, 0)
    ldm = diffusers_to_ldm_unet(ref.state_dict())
    ours = UNet(UNetConfig.from_state_dict(ldm, heads=heads)).eval()
    ours.load_state_dict(ldm, strict=True)
    return ref, ours


def _inputs(
    config: dict[str, Any], size: tuple[int, int] = (16, 16)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch of 2: sample, two distinct (fractional) timesteps, text context."""
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, config.get("in_channels", 4), *size, generator=generator)
    context = torch.randn(2, 7, config["cross_attention_dim"], generator=generator)
    return sample, torch.tensor([981.0, 17.25]), context


@pytest.mark.parametrize(
    ("name", "size"),
    [("sd1", (16, 16)), ("sd1", (9, 11)), ("sd1-inpaint", (16, 16)), ("sd2", (16, 16))],
    ids=["sd1", "sd1-odd-size", "sd1-inpaint", "sd2"],  # odd latent sizes: upsampling to the skip's size
)
def test_matches_diffusers(name: str, size: tuple[int, int]) -> None:
    ref, ours = _pair(name)
    sample, t, context = _inputs(TINY[name][0], size)
    with torch.no_grad():
        expected = ref(sample, t, encoder_hidden_states=context).sample
        got = ours(sample, t, context)
    assert expected.abs().mean() > 0.1  # not trivially small
    assert (got - expected).abs().max() < TOL


def test_sdxl_style_matches_diffusers() -> None:
    ref, ours = _pair("sdxl")
    assert ours.config.transformer_depth == (0, 1, 2)
    assert ours.config.transformer_depth_middle == 2
    assert ours.config.adm_in_channels == 32 + 6 * 256
    sample, t, context = _inputs(SDXL_TINY)
    text_embeds = torch.randn(2, 32, generator=torch.Generator().manual_seed(2))
    time_ids = torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0], [768.0, 512.0, 16.0, 32.0, 896.0, 1152.0]])
    with torch.no_grad():
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        expected = ref(sample, t, encoder_hidden_states=context, added_cond_kwargs=cond).sample
        got = ours(sample, t, context, y=sdxl_adm_vector(text_embeds, time_ids))
    assert expected.abs().mean() > 0.1
    assert (got - expected).abs().max() < TOL


def test_inferred_configs() -> None:
    _, sd1 = _pair("sd1")
    assert sd1.config == UNetConfig(4, 4, 32, (1, 2, 2), (2, 2, 2), (1, 1, 0), 1, 32, num_heads=8)
    _, sd2 = _pair("sd2")
    assert sd2.config == UNetConfig(
        4, 4, 64, (1, 2), (1, 1), (1, 0), 1, 64, head_dim=64, use_linear_in_transformer=True
    )


def test_scalar_timestep_broadcasts() -> None:
    _, ours = _pair("sd2")
    sample, _, context = _inputs(SD2_TINY)
    with torch.no_grad():
        assert torch.equal(ours(sample, 500.0, context), ours(sample, torch.tensor([500.0, 500.0]), context))


@pytest.mark.parametrize("dim", [320, 7])
def test_timestep_embedding_matches_diffusers(dim: int) -> None:
    t = torch.tensor([0.0, 1.5, 999.0])
    expected = get_timestep_embedding(t, dim, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(timestep_embedding(t, dim), expected)


FULL_SIZE: list[tuple[str, UNetConfig, int, dict[str, Any]]] = [
    ("sd1", SD1_UNET, 859_520_964, {"cross_attention_dim": 768, "attention_head_dim": 8}),
    (
        "sd2",
        SD2_UNET,
        865_910_724,
        {"cross_attention_dim": 1024, "attention_head_dim": (5, 10, 20, 20), "use_linear_projection": True},
    ),
    (
        "sdxl",
        SDXL_UNET,
        2_567_463_684,
        {
            "block_out_channels": (320, 640, 1280),
            "down_block_types": (DOWN, CA_DOWN, CA_DOWN),
            "up_block_types": (CA_UP, CA_UP, UP),
            "cross_attention_dim": 2048,
            "attention_head_dim": (5, 10, 20),
            "transformer_layers_per_block": (1, 2, 10),
            "use_linear_projection": True,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": 2816,
        },
    ),
]


@pytest.mark.parametrize(("heads", "config", "count", "diffusers_config"), FULL_SIZE, ids=[f[0] for f in FULL_SIZE])
def test_full_size_on_meta(
    heads: HeadConvention, config: UNetConfig, count: int, diffusers_config: dict[str, Any]
) -> None:
    with torch.device("meta"):
        ours = UNet(config)
        ref = _diffusers_unet(**diffusers_config)
    assert sum(p.numel() for p in ours.parameters()) == count
    assert sum(p.numel() for p in ref.parameters()) == count
    ldm = diffusers_to_ldm_unet(ref.state_dict())
    assert UNetConfig.from_state_dict(ldm, heads=heads) == config
    ours.load_state_dict(ldm, strict=True, assign=True)  # names and shapes all line up


@pytest.mark.parametrize("config", [SD1_UNET, SDXL_UNET], ids=["sd1", "sdxl"])
def test_names_are_what_diffusers_single_file_loader_reads(config: UNetConfig) -> None:
    """diffusers' own LDM -> diffusers conversion, then ours back: every tensor returns to its name."""
    with torch.device("meta"):
        ldm = UNet(config).state_dict()
    single_file = {f"model.diffusion_model.{key}": value for key, value in ldm.items()}
    extra = {} if config.adm_in_channels is None else {"addition_embed_type": "text_time"}
    diffusers_sd = cast(Any, convert_ldm_unet_checkpoint)(single_file, {"layers_per_block": 2, **extra})
    back = diffusers_to_ldm_unet(diffusers_sd)
    assert back.keys() == ldm.keys()
    assert all(back[key] is ldm[key] for key in ldm)


def _tiny_diffusers_state() -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = _diffusers_unet(sample_size=16, **SD1_TINY).state_dict()
    return state


@pytest.mark.parametrize(
    "missing",
    ["down_blocks.0.resnets.1.conv1.weight", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight"],
)
def test_conversion_names_a_missing_key(missing: str) -> None:
    sd = _tiny_diffusers_state()
    del sd[missing]
    with pytest.raises(CheckpointError, match=missing):
        diffusers_to_ldm_unet(sd)


def test_conversion_names_unknown_keys() -> None:
    sd = _tiny_diffusers_state()
    sd["down_blocks.0.resnets.0.bogus.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"down_blocks\.0\.resnets\.0\.bogus\.weight"):
        diffusers_to_ldm_unet(sd)
    with torch.device("meta"):
        ldm = UNet(SD1_UNET).state_dict()
    with pytest.raises(CheckpointError, match=r"input_blocks\.0\.0\.bias"):  # already LDM names
        diffusers_to_ldm_unet(ldm)


def test_config_inference_names_a_missing_key() -> None:
    with torch.device("meta"):
        sd = UNet(SD1_UNET).state_dict()
    del sd["out.2.weight"]
    with pytest.raises(CheckpointError, match=r"out\.2\.weight"):
        UNetConfig.from_state_dict(sd, heads="sd1")


def test_wrong_head_convention_is_a_checkpoint_error() -> None:
    _, sd1 = _pair("sd1")  # 32 channels at the top level: 8 heads of 4, not heads of 64
    with pytest.raises(CheckpointError, match="32 channels do not split"):
        UNetConfig.from_state_dict(sd1.state_dict(), heads="sdxl")


def test_sdxl_without_vector_input_is_an_error() -> None:
    _, ours = _pair("sdxl")
    sample, t, context = _inputs(SDXL_TINY)
    with pytest.raises(InvalidRequest, match="vector input y"):
        ours(sample, t, context)
