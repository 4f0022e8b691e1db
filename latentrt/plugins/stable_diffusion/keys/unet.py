"""diffusers ``UNet2DConditionModel`` names -> the LDM names of :class:`..unet.UNet`.

The two layouts hold the same tensors. diffusers groups them per resolution level
(``down_blocks.B.resnets.R``, ``.attentions.R``, ``.downsamplers.0``; ``mid_block``;
``up_blocks``); LDM numbers them in one running sequence (``input_blocks.N.M``,
``middle_block.M``, ``output_blocks.N.M``) where ``M`` is 0 for the res block (or the
Downsample), 1 for the spatial transformer, and the Upsample comes last. Spatial
transformers keep their inner names in both; res blocks rename their layers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar

from latentrt.core.errors import CheckpointError

__all__ = ["diffusers_to_ldm_unet"]

T = TypeVar("T")
Kind = Literal["plain", "resnet", "attention"]

_TOP_LEVEL: dict[str, str] = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",  # SDXL "text_time" (ADM vector)
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0",  # "projection" class embedding, same slot
    "class_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}

_RESNET_LAYERS: dict[str, str] = {  # diffusers ResnetBlock2D -> LDM ResBlock
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def _weight_and_bias(*layers: str) -> tuple[str, ...]:
    """``layer.weight`` and ``layer.bias`` for each layer."""
    return tuple(f"{layer}.{param}" for layer in layers for param in ("weight", "bias"))


# What each res block and spatial transformer must hold (conv_shortcut only when widths change).
_RESNET_REQUIRED = _weight_and_bias("norm1", "conv1", "time_emb_proj", "norm2", "conv2")
_ATTENTION_REQUIRED = _weight_and_bias("norm", "proj_in", "proj_out")
_TRANSFORMER_BLOCK_REQUIRED = (
    *_weight_and_bias("norm1", "norm2", "norm3", "attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"),
    *(f"attn{i}.to_{x}.weight" for i in (1, 2) for x in "qkv"),
)


@dataclass(frozen=True)
class _Level:
    """What one diffusers down or up block holds."""

    resnets: int
    attentions: bool
    sampler: bool


def diffusers_to_ldm_unet(sd: Mapping[str, T]) -> dict[str, T]:
    """Rename a diffusers UNet state dict to LDM names; values are passed through untouched.

    Raises :class:`CheckpointError` naming the first keys that map to nothing, or the
    first keys a res block or spatial transformer is missing.
    """
    modules = _module_map(sd)
    converted: dict[str, T] = {}
    unmapped: list[str] = []
    held: dict[str, set[str]] = {}  # diffusers module prefix -> the names found under it
    for key, value in sd.items():
        split = _split(key, modules)
        target = None if split is None else _rename(split, modules)
        if split is None or target is None:
            unmapped.append(key)
            continue
        converted[target] = value
        held.setdefault(split[0], set()).add(split[1])
    if unmapped:
        raise CheckpointError(f"unknown diffusers UNet keys (not a UNet2DConditionModel?): {_first(unmapped)}")
    _check_complete(held, modules)
    return converted


def _first(keys: list[str], count: int = 5) -> str:
    """The first ``count`` keys, sorted, for an error message."""
    names = sorted(keys)
    return ", ".join(names[:count]) + (f" (+{len(names) - count} more)" if len(names) > count else "")


def _levels(keys: list[str], blocks: str, sampler: str) -> list[_Level]:
    """The layout of ``down_blocks`` or ``up_blocks``, read from the key indices."""
    found: dict[int, dict[str, set[int]]] = {}
    for key in keys:
        match = re.match(rf"{blocks}\.(\d+)\.(resnets|attentions|{sampler})\.(\d+)\.", key)
        if match:
            found.setdefault(int(match[1]), {}).setdefault(match[2], set()).add(int(match[3]))
    levels = []
    for index in range(1 + max(found, default=-1)):
        parts = found.get(index, {})
        resnets = parts.get("resnets", set())
        if resnets != set(range(len(resnets))) or not resnets:
            raise CheckpointError(f"diffusers UNet {blocks}.{index} has resnets {sorted(resnets)}, expected 0..n-1")
        levels.append(_Level(len(resnets), "attentions" in parts, sampler in parts))
    return levels


def _module_map(sd: Mapping[str, object]) -> dict[str, tuple[str, Kind]]:
    """diffusers module prefix -> (LDM module prefix, kind), numbering blocks as LDM does."""
    keys = list(sd)
    modules: dict[str, tuple[str, Kind]] = {name: (ldm, "plain") for name, ldm in _TOP_LEVEL.items()}
    n = 1  # input block 0 is conv_in
    for b, level in enumerate(_levels(keys, "down_blocks", "downsamplers")):
        for r in range(level.resnets):
            modules[f"down_blocks.{b}.resnets.{r}"] = (f"input_blocks.{n}.0", "resnet")
            modules[f"down_blocks.{b}.attentions.{r}"] = (f"input_blocks.{n}.1", "attention")
            n += 1
        if level.sampler:
            modules[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{n}.0.op", "plain")
            n += 1
    modules["mid_block.resnets.0"] = ("middle_block.0", "resnet")
    modules["mid_block.attentions.0"] = ("middle_block.1", "attention")
    modules["mid_block.resnets.1"] = ("middle_block.2", "resnet")
    n = 0
    for b, level in enumerate(_levels(keys, "up_blocks", "upsamplers")):
        for r in range(level.resnets):
            modules[f"up_blocks.{b}.resnets.{r}"] = (f"output_blocks.{n}.0", "resnet")
            modules[f"up_blocks.{b}.attentions.{r}"] = (f"output_blocks.{n}.1", "attention")
            n += 1
        if level.sampler:  # the Upsample closes the level's last output block, after its transformer
            modules[f"up_blocks.{b}.upsamplers.0.conv"] = (
                f"output_blocks.{n - 1}.{1 + level.attentions}.conv",
                "plain",
            )
    return modules


def _split(key: str, modules: Mapping[str, tuple[str, Kind]]) -> tuple[str, str] | None:
    """(module prefix, rest) for the longest prefix of ``key`` that names a known module."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:cut])
        if prefix in modules:
            return prefix, ".".join(parts[cut:])
    return None


