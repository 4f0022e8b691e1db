"""The ``latentrt`` command line.

Every :class:`~latentrt.core.errors.LatentRTError` is printed as one line on stderr
and the process exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import latentrt
from latentrt.cli_demo import add_demo_parsers
from latentrt.cli_estimate import add_estimate_parser
from latentrt.cli_export import add_export_parser
from latentrt.cli_generate import add_generate_parser, add_info_parser
from latentrt.cli_serve import add_serve_parser
from latentrt.core.errors import LatentRTError
from latentrt.core.registry import ComponentSpec, Registry, SamplerSpec, SchedulerSpec


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
    add_demo_parsers(commands, _positive_int)
    add_generate_parser(commands, _positive_int)
    add_export_parser(commands, _positive_int)
    add_info_parser(commands)
    add_serve_parser(commands, _positive_int)
    add_estimate_parser(commands, _positive_int)
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
