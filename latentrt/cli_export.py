"""``latentrt export``, and the runtime options ``latentrt generate`` shares with it.

``latentrt export --checkpoint PATH --to onnx --out DIR`` fills DIR as an engine cache: one
folder per component (``unet-fp32-<key>/model.onnx``, ``model.optimized.onnx``, ``manifest.json``).
``latentrt generate --runtime onnxruntime --engines DIR`` with the same sizes and precision
reuses them; without ``--engines`` it exports on first use into ``$LATENTRT_CACHE/engines``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from latentrt.core.errors import InvalidRequest
from latentrt.core.loader import RuntimeChoice, builtin_checkpoint, compile_model, load
from latentrt.core.protocols import CompiledModule, ShapeLimits
from latentrt.core.registry import Registry, registry
from latentrt.exporters import MANIFEST

__all__ = [
    "add_export_parser",
    "add_runtime_options",
    "add_size_options",
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
                        help="run on another runtime: onnxruntime, or per component (unet=onnxruntime,vae=torch); "
                             "exports on first use")  # fmt: skip
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
    return f"{name}: {artifact.directory} ({manifest['precision']}, max |onnx - torch| {worst:.1e}; {what})"


def cmd_export(args: argparse.Namespace) -> int:
    """``latentrt export``: compile the chosen components into ``--out`` and print where they are."""
    plugins = registry()
    runtime = _runtime_for(plugins, args.to)
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
    export = commands.add_parser("export", help="export a checkpoint's components (ONNX), checked against torch")
    export.add_argument("--checkpoint", required=True, help=".safetensors file or diffusers folder")
    export.add_argument("--to", default="onnx", help="exporter (default onnx)")
    export.add_argument("--out", required=True, help="folder to write the engines to (an engine cache)")
    export.add_argument("--components", default=DEFAULT_COMPONENTS,
                        help="comma-separated: unet, vae (decoder and encoder), text, or single names such as "
                             "vae_decoder (default: unet,vae,text)")  # fmt: skip
    export.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    export.add_argument("--vae", help="separate VAE file or diffusers vae folder")
    export.add_argument("--device", default="cpu", help="cpu or cuda (the device the engines will run on)")
    export.add_argument("--quiet", action="store_true", help="no progress bars")
    add_size_options(export, positive_int)
    export.set_defaults(run=cmd_export)