def _rename(split: tuple[str, str], modules: Mapping[str, tuple[str, Kind]]) -> str | None:
    """The LDM name for ``rest`` under the diffusers module ``prefix``, or None when nothing maps it."""
    prefix, rest = split
    target, kind = modules[prefix]
    if kind == "resnet":
        layer, _, param = rest.partition(".")
        if layer not in _RESNET_LAYERS:
            return None
        rest = f"{_RESNET_LAYERS[layer]}.{param}"
    elif kind == "plain" and rest not in ("weight", "bias"):
        return None
    return f"{target}.{rest}"


def _check_complete(held: Mapping[str, set[str]], modules: Mapping[str, tuple[str, Kind]]) -> None:
    """Every res block and spatial transformer present must hold all of its tensors."""
    missing: list[str] = []
    for prefix, names in held.items():
        kind = modules[prefix][1]
        if kind == "resnet":
            required = _RESNET_REQUIRED
        elif kind == "attention":
            depth = 1 + max(
                (int(m[1]) for name in names if (m := re.match(r"transformer_blocks\.(\d+)\.", name))), default=-1
            )
            blocks = (f"transformer_blocks.{i}.{name}" for i in range(depth) for name in _TRANSFORMER_BLOCK_REQUIRED)
            required = (*_ATTENTION_REQUIRED, *blocks)
        else:
            continue
        missing += [f"{prefix}.{name}" for name in required if name not in names]
    if missing:
        raise CheckpointError(f"diffusers UNet state dict is missing tensors: {_first(missing)}")
