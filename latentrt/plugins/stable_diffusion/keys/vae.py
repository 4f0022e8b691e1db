"""VAE state-dict layouts -> the LDM (CompVis) names :mod:`..vae` uses.

Three layouts reach us (REFERENCE.md, "Checkpoint layouts"):

* single-file checkpoints: LDM names under ``first_stage_model.`` (some tools write ``vae.``);
* standalone VAE files (``vae-ft-mse-840000-ema-pruned``): LDM names at the top level;
* diffusers folders (``vae/diffusion_pytorch_model.safetensors``): diffusers names,
  ``encoder.down_blocks.N.resnets.M``, ``mid_block.attentions.0.to_q``, ``conv_norm_out``...

The diffusers -> LDM rules are the inverse of diffusers' ``convert_ldm_vae_checkpoint``.
Two details matter: diffusers numbers decoder ``up_blocks`` from the lowest resolution while
LDM's ``decoder.up.0`` is the highest, and diffusers stores the mid-block attention
projections as linear ``[out, in]`` weights where LDM stores 1x1 convs ``[out, in, 1, 1]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from torch import Tensor

from latentrt.core.checkpoint import TensorDict, describe
from latentrt.core.errors import CheckpointError

__all__ = [
    "VAE_PREFIXES",
    "diffusers_to_ldm_vae",
    "is_diffusers_vae",
    "strip_vae_prefix",
    "to_ldm_vae",
]

#: Prefixes a full checkpoint stores its VAE under, in the order they are tried.
VAE_PREFIXES = ("first_stage_model.", "vae.")

#: How many offending keys an error message lists.
_SHOWN = 5

# diffusers ResnetBlock2D member -> LDM ResnetBlock member.
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "conv_shortcut": "nin_shortcut"}

# diffusers Attention member -> LDM AttnBlock member (new names, then pre-0.14 names).
_ATTENTION = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
    "query": "q",
    "key": "k",
    "value": "v",
    "proj_attn": "proj_out",
}

_Rule = Callable[[re.Match[str], int], str | None]


def _same(m: re.Match[str], _levels: int) -> str:
    return m.group(0)


def _norm_out(m: re.Match[str], _levels: int) -> str:
    return f"{m['part']}.norm_out.{m['p']}"


def _down_resnet(m: re.Match[str], _levels: int) -> str | None:
    member = _RESNET.get(m["member"])
    return None if member is None else f"encoder.down.{m['i']}.block.{m['j']}.{member}.{m['p']}"


def _downsample(m: re.Match[str], _levels: int) -> str:
    return f"encoder.down.{m['i']}.downsample.conv.{m['p']}"


def _up_resnet(m: re.Match[str], levels: int) -> str | None:
    member = _RESNET.get(m["member"])
    level = levels - 1 - int(m["i"])  # diffusers counts up blocks from the bottom, LDM from the top
    return None if member is None else f"decoder.up.{level}.block.{m['j']}.{member}.{m['p']}"


def _upsample(m: re.Match[str], levels: int) -> str:
    return f"decoder.up.{levels - 1 - int(m['i'])}.upsample.conv.{m['p']}"


def _mid_resnet(m: re.Match[str], _levels: int) -> str | None:
    member = _RESNET.get(m["member"])
    return None if member is None else f"{m['part']}.mid.block_{int(m['j']) + 1}.{member}.{m['p']}"


def _mid_attention(m: re.Match[str], _levels: int) -> str | None:
    member = _ATTENTION.get(m["member"])
    return None if member is None else f"{m['part']}.mid.attn_1.{member}.{m['p']}"


_P = r"(?P<p>weight|bias)"
_RULES: tuple[tuple[re.Pattern[str], _Rule], ...] = tuple(
    (re.compile(pattern), rule)
    for pattern, rule in (
        (rf"(?:encoder|decoder)\.conv_(?:in|out)\.{_P}", _same),
        (rf"(?:post_)?quant_conv\.{_P}", _same),
        (rf"(?P<part>encoder|decoder)\.conv_norm_out\.{_P}", _norm_out),
        (rf"encoder\.down_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<member>\w+)\.{_P}", _down_resnet),
        (rf"encoder\.down_blocks\.(?P<i>\d+)\.downsamplers\.0\.conv\.{_P}", _downsample),
        (rf"decoder\.up_blocks\.(?P<i>\d+)\.resnets\.(?P<j>\d+)\.(?P<member>\w+)\.{_P}", _up_resnet),
        (rf"decoder\.up_blocks\.(?P<i>\d+)\.upsamplers\.0\.conv\.{_P}", _upsample),
        (rf"(?P<part>encoder|decoder)\.mid_block\.resnets\.(?P<j>[01])\.(?P<member>\w+)\.{_P}", _mid_resnet),
        (rf"(?P<part>encoder|decoder)\.mid_block\.attentions\.0\.(?P<member>[\w.]+?)\.{_P}", _mid_attention),
    )
)

_LINEAR_ATTENTION = re.compile(r"\.mid\.attn_1\.(?:q|k|v|proj_out)\.weight$")
_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
"""What an autoencoder holds; full training checkpoints also keep ``first_stage_model.loss.*``."""
_DIFFUSERS_MARKERS = (".down_blocks.", ".up_blocks.", ".mid_block.", ".conv_norm_out.")


def strip_vae_prefix(state_dict: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
    """The VAE part of ``state_dict`` with its ``first_stage_model.`` / ``vae.`` prefix removed.

    A dict without either prefix is taken to be a standalone VAE file and returned as is;
    other components' tensors, and a training checkpoint's ``loss.*``, are never read.
    """
    for prefix in VAE_PREFIXES:
        if any(key.startswith(prefix) for key in state_dict):
            names = [key for key in state_dict if key.startswith(prefix) and key[len(prefix) :].startswith(_VAE_PARTS)]
            return {key[len(prefix) :]: state_dict[key] for key in names}
    return state_dict


def is_diffusers_vae(state_dict: Mapping[str, Tensor]) -> bool:
    """Whether an (unprefixed) VAE state dict uses diffusers names rather than LDM names."""
    return any(marker in key for key in state_dict for marker in _DIFFUSERS_MARKERS)


def _up_levels(state_dict: Mapping[str, Tensor]) -> int:
    """Number of decoder levels, from the highest ``decoder.up_blocks.N`` index."""
    indices = [int(m[1]) for key in state_dict if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", key))]
    return max(indices, default=-1) + 1


def _ldm_name(key: str, levels: int) -> str | None:
    """The LDM name of one diffusers key, or None when no rule maps it."""
    for pattern, rule in _RULES:
        if m := pattern.fullmatch(key):
            return rule(m, levels)
    return None


def _as_conv1x1(key: str, tensor: Tensor) -> Tensor:
    """Reshape a linear attention weight ``[out, in]`` to the LDM 1x1 conv ``[out, in, 1, 1]``."""
    if _LINEAR_ATTENTION.search("." + key) and tensor.ndim < 4:
        return tensor.reshape(tensor.shape[0], -1, 1, 1)
    return tensor


def diffusers_to_ldm_vae(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to LDM names (tensors are not copied).

    Attention weights are reshaped to 1x1 convs (a view). Raises :class:`CheckpointError`
    naming the first keys that no rule maps, or that two keys map onto the same name.
    """
    levels = _up_levels(state_dict)
    converted: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, tensor in state_dict.items():
        name = _ldm_name(key, levels)
        if name is None:
            unmapped.append(key)
        elif name in converted:
            raise CheckpointError(
                f"diffusers VAE keys map twice onto '{name}' (second: '{key}'); the file is malformed"
            )
        else:
            converted[name] = _as_conv1x1(name, tensor)
    if unmapped:
        raise CheckpointError(
            f"{len(unmapped)} diffusers VAE key(s) have no LDM equivalent, first: {unmapped[:_SHOWN]}; "
            "is this an AutoencoderKL (SD 1.x/2.x/XL) VAE?"
        )
    return converted


def to_ldm_vae(state_dict: Mapping[str, Tensor]) -> TensorDict:
    """Any supported VAE layout (prefixed, standalone, diffusers) -> unprefixed LDM names.

    Linear (2-D) mid-block attention weights, as diffusers and files converted from it
    store them, become the LDM 1x1 conv weights (a view). The result keeps the file's
    description for error messages.
    """
    stripped = strip_vae_prefix(state_dict)
    where = describe(state_dict)
    if not stripped:
        raise CheckpointError(f"{where}: holds no VAE tensors (no encoder.* / decoder.* keys)")
    if is_diffusers_vae(stripped):
        return TensorDict(diffusers_to_ldm_vae(stripped), f"{where} (diffusers VAE layout)")
    return TensorDict({key: _as_conv1x1(key, stripped[key]) for key in stripped}, where)
