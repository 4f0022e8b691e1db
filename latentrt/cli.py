"""The ``latentrt`` command line.

Every :class:`~latentrt.core.errors.LatentRTError` is printed as one line on stderr
and the process exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import latentrt
from latentrt.cli_generate import add_generate_parser, add_info_parser
from latentrt.core.errors import LatentRTError
from latentrt.core.noise import batch_seeds, initial_noise, make_generators, noise_for_sampler
from latentrt.core.parameters import Parameters, format_parameters, save_png
from latentrt.core.registry import ComponentSpec, Registry, SamplerSpec, SchedulerSpec

DEMO_SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc")


def _spec_row(kind: str, spec: SamplerSpec | SchedulerSpec | ComponentSpec) -> dict[str, Any]:
    row: dict[str, Any] = {
        "kind": kind,
        "name": spec.name,
        "label": spec.label,
        "aliases": list(spec.aliases),
        "plugin": spec.plugin,
        "description": spec.description,
    }
    if isinstance(spec, SamplerSpec):
        row["noise"] = spec.noise
        row["options"] = {k: _jsonable(v) for k, v in spec.options.items()}
    return row


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return str(value)
    return value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)


def plugin_rows(registry: Registry) -> list[dict[str, Any]]:
    """One row per registered sampler, schedule, model family, exporter and runtime."""
    groups: Sequence[tuple[str, Any]] = (
        ("sampler", registry.samplers),
        ("scheduler", registry.schedulers),
        ("model_family", registry.model_families),
        ("exporter", registry.exporters),
        ("runtime", registry.runtimes),
    )
    return [_spec_row(kind, spec) for kind, specs in groups for spec in specs.values()]


_TITLES = {
    "sampler": "samplers",
    "scheduler": "schedules",
    "model_family": "model families",
    "exporter": "exporters",
    "runtime": "runtimes",
}


def cmd_plugins(args: argparse.Namespace) -> int:
    """``latentrt plugins``: list what every plugin registered."""
    registry = latentrt.registry()
    rows = plugin_rows(registry)
    if args.json:
        print(json.dumps({"plugins": registry.plugins, "components": rows}, indent=2))
        return 0
    print(f"plugins: {', '.join(registry.plugins)}")
    for kind, title in _TITLES.items():
        of_kind = [r for r in rows if r["kind"] == kind]
        print(f"\n{title} ({len(of_kind)}):")
        if not of_kind:
            print("  (none registered)")
        for row in of_kind:
            label = f'"{row["label"]}"' if row["label"] != row["name"] else ""
            print(f"  {row['name']:<22} {label:<22} [{row['plugin']}]")
    return 0


def _demo_row(spec: SamplerSpec, schedule: SchedulerSpec, steps: int, seeds: list[int], size: int) -> torch.Tensor:
    """Sample the shapes demo with one sampler; returns ``[len(seeds), 3, size, size]``."""
    from latentrt.plugins.demo.shapes import ShapesDenoiser

    denoiser = ShapesDenoiser.build(size)
    sigmas = schedule.sigmas(steps + int(spec.discard_penultimate_sigma), denoiser.model_sampling)
    if spec.discard_penultimate_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    generators = make_generators(seeds)
    x = initial_noise((3, size, size), generators) * sigmas[0]
    noise = noise_for_sampler(spec.noise, x, sigmas, seeds, generators=generators)
    return spec.sample(denoiser, x, sigmas, noise=noise)


def _label_grid(rows: list[tuple[str, torch.Tensor]], scale: int) -> Image.Image:
    from latentrt.plugins.demo.shapes import tensor_to_image

    label_width, cell = 130, rows[0][1].shape[-1] * scale
    grid = Image.new("RGB", (label_width + cell * rows[0][1].shape[0], cell * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (name, images) in enumerate(rows):
        draw.text((6, r * cell + cell // 2 - 6), name, fill=(0, 0, 0))
        for c, image in enumerate(images):
            tile = tensor_to_image(image).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (label_width + c * cell, r * cell))
    return grid


def cmd_demo(args: argparse.Namespace) -> int:
    """``latentrt demo``: sample the built-in shapes demo with several samplers into one PNG."""
    registry = latentrt.registry()
    schedule = registry.scheduler(args.schedule)
    specs = [registry.sampler(name) for name in args.samplers]
    seeds = batch_seeds(args.seed, args.images)
    rows = []
    for spec in tqdm(specs, desc="sampling", unit="sampler", disable=args.quiet):
        start = time.perf_counter()
        rows.append((spec.name, _demo_row(spec, schedule, args.steps, seeds, size=32)))
        if not args.quiet:
            tqdm.write(
                f"{spec.name:<18} {args.steps} steps x {len(seeds)} images in {time.perf_counter() - start:.2f} s"
            )
    settings = {"Steps": args.steps, "Sampler": ", ".join(args.samplers), "Schedule type": schedule.label}
    settings.update({"Seed": args.seed, "Size": "32x32", "Model": "shapes demo", "Version": _version()})
    text = format_parameters(Parameters("latentrt sampler demo", settings=settings))
    save_png(_label_grid(rows, scale=3), Path(args.out), text)
    print(f"wrote {args.out}: {len(specs)} samplers x {len(seeds)} seeds, {schedule.name} schedule, {args.steps} steps")
    return 0


def _version() -> str:
    return f"latentrt {latentrt.__version__}"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


class _OneLineErrors(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (``latentrt: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``message`` on one line with a pointer to ``--help`` and exit 2."""
        self.exit(2, f"latentrt: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``latentrt`` command."""
    parser = _OneLineErrors(prog="latentrt", description="Latent-diffusion image generation runtime.")
    parser.add_argument("--version", action="version", version=f"latentrt {latentrt.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    plugins = commands.add_parser("plugins", help="list samplers, schedules, model families, exporters, runtimes")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(run=cmd_plugins)
    demo = commands.add_parser("demo", help="sample the built-in shapes demo with several samplers")
    demo.add_argument("--out", default="demo.png", help="output PNG (default: demo.png)")
    demo.add_argument("--samplers", nargs="+", default=list(DEMO_SAMPLERS), help="sampler names or labels")
    demo.add_argument("--schedule", default="karras", help="sigma schedule (default: karras)")
    demo.add_argument("--steps", type=_positive_int, default=20)
    demo.add_argument("--images", type=_positive_int, default=6, help="seeds per sampler")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(run=cmd_demo)
    add_generate_parser(commands, _positive_int)
    add_info_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a subcommand; a LatentRTError becomes one line on stderr, exit 2."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except LatentRTError as exc:
        print(f"latentrt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
