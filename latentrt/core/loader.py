"""``latentrt.load``: a checkpoint path -> the model family that recognises it -> a Pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import torch

from latentrt.core.checkpoint import Checkpoint, open_checkpoint
from latentrt.core.errors import CheckpointError, InvalidRequest, PluginError
from latentrt.core.pipeline import Model, Pipeline
from latentrt.core.registry import Registry, registry

__all__ = ["DTYPES", "ModelFamily", "builtin_checkpoint", "load", "resolve_device", "resolve_dtype"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32"``/``"fp16"``/``"bf16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InvalidRequest(f"dtype must be fp32, fp16 or bf16, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise InvalidRequest(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device) -> torch.device:
    """A torch device that exists on this machine, or a clear error."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidRequest(f"unknown device {device!r}; use cpu or cuda") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequest("device cuda was asked for, but no CUDA GPU is available here; use --device cpu")
    return resolved


@runtime_checkable
class ModelFamily(Protocol):
    """What ``registry.add_model_family`` takes: a detector and a loader in one object."""

    def detect(self, checkpoint: Checkpoint) -> bool:
        """Whether this family loads ``checkpoint``."""
        ...

    def __call__(
        self,
        checkpoint: Checkpoint,
        *,
        vae: str | Path | None,
        device: torch.device,
        dtype: torch.dtype,
        prediction: str | None,
        vae_tiling: bool,
    ) -> Model:
        """Load the checkpoint into a pipeline :class:`Model`."""
        ...


def _families(plugins: Registry) -> list[ModelFamily]:
    families = []
    for spec in plugins.model_families.values():
        if not isinstance(spec.factory, ModelFamily):
            raise PluginError(f"model family {spec.name!r} of plugin {spec.plugin!r} has no detect(checkpoint)")
        families.append(spec.factory)
    return families


def _family_for(checkpoint: Checkpoint, plugins: Registry) -> ModelFamily:
    for family in _families(plugins):
        if family.detect(checkpoint):
            return family
    hints = [h for family in _families(plugins) if (h := _identify(family, checkpoint))]
    families = ", ".join(plugins.model_families) or "none installed"
    what = f"it looks like {hints[0]}" if hints else "no known model keys were found (truncated, or not a model)"
    raise CheckpointError(f"{checkpoint.path}: no model family recognises this checkpoint ({families}); {what}")


def _identify(family: ModelFamily, checkpoint: Checkpoint) -> str | None:
    identify = getattr(family, "identify", None)
    return None if identify is None else cast(str | None, identify(checkpoint))


def builtin_checkpoint(path: str | Path, plugins: Registry) -> Path:
    """``path``, or the weights a model family ships when ``path`` names it (``"demo"``).

    A family offers built-in weights through a ``builtin`` attribute (a path). An existing
    file or folder of the same name wins, so a local ``./demo`` still loads as a path.
    """
    candidate = Path(path).expanduser()
    if candidate.exists() or not isinstance(path, str):
        return candidate
    spec = plugins.find_model_family(path)
    builtin = getattr(spec.factory, "builtin", None) if spec is not None else None
    if spec is None or builtin is None:
        return candidate
    if not Path(builtin).is_file():
        raise CheckpointError(
            f"the built-in {spec.name!r} weights are missing ({builtin}); reinstall latentrt or run tools/train_demo.py"
        )
    return Path(builtin)


def load(
    path: str | Path,
    *,
    vae: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "fp32",
    prediction: str | None = None,
    vae_tiling: bool = False,
    refiner: str | Path | None = None,
    plugins: Registry | None = None,
    progress: bool = True,
) -> Pipeline:
    """Load a single-file checkpoint or diffusers folder (optionally a separate VAE) into a Pipeline.

    ``path`` may also name a family's built-in weights: ``load("demo")`` is the small model
    shipped with latentrt.

    ``prediction`` (``"eps"``/``"v"``) overrides what a sidecar ``.yaml`` or the diffusers
    scheduler config says; weights alone cannot tell. ``vae_tiling`` encodes and decodes
    in overlapping tiles, for images too large for memory in one piece. ``refiner`` loads an
    SDXL refiner checkpoint that requests hand over to with ``refiner_switch_at``.
    """
    if prediction not in (None, "eps", "v"):
        raise InvalidRequest(f"prediction must be 'eps' or 'v', got {prediction!r}")
    plugins = plugins or registry()
    options: dict[str, Any] = {
        "vae": vae,
        "device": resolve_device(device),
        "dtype": resolve_dtype(dtype),
        "prediction": prediction,
        "vae_tiling": vae_tiling,
    }
    checkpoint = open_checkpoint(builtin_checkpoint(path, plugins))
    model = _family_for(checkpoint, plugins)(checkpoint, **options)
    refiner_model = None
    if refiner is not None:
        refiner_checkpoint = open_checkpoint(refiner)
        refiner_model = _family_for(refiner_checkpoint, plugins)(refiner_checkpoint, **{**options, "vae": None})
    return Pipeline(model, plugins, progress=progress, refiner=refiner_model)
