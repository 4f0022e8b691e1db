"""CLIP text-encoder layouts -> the transformers names :mod:`..clip` uses.

Two layouts reach us (REFERENCE.md, "Checkpoint layouts"):

* **transformers** (``CLIPTextModel``): SD1 single files under
  ``cond_stage_model.transformer.text_model.``, SDXL's CLIP-L under
  ``conditioner.embedders.0.transformer.text_model.``, diffusers folders' ``text_encoder/``
  and ``text_encoder_2/`` (``CLIPTextModelWithProjection``: ``text_model.*`` plus a top-level
  ``text_projection.weight``; transformers >= 5.6 saves ``CLIPTextModel`` without the
  ``text_model.`` level). Renaming is stripping prefixes.
* **OpenCLIP** (``TextTransformer``): SD2 under ``cond_stage_model.model.``, SDXL's bigG under
  ``conditioner.embedders.1.model.``. ``transformer.resblocks.N`` holds ``ln_1``, ``attn``
  (``nn.MultiheadAttention``: q, k, v stacked in ``in_proj_weight``/``in_proj_bias``),
  ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``; then ``token_embedding``, ``positional_embedding``,
  ``ln_final`` and ``text_projection``, a ``[width, dim]`` matrix applied as ``x @ P``, i.e.
  the transpose of a ``Linear`` weight. The rules are diffusers' ``convert_open_clip_checkpoint``.

Converters return lazy views: a tensor is read only when asked for (split or transposed
as a view; :func:`..clip.load_clip_text` then copies just those pieces into compact
storage), and shapes come from the file header when the source can tell.

SD2 (decision): its text encoder is OpenCLIP ViT-H used at the *penultimate* layer
(``FrozenOpenCLIPEmbedder(layer="penultimate")``), final norm applied. diffusers ships it
as a 23-layer ``CLIPTextModel`` without projection, dropping layer 23 and
``text_projection``. :func:`sd2_text_weights` drops them too, so an SD2 single file and an
SD2 diffusers folder give the same 23-layer model, its default ``clip_skip=1`` output
equals diffusers' (and ComfyUI's, which keeps 24 layers and takes the penultimate), and a
user's clip skip means the same for both sources. The dropped layer only fed the unused
pooled output. (A1111 ignores clip skip for SD2; the family may choose to do the same.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from latentrt.core.checkpoint import TensorSource, dtype_of, shape_of
from latentrt.core.errors import CheckpointError

__all__ = [
    "OPENCLIP_SD2_PREFIX",
    "OPENCLIP_SDXL_PREFIX",
    "OPENCLIP_SDXL_REFINER_PREFIX",
    "SD1_CLIP_PREFIX",
    "SDXL_CLIP_L_PREFIX",
    "ClipWeights",
    "Origin",
    "from_openclip",
    "from_transformers",
    "sd1_text_weights",
    "sd2_text_weights",
    "sdxl_text_weights",
]

SD1_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
OPENCLIP_SD2_PREFIX = "cond_stage_model.model."
OPENCLIP_SDXL_PREFIX = "conditioner.embedders.1.model."
OPENCLIP_SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."

#: How many offending keys an error message lists.
_SHOWN = 5

# Stored but never loaded: transformers' position-id buffer (positions are counted at run
# time; some merged files carry corrupted ones) and OpenCLIP's contrastive temperature.
_IGNORED = ("embeddings.position_ids", "logit_scale")

_OPENCLIP_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
_OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(?P<n>\d+)\.(?P<member>.+)\.(?P<p>weight|bias)")
_IN_PROJ = re.compile(r"transformer\.resblocks\.(?P<n>\d+)\.attn\.in_proj_(?P<p>weight|bias)")


@dataclass(frozen=True)
class Origin:
    """Where one of our tensors comes from in the source mapping."""

    key: str
    """Full name in the source (prefix included)."""
    part: int | None = None
    """Which third of a stacked q/k/v tensor (0 = q, 1 = k, 2 = v), or None for all of it."""
    transpose: bool = False
    """Stored as a matrix applied as ``x @ P`` (OpenCLIP ``text_projection``): transpose it."""


class ClipWeights(TensorSource):
    """A lazy, renamed view of a source mapping: our name -> tensor taken from :class:`Origin`."""

    def __init__(self, source: Mapping[str, Tensor], origins: Mapping[str, Origin], layout: str) -> None:
        self.source = source
        self.origins = dict(origins)
        self.layout = layout
        base = getattr(source, "description", "state dict")
        self.description = f"{base} ({layout} layout)"
        self._last: tuple[str, Tensor] | None = None

    def __getitem__(self, key: str) -> Tensor:
        origin = self.origins[key]
        tensor = self._read(origin.key)
        if origin.part is not None:
            rows = tensor.shape[0] // 3
            tensor = tensor.narrow(0, origin.part * rows, rows)
        return tensor.t() if origin.transpose else tensor

    def _read(self, key: str) -> Tensor:
        """``source[key]``, remembering the last one so q, k and v read a stacked tensor once."""
        if self._last is None or self._last[0] != key:
            self._last = (key, self.source[key])
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.origins)

    def __len__(self) -> int:
        return len(self.origins)

    def __contains__(self, key: object) -> bool:
        return key in self.origins

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape after splitting/transposing, from the source's shape (no data read)."""
        origin = self.origins[key]
        shape = shape_of(self.source, origin.key)
        if origin.part is not None:
            shape = (shape[0] // 3, *shape[1:])
        return shape[::-1] if origin.transpose else shape

    def dtype(self, key: str) -> torch.dtype:
        """Dtype of the source tensor (no data read)."""
        return dtype_of(self.source, self.origins[key].key)

    def name_in_source(self, key: str) -> str:
        """``key`` as the source spells it (for error messages)."""
        origin = self.origins.get(key)
        return key if origin is None else origin.key


def _under(source: Mapping[str, Tensor], prefix: str, layout: str) -> list[str]:
    """The names under ``prefix``, stripped; a CheckpointError when there are none."""
    names = [k[len(prefix) :] for k in source if k.startswith(prefix)]
    if not names:
        where = getattr(source, "description", "state dict")
        raise CheckpointError(f"{where}: no {layout} CLIP text encoder tensors under {prefix!r}")
    return names


def _add(origins: dict[str, Origin], name: str, origin: Origin) -> None:
    if name in origins:
        raise CheckpointError(f"CLIP text encoder tensor {name!r} is stored twice: {origins[name].key}, {origin.key}")
    origins[name] = origin


def from_transformers(source: Mapping[str, Tensor], prefix: str = "") -> ClipWeights:
    """A transformers-layout text encoder under ``prefix``, with ``text_model.`` stripped too.

    Serves SD1 files (``prefix=SD1_CLIP_PREFIX``), SDXL's CLIP-L (``SDXL_CLIP_L_PREFIX``) and
    diffusers ``text_encoder``/``text_encoder_2`` folders (``prefix=""``).
    """
    origins: dict[str, Origin] = {}
    for name in _under(source, prefix, "transformers"):
        ours = name.removeprefix("text_model.")
        if ours not in _IGNORED:
            _add(origins, ours, Origin(prefix + name))
    return ClipWeights(source, origins, "transformers CLIP")


def _openclip_name(name: str) -> str:
    """Our name for a non-attention-input OpenCLIP tensor; unknown names pass through unchanged."""
    if name in _OPENCLIP_TOP:
        return _OPENCLIP_TOP[name]
    match = _RESBLOCK.fullmatch(name)
    if match and match["member"] in _OPENCLIP_BLOCK:
        return f"encoder.layers.{match['n']}.{_OPENCLIP_BLOCK[match['member']]}.{match['p']}"
    return name  # reported as unexpected by check_tensors


def _openclip_layers(names: list[str]) -> int:
    """Number of ``transformer.resblocks.N`` in ``names``."""
    return 1 + max((int(m["n"]) for n in names if (m := _RESBLOCK.fullmatch(n))), default=-1)


def _check_in_proj(source: Mapping[str, Tensor], key: str) -> None:
    rows = shape_of(source, key)[0]
    if rows % 3:
        raise CheckpointError(f"{key}: {rows} rows cannot be split into q, k and v (expected 3 x width)")


def from_openclip(
    source: Mapping[str, Tensor], prefix: str, *, drop_last_layers: int = 0, projection: bool = True
) -> ClipWeights:
    """An OpenCLIP ``TextTransformer`` under ``prefix``, renamed to transformers names.

    ``drop_last_layers`` leaves out the last resblocks and ``projection=False`` the
    ``text_projection`` (SD2 uses both, see the module docstring); ``logit_scale`` is ignored.
    """
    names = _under(source, prefix, "OpenCLIP")
    keep = _openclip_layers(names) - drop_last_layers
    if drop_last_layers and keep < 1:
        raise CheckpointError(
            f"cannot drop {drop_last_layers} layers of a {keep + drop_last_layers}-layer text encoder"
        )
    origins: dict[str, Origin] = {}
    for name in names:
        key = prefix + name
        block = _RESBLOCK.fullmatch(name) or _IN_PROJ.fullmatch(name)
        if name in _IGNORED or (block and int(block["n"]) >= keep):
            continue
        if name == "text_projection":
            if projection:
                _add(origins, "text_projection.weight", Origin(key, transpose=True))
        elif (in_proj := _IN_PROJ.fullmatch(name)) is not None:
            _check_in_proj(source, key)
            for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                _add(origins, f"encoder.layers.{in_proj['n']}.self_attn.{proj}.{in_proj['p']}", Origin(key, part))
        else:
            _add(origins, _openclip_name(name), Origin(key))
    return ClipWeights(source, origins, "OpenCLIP")


def sd1_text_weights(checkpoint: Mapping[str, Tensor]) -> ClipWeights:
    """SD1's CLIP ViT-L/14 (quick_gelu) from a single-file checkpoint."""
    return from_transformers(checkpoint, SD1_CLIP_PREFIX)


def sd2_text_weights(checkpoint: Mapping[str, Tensor]) -> ClipWeights:
    """SD2's OpenCLIP ViT-H (gelu) as diffusers ships it: 23 layers, no projection (module docstring)."""
    return from_openclip(checkpoint, OPENCLIP_SD2_PREFIX, drop_last_layers=1, projection=False)


def sdxl_text_weights(checkpoint: Mapping[str, Tensor]) -> tuple[ClipWeights, ClipWeights]:
    """SDXL's two encoders: CLIP ViT-L/14 (quick_gelu) and OpenCLIP bigG (gelu, with projection)."""
    return from_transformers(checkpoint, SDXL_CLIP_L_PREFIX), from_openclip(checkpoint, OPENCLIP_SDXL_PREFIX)
