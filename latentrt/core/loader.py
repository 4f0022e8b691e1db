"""``latentrt.load``: a checkpoint path -> the model family that recognises it -> a Pipeline."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast, runtime_checkable

import torch

from latentrt.core.autotune import auto_choice, auto_runtime
from latentrt.core.checkpoint import Checkpoint, open_checkpoint
from latentrt.core.errors import CheckpointError, InvalidRequest, PluginError, RuntimeUnavailable
from latentrt.core.layerwise import storing
from latentrt.core.offload import OFFLOAD_MODES, enable_sequential_offload, spilling
from latentrt.core.pipeline import Model, Pipeline
from latentrt.core.protocols import CompiledModule, CompileRequest, Runtime, ShapeLimits
from latentrt.core.registry import Registry, registry

__all__ = [
    "DTYPES",
    "ModelFamily",
    "RuntimeChoice",
    "compile_model",
    "load",
    "resolve_device",
    "resolve_dtype",
    "runtime_plan",
]

logger = logging.getLogger(__name__)

RuntimeChoice = str | Mapping[str, str]
"""One runtime for every component (``"onnxruntime"``), or one per component (``{"unet": "onnxruntime"}``)."""
_GROUPS = {"vae": "vae_", "text": "text_encoder"}  # shorthand component names: vae_decoder + vae_encoder, ...

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | None = None) -> torch.dtype:
    """``"fp32"``/``"fp16"``/``"bf16"`` (or a torch dtype) -> torch dtype; ``"auto"``: the fastest
    correct one for ``device`` (:mod:`latentrt.core.autotune`), logged in one line."""
    if dtype == "auto":
        choice = auto_choice(device or torch.device("cpu"))
        logger.info(choice.describe())
        return choice.dtype
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InvalidRequest(f"dtype must be fp32, fp16 or bf16, got {dtype}")
        return dtype
    if dtype not in DTYPES:
        raise InvalidRequest(f"dtype must be one of {', '.join(DTYPES)} or auto, got {dtype!r}")
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


def runtime_plan(runtime: RuntimeChoice, names: Sequence[str]) -> dict[str, str]:
    """Which runtime runs each of the components ``names``; ``vae`` and ``text`` name their groups.

    Components a mapping leaves out stay on eager torch, as loaded.
    """
    if isinstance(runtime, str):
        return dict.fromkeys(names, runtime)
    plan: dict[str, str] = {}
    for key, chosen in runtime.items():
        matched = [key] if key in names else [n for n in names if key in _GROUPS and n.startswith(_GROUPS[key])]
        if not matched:
            valid = ", ".join([*names, *(g for g in _GROUPS if any(n.startswith(_GROUPS[g]) for n in names))])
            raise InvalidRequest(f"no component {key!r} to choose a runtime for; this model has {valid}")
        plan.update(dict.fromkeys(matched, chosen))
    return plan


def _runtime(plugins: Registry, name: str) -> Runtime:
    spec = plugins.runtime(name)
    runtime = spec.factory()
    if not isinstance(runtime, Runtime):
        raise PluginError(f"runtime {spec.name!r} of plugin {spec.plugin!r} does not implement the Runtime protocol")
    if not runtime.available():
        raise RuntimeUnavailable(
            f"runtime {spec.name!r} cannot run here: {spec.description or 'its package is missing'}"
        )
    return runtime


def compile_model(
    model: Model,
    runtime: RuntimeChoice,
    *,
    weights: Mapping[str, Path],
    limits: ShapeLimits | None = None,
    engines: str | Path | None = None,
    plugins: Registry | None = None,
    progress: bool = True,
) -> dict[str, CompiledModule]:
    """Compile ``model``'s components on their runtimes and install them in its place.

    ``weights`` maps each component's ``source`` (``"checkpoint"``, ``"vae"``) to the file or
    folder it was read from (its content hash keys the engine cache in ``engines``); the
    precision is the model's dtype. Returns the compiled modules by component name.
    """
    if model.runtime_components is None:
        raise InvalidRequest(
            f"{model.name} is a {model.family} model, which runs on torch only: load it without runtime="
        )
    components = model.runtime_components(limits or ShapeLimits())
    precision = next((name for name, dtype in DTYPES.items() if dtype == model.dtype), str(model.dtype))
    compiled: dict[str, CompiledModule] = {}
    for name, runtime_name in runtime_plan(runtime, list(components)).items():
        component = components[name]
        request = CompileRequest(
            component,
            weights[component.source],
            precision,
            model.device,
            None if engines is None else Path(engines),
            progress,
        )
        compiled[name] = _runtime(plugins or registry(), runtime_name).compile(request)
        component.install(compiled[name])
    return compiled


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
    runtime: RuntimeChoice | None = None,
    engines: str | Path | None = None,
    limits: ShapeLimits | None = None,
    storage_dtype: str | torch.dtype | None = None,
    offload: str = "none",
) -> Pipeline:
    """Load a single-file checkpoint or diffusers folder (optionally a separate VAE) into a Pipeline.

    ``path`` may also name a family's built-in weights: ``load("demo")`` is the small model
    shipped with latentrt. ``dtype="auto"`` picks bf16 on CPUs with AVX512-BF16/AMX, fp32 on
    other CPUs, fp16/bf16 on GPUs, and logs what it picked.

    ``prediction`` (``"eps"``/``"v"``) overrides what a sidecar ``.yaml`` or the diffusers
    scheduler config says; weights alone cannot tell. ``vae_tiling`` encodes and decodes
    in overlapping tiles, for images too large for memory in one piece. ``refiner`` loads an
    SDXL refiner checkpoint that requests hand over to with ``refiner_switch_at``.

    ``runtime`` runs components on another runtime than eager torch: ``"onnxruntime"`` for all of
    them, or per component (``{"unet": "onnxruntime", "vae": "torch"}``; see :func:`compile_model`);
    ``"auto"`` picks the fastest measured plan for the device and logs it
    (:func:`latentrt.core.autotune.auto_runtime`).
    Engines are built on first use into ``engines`` (default ``$LATENTRT_CACHE``) for the sizes and
    batch in ``limits``, and reused after.

    Memory: ``storage_dtype="fp16"``/``"bf16"`` keeps layer weights in 16 bits and upcasts one
    layer at a time to ``dtype`` as it runs (:mod:`latentrt.core.layerwise`);
    ``offload="sequential"`` keeps one network resident at a time (:mod:`latentrt.core.offload`).
    """
    if prediction not in (None, "eps", "v"):
        raise InvalidRequest(f"prediction must be 'eps' or 'v', got {prediction!r}")
    stored = _storage_dtype(storage_dtype)
    _check_memory_options(stored, offload, None if runtime == "auto" else runtime)
    plugins = plugins or registry()
    resolved = resolve_device(device)
    options: dict[str, Any] = {
        "vae": vae,
        "device": resolved,
        "dtype": resolve_dtype(dtype, resolved),
        "prediction": prediction,
        "vae_tiling": vae_tiling,
    }
    checkpoint = open_checkpoint(builtin_checkpoint(path, plugins))
    with _memory_options(stored, offload, resolved):
        model = _family_for(checkpoint, plugins)(checkpoint, **options)
    refiner_model = None
    if refiner is not None:
        refiner_checkpoint = open_checkpoint(refiner)
        with _memory_options(stored, offload, resolved):
            refiner_model = _family_for(refiner_checkpoint, plugins)(refiner_checkpoint, **{**options, "vae": None})
    if runtime == "auto":
        picked = auto_runtime(resolved, model.runtime_components is not None, stored is not None or offload != "none")
        logger.info(picked.describe())
        runtime = picked.plan
    if runtime is not None:
        settings: dict[str, Any] = {"limits": limits, "engines": engines, "plugins": plugins, "progress": progress}
        vae_source = checkpoint.path if vae is None else Path(vae).expanduser()
        compile_model(model, runtime, weights={"checkpoint": checkpoint.path, "vae": vae_source}, **settings)
        if refiner_model is not None:
            weights = {"checkpoint": refiner_checkpoint.path, "vae": refiner_checkpoint.path}
            compile_model(refiner_model, runtime, weights=weights, **settings)
    pipeline = Pipeline(model, plugins, progress=progress, refiner=refiner_model)
    if offload == "sequential":
        pipeline.offload = enable_sequential_offload(_offloaded_components(model, refiner_model), resolved)
    return pipeline


def _storage_dtype(storage_dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``None``, ``"fp16"``/``"bf16"`` (or the torch dtype) -> the storage dtype; anything else is refused."""
    if storage_dtype is None or storage_dtype in ("none", "same"):
        return None
    stored = DTYPES.get(storage_dtype) if isinstance(storage_dtype, str) else storage_dtype
    if stored not in (torch.float16, torch.bfloat16):
        raise InvalidRequest(f"storage_dtype must be fp16 or bf16 (or none), got {storage_dtype!r}")
    return stored


