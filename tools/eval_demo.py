"""Score a demo checkpoint: colour and shape rates per prompt at CFG 1 and 7 (pixel statistics).

    python tools/eval_demo.py [CHECKPOINT] [--seeds 20] [--steps 20] [--device cpu]

Prints one line per prompt and scale, then the mean rates, and writes them as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import latentrt
from latentrt.plugins.demo.classify import EVAL_PROMPTS, score_prompt


def main(argv: list[str] | None = None) -> int:
    """Generate, judge and report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", default="demo")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sampler", default="euler")
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 7.0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pipeline = latentrt.load(args.checkpoint, device=args.device, progress=False)
    report: dict[str, dict[str, list[float]]] = {}
    for cfg in args.cfg:
        rates: dict[str, list[float]] = {}
        for colour, shape in EVAL_PROMPTS:
            score = score_prompt(
                pipeline, colour, shape, seeds=args.seeds, cfg_scale=cfg, steps=args.steps, sampler=args.sampler
            )
            rates[score.prompt] = [score.colour_rate, score.shape_rate]
            print(f"cfg {cfg:4.1f}  {score.prompt:22s} colour {score.colour_rate:5.0%}  shape {score.shape_rate:5.0%}")
        colour_mean = sum(r[0] for r in rates.values()) / len(rates)
        shape_mean = sum(r[1] for r in rates.values()) / len(rates)
        print(f"cfg {cfg:4.1f}  mean: colour {colour_mean:.1%}  shape {shape_mean:.1%}")
        report[str(cfg)] = rates
    if args.json:
        args.json.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
