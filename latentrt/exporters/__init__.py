"""Exporters: backbones -> files a runtime loads, each folder described by its ``manifest.json``.

What every exporter shares lives here: the :class:`~latentrt.core.protocols.ExportSpec` as
JSON (so an artifact folder can be read back without the model that produced it) and
:func:`read_artifact`. The manifest fields are documented in :mod:`latentrt.exporters.onnx`;
the engine cache (:mod:`latentrt.exporters.cache`) keys and checks the folders.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from latentrt.core.errors import ExportError
from latentrt.core.protocols import Artifact, ExportSpec

__all__ = ["MANIFEST", "MANIFEST_FORMAT", "dtype_from_name", "read_artifact", "spec_from_json", "spec_to_json"]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
"""Bumped whenever the manifest layout changes; older folders are then rebuilt by the cache."""

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}


def dtype_from_name(name: str) -> torch.dtype:
    """``"float32"`` -> ``torch.float32`` (the names :func:`spec_to_json` writes)."""
    if name not in _DTYPES:
        raise ExportError(f"unknown tensor dtype {name!r} in a manifest; export the model again")
    return _DTYPES[name]


def spec_to_json(spec: ExportSpec) -> dict[str, Any]:
    """The spec as plain JSON data (``sample_inputs``, a function, is left out)."""
    return {
        "name": spec.name,
        "input_names": list(spec.input_names),
        "output_names": list(spec.output_names),
        "input_dtypes": {name: str(dtype).removeprefix("torch.") for name, dtype in spec.input_dtypes.items()},
        "dynamic_axes": {
            name: {str(axis): sym for axis, sym in axes.items()} for name, axes in spec.dynamic_axes.items()
        },
        "shape_range": {name: list(bounds) for name, bounds in spec.shape_range.items()},
        "pixel_scale": dict(spec.pixel_scale),
    }


def spec_from_json(data: Mapping[str, Any]) -> ExportSpec:
    """The spec :func:`spec_to_json` wrote (without sample inputs)."""
    try:
        return ExportSpec(
            name=str(data["name"]),
            input_names=tuple(data["input_names"]),
            output_names=tuple(data["output_names"]),
            input_dtypes={name: dtype_from_name(dtype) for name, dtype in data["input_dtypes"].items()},
            dynamic_axes={
                name: {int(axis): str(sym) for axis, sym in axes.items()} for name, axes in data["dynamic_axes"].items()
            },
            shape_range={name: (int(lo), int(opt), int(hi)) for name, (lo, opt, hi) in data["shape_range"].items()},
            pixel_scale={name: int(scale) for name, scale in data.get("pixel_scale", {}).items()},
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ExportError(f"the manifest's spec is malformed ({type(exc).__name__}: {exc}); export again") from exc


def read_artifact(directory: str | Path) -> Artifact:
    """The artifact in ``directory``, from its ``manifest.json``; an ExportError if it cannot be read.

    Only the manifest is read: whether the files are intact is the engine cache's check.
    """
    folder = Path(directory)
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: no readable manifest ({exc}); export the model again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ExportError(f"{path}: not a latentrt manifest of format {MANIFEST_FORMAT}; export the model again")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ExportError(f"{path}: the manifest lists no files; export the model again")
    return Artifact(folder, tuple(files), spec_from_json(manifest.get("spec", {})), manifest)