@contextlib.contextmanager
def _memory_options(stored: torch.dtype | None, offload: str, device: torch.device) -> Iterator[None]:
    """Families loaded in here store layer weights in ``stored`` and, offloading, park each network once loaded."""
    with storing(stored), spilling(device if offload == "sequential" else None):
        yield


def _check_memory_options(stored: torch.dtype | None, offload: str, runtime: RuntimeChoice | None) -> None:
    """Refuse memory options that do not apply."""
    if offload not in OFFLOAD_MODES:
        raise InvalidRequest(f"offload must be one of {', '.join(OFFLOAD_MODES)}, got {offload!r}")
    if runtime is not None and (stored is not None or offload != "none"):
        raise InvalidRequest(
            "storage_dtype and offload apply to torch components; a compiled runtime keeps its own weights: "
            "drop runtime= or the memory option"
        )


def _offloaded_components(model: Model, refiner: Model | None) -> dict[str, object]:
    """Components in the order a generation uses them; the refiner's after the base model's."""
    parts: dict[str, object] = {}
    for prefix, each in (("", model), ("refiner_", refiner)):
        if each is not None:
            parts.update({f"{prefix}text_encoder": each.text_encoder, f"{prefix}unet": each.denoiser})
            parts[f"{prefix}vae"] = each.vae
    return parts
