"""``latentrt export``, and the runtime options ``latentrt generate`` shares with it.

``latentrt export --checkpoint PATH --to onnx --out DIR`` fills DIR as an engine cache: one
folder per component (``unet-fp32-<key>/model.onnx``, ``model.optimized.onnx``, ``manifest.json``).
``latentrt generate --runtime onnxruntime --engines DIR`` with the same sizes and precision
reuses them; without ``--engines`` it exports on first use into ``$LATENTRT_CACHE/engines``.
``--to tensorrt --device cuda`` builds TensorRT engines (``engine.plan``) from the ONNX exports instead,
for ``generate --runtime tensorrt --device cuda``. A runtime that cannot run here (no TensorRT, no
CUDA GPU) stops both commands before the model is loaded, with one line saying what is missing.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from latentrt.core.errors import InvalidRequest, RuntimeUnavailable
from latentrt.core.loader import RuntimeChoice, builtin_checkpoint, compile_model, load
from latentrt.core.protocols import CompiledModule, ShapeLimits
from latentrt.core.registry import Registry, registry
from latentrt.exporters import MANIFEST

__all__ = [
    "add_export_parser",
    "add_runtime_options",
    "add_size_options",
    "check_runtimes",
    "cmd_export",
    "engine_limits",
    "parse_runtime",
]

DEFAULT_COMPONENTS = "unet,vae,text"


def parse_runtime(text: str) -> RuntimeChoice:
    """``onnxruntime`` (every component), or ``unet=onnxruntime,vae=torch`` (per component)."""
    if "=" not in text:
        return text.strip()
    choice: dict[str, str] = {}
    for item in text.split(","):
        component, sep, runtime = item.partition("=")
        if not sep or not component.strip() or not runtime.strip():
            raise argparse.ArgumentTypeError(f"expected COMPONENT=RUNTIME pairs like unet=onnxruntime, got {item!r}")
        choice[component.strip()] = runtime.strip()
    return choice


def add_size_options(parser: argparse.ArgumentParser, positive_int: Any) -> None:
    """The size and batch range compiled components are built for (model defaults where not given)."""
    group = parser.add_argument_group("compiled components")
    group.add_argument("--min-size", dest="min_size", type=positive_int, help="smallest side in pixels")
    group.add_argument("--max-size", dest="max_size", type=positive_int, help="largest side in pixels")
    group.add_argument("--max-batch", dest="max_batch", type=positive_int, default=4, help="images per request (4)")


def add_runtime_options(parser: argparse.ArgumentParser, positive_int: Any) -> None:
    """``--runtime``, ``--engines`` and the size options, for ``generate``."""
    parser.add_argument("--runtime", type=parse_runtime,
                        help="run on another runtime: onnxruntime, tensorrt, torch_cuda_graphs, "
                             "torch_channels_last, torch_compile, per component (unet=tensorrt,vae=torch), "
                             "or auto (the fastest measured here); exports on first use")  # fmt: skip
    parser.add_argument("--engines", help="engine cache folder (default: $LATENTRT_CACHE/engines)")
    add_size_options(parser, positive_int)


def engine_limits(args: argparse.Namespace) -> ShapeLimits:
    """The :class:`ShapeLimits` the engine options ask for (model defaults where not given)."""
    return ShapeLimits(min_size=args.min_size, max_size=args.max_size, max_batch=args.max_batch)


def _runtime_for(plugins: Registry, exporter: str) -> str:
    """The registered runtime that runs what ``exporter`` writes (``onnx`` -> ``onnxruntime``)."""
    plugins.exporter(exporter)  # an unknown exporter is a PluginError naming the valid ones
    for name, spec in plugins.runtimes.items():
        if getattr(spec.factory(), "exporter", None) == plugins.exporter(exporter).name:
            return name
    raise InvalidRequest(f"no installed runtime runs what the {exporter!r} exporter writes")


def check_runtimes(plugins: Registry, choice: RuntimeChoice, device: str) -> None:
    """Stop before anything is loaded when a chosen runtime cannot run on ``device``, in one line.

    A runtime may offer ``require(device)``, raising RuntimeUnavailable that names what is missing
    (TensorRT: the package, a CUDA GPU); for the others ``available()`` decides.
    """
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        return  # an unknown device is the loader's error to report
    if choice == "auto":
        return  # the loader picks among what can run here
    for name in [choice] if isinstance(choice, str) else sorted(set(choice.values())):
        spec = plugins.runtime(name)  # an unknown runtime is a PluginError naming the valid ones
        runtime = spec.factory()
        require = getattr(runtime, "require", None)
        if callable(require):
            require(target)
        elif not runtime.available():
            raise RuntimeUnavailable(
                f"runtime {spec.name!r} cannot run here: {spec.description or 'its package is missing'}"
            )


def _manifest_times(folder: Path) -> dict[Path, int]:
    """Modification times of the manifests under ``folder`` (to tell new exports from reused ones)."""
    return {path: path.stat().st_mtime_ns for path in folder.glob(f"*/{MANIFEST}")} if folder.is_dir() else {}


def _summary(name: str, compiled: CompiledModule, before: dict[Path, int]) -> str:
    """One line per component: where it is, its precision, its worst difference to torch, new or reused."""
    artifact = getattr(compiled, "artifact", None)
    if artifact is None:
        return f"{name}: compiled (no files)"
    manifest = artifact.manifest
    worst = max(
        (out["max_abs_diff"] for run in manifest["validation"]["runs"] for out in run["outputs"].values()),
        default=0.0,
    )
    path = artifact.directory / MANIFEST
    reused = before.get(path) == path.stat().st_mtime_ns
    what = "reused" if reused else f"exported in {manifest['seconds']['total']:.1f} s"
    exporter = manifest.get("exporter", "onnx")
    return f"{name}: {artifact.directory} ({manifest['precision']}, max |{exporter} - torch| {worst:.1e}; {what})"


def cmd_export(args: argparse.Namespace) -> int:
    """``latentrt export``: compile the chosen components into ``--out`` and print where they are."""
    plugins = registry()
    runtime = _runtime_for(plugins, args.to)
    check_runtimes(plugins, runtime, args.device)
    pipeline = load(args.checkpoint, vae=args.vae, device=args.device, dtype=args.precision, progress=False)
    source = builtin_checkpoint(args.checkpoint, plugins)
    weights = {"checkpoint": source, "vae": source if args.vae is None else Path(args.vae).expanduser()}
    plan = dict.fromkeys((c.strip() for c in args.components.split(",") if c.strip()), runtime)
    if not plan:
        raise InvalidRequest(f"--components needs at least one name, e.g. {DEFAULT_COMPONENTS}")
    before = _manifest_times(Path(args.out))
    compiled = compile_model(
        pipeline.model,
        plan,
        weights=weights,
        limits=engine_limits(args),
        engines=Path(args.out),
        plugins=plugins,
        progress=not args.quiet,
    )
    for name, module in compiled.items():
        print(_summary(name, module, before))
    return 0


def add_export_parser(commands: Any, positive_int: Any) -> None:
    """The ``export`` subcommand and its options."""
    export = commands.add_parser(
        "export", help="export a checkpoint's components (ONNX, TensorRT), checked against torch"
    )
    export.add_argument("--checkpoint", required=True, help=".safetensors file or diffusers folder")
    export.add_argument("--to", default="onnx", help="exporter: onnx (default) or tensorrt (needs --device cuda)")
    export.add_argument("--out", required=True, help="folder to write the engines to (an engine cache)")
    export.add_argument("--components", default=DEFAULT_COMPONENTS,
                        help="comma-separated: unet, vae (decoder and encoder), text, or single names such as "
                             "vae_decoder (default: unet,vae,text)")  # fmt: skip
    export.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="fp32 (default); fp16; bf16 (tensorrt only)")  # fmt: skip
    export.add_argument("--vae", help="separate VAE file or diffusers vae folder")
    export.add_argument("--device", default="cpu", help="cpu or cuda (the device the engines will run on)")
    export.add_argument("--quiet", action="store_true", help="no progress bars")
    add_size_options(export, positive_int)
    export.set_defaults(run=cmd_export)
