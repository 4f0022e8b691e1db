"""``latentrt estimate`` against the measured peak resident set of real generations.

For each configuration: ``latentrt estimate ... --json`` in a fresh process (which measures its
own interpreter baseline), then ``tools/measure_peak.py`` in another (load, generate 2 steps with
CFG, ``VmHWM`` peak). The target is an error within 15% on every configuration. Full-size
SD 1.5 (random weights, ``full_size.py``) needs about 7 GB of free memory; ``--demo-only`` skips it.
Results: ``benchmarks/results/estimate_accuracy.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import charts
from full_size import cached_sd15

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
STORED, OFFLOAD = ("--storage-dtype", "fp16"), ("--offload", "sequential")
Config = tuple[str, int, int, tuple[str, ...]]
"""dtype, size, batch, memory options."""
DEMO: list[Config] = [
    ("fp32", 64, 1, ()),
    ("fp32", 256, 2, ()),
    ("fp32", 512, 1, ()),
    ("fp32", 512, 4, ()),
    ("bf16", 512, 2, ()),
    ("fp32", 512, 2, (*STORED, *OFFLOAD)),
]
FULL_SIZE: list[Config] = [
    ("fp32", 256, 1, ()),
    ("bf16", 256, 1, ()),
    ("fp32", 512, 1, ()),
    ("fp32", 256, 1, STORED),
    ("fp32", 256, 1, OFFLOAD),
    ("fp32", 256, 1, (*STORED, *OFFLOAD)),
]
MB = 2**20


def _json_line(args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT.parent, check=True)
    reading: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return reading


def compare(model: str, dtype: str, size: int, batch: int, options: tuple[str, ...]) -> dict[str, Any]:
    """One configuration: predicted and measured peak RSS (MB) and the relative error."""
    common = ["--width", str(size), "--height", str(size), "--batch", str(batch), "--dtype", dtype, *options]
    predicted = _json_line([sys.executable, "-m", "latentrt.cli", "estimate", model, *common, "--json"])
    measured = _json_line([sys.executable, "tools/measure_peak.py", model, *common])
    return {
        "model": Path(model).name,
        "dtype": dtype,
        "options": " ".join(options),
        "size": size,
        "batch": batch,
        "predicted_mb": predicted["peak_bytes"] / MB,
        "predicted_stage": predicted["peak_stage"],
        "measured_mb": measured["peak"] / MB,
        "error": predicted["peak_bytes"] / measured["peak"] - 1,
        "load_s": measured["load_s"],
        "generate_s": measured["generate_s"],
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    lines = [
        "| model | dtype | options | size | batch | predicted MB (stage) | measured peak MB | error |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['dtype']} | {r.get('options') or '-'} | {r['size']} | {r['batch']} | "
            f"{r['predicted_mb']:.0f} "
            f"({r['predicted_stage']}) | {r['measured_mb']:.0f} | {100 * r['error']:+.1f}% |"
        )
    worst = max(abs(r["error"]) for r in rows)
    return "\n".join(lines) + f"\n\nworst error {100 * worst:.1f}% (target: within 15%)\n"


def main() -> None:
    """Run every configuration and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo-only", action="store_true", help="skip the full-size SD 1.5 runs")
    args = parser.parse_args()
    plan = [("demo", *c) for c in DEMO]
    if not args.demo_only:
        plan += [(str(cached_sd15()), *c) for c in FULL_SIZE]
    rows = []
    for model, dtype, size, batch, options in plan:
        rows.append(compare(model, dtype, size, batch, options))
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "estimate_accuracy.json").write_text(json.dumps(rows, indent=2) + "\n")
    (RESULTS / "estimate_accuracy.md").write_text(
        "`latentrt estimate` vs measured peak RSS (2 steps, CFG 7, euler)\n\n" + markdown(rows)
    )
    charts.draw("estimate_accuracy")


if __name__ == "__main__":
    main()
