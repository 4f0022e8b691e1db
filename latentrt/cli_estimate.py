"""``latentrt estimate``: will this model run here? Peak memory and work, predicted before loading.

Exit status: 0 when it fits the ``--budget`` (or none was given), 1 when it does not, 2 on an error.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from latentrt.cli_generate import add_memory_options
from latentrt.core.loader import resolve_dtype
from latentrt.core.memory import format_bytes, parse_bytes
from latentrt.plugins.stable_diffusion.estimate import (
    REFERENCE_FLOPS,
    Estimate,
    Settings,
    architecture,
    estimate,
    interpreter_baseline,
)

__all__ = ["add_estimate_parser", "cmd_estimate", "estimate_report"]


def add_estimate_parser(commands: Any, positive_int: Any) -> None:
    """Register ``latentrt estimate`` on the ``commands`` subparsers."""
    est = commands.add_parser("estimate", help="predict peak memory and work of a generation; check a budget")
    est.add_argument("model", help="single-file checkpoint, 'demo', or a family: sd1, sd2, sdxl")
    est.add_argument("--width", type=positive_int, default=512)
    est.add_argument("--height", type=positive_int, default=512)
    est.add_argument("--batch", type=positive_int, default=1, help="images per run")
    est.add_argument("--steps", type=positive_int, default=20)
    est.add_argument("--no-cfg", dest="cfg", action="store_false", help="CFG scale 1: the UNet runs on the batch once")
    est.add_argument("--dtype", choices=("fp32", "fp16", "bf16", "auto"), default="fp32", help="compute precision")
    est.add_argument("--vae-tiling", dest="vae_tiling", action="store_true", help="decode in 512-pixel tiles")
    add_memory_options(est)
    est.add_argument("--budget", help="memory the run may use, e.g. 4GB, 512MB (binary units)")
    est.add_argument("--json", action="store_true", help="machine-readable output")
    est.set_defaults(run=cmd_estimate)


def cmd_estimate(args: argparse.Namespace) -> int:
    """Print the estimate; exit 1 when the predicted peak exceeds ``--budget``."""
    budget = None if args.budget is None else parse_bytes(args.budget)
    arch = architecture(args.model)
    dtype = resolve_dtype(args.dtype)
    storage = None if args.storage_dtype is None else resolve_dtype(args.storage_dtype)
    settings = Settings(
        args.width, args.height, args.batch, args.cfg, dtype, args.vae_tiling, args.steps,
        storage=None if storage == dtype else storage, offload=args.offload == "sequential",
    )  # fmt: skip
    result = estimate(arch, settings, baseline=interpreter_baseline())
    fits = budget is None or result.peak <= budget
    if args.json:
        print(json.dumps({**estimate_report(result), "family": arch.family, "budget": budget, "fits": fits}))
    else:
        _print_table(args.model, arch.family, result)
        print(_verdict(result, budget))
    return 0 if fits else 1


def estimate_report(result: Estimate) -> dict[str, Any]:
    """The estimate as plain JSON values (bytes and FLOPs as integers)."""
    return {
        "peak_bytes": result.peak,
        "peak_stage": result.peak_stage,
        "baseline_bytes": result.baseline,
        "stages": dict(result.stages),
        "weights": dict(result.weights),
        "flops": result.total_flops,
        "relative_time": result.total_flops / REFERENCE_FLOPS,
        "notes": list(result.notes),
    }


def _print_table(model: str, family: str, result: Estimate) -> None:
    print(f"{model} ({family})")
    weights = ", ".join(f"{name} {format_bytes(size)}" for name, size in result.weights.items())
    print(f"  weights:  {weights}")
    print(f"  baseline: {format_bytes(result.baseline)} (this interpreter with torch and latentrt loaded)")
    for stage, size in result.stages.items():
        mark = "  <- peak" if stage == result.peak_stage else ""
        print(f"  {stage:<8}  {format_bytes(result.baseline + size):>10}{mark}")
    relative = result.total_flops / REFERENCE_FLOPS
    print(f"  work:     {result.total_flops / 1e12:.2f} TFLOP = {relative:.2f}x SD 1.5 512x512, CFG, 20 steps")
    for note in result.notes:
        print(f"  note: {note}")


def _verdict(result: Estimate, budget: int | None) -> str:
    peak = format_bytes(result.peak)
    if budget is None:
        return f"predicted peak memory {peak} (in the {result.peak_stage} stage); pass --budget to check a limit"
    if result.peak <= budget:
        return f"fits: predicted peak {peak} <= budget {format_bytes(budget)}"
    return (
        f"does not fit: predicted peak {peak} > budget {format_bytes(budget)} (in the {result.peak_stage} "
        "stage); try --dtype bf16, --vae-tiling or a smaller size or batch"
    )
