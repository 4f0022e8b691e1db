"""``latentrt demo`` (the built-in trained model) and ``latentrt sampler-demo`` (samplers on an exact denoiser)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import latentrt
from latentrt.core.errors import InvalidRequest
from latentrt.core.noise import batch_seeds, initial_noise, make_generators, noise_for_sampler
from latentrt.core.parameters import Parameters, format_parameters, save_png
from latentrt.core.registry import SamplerSpec, SchedulerSpec
from latentrt.core.request import GenerationRequest

__all__ = ["DEMO_PROMPTS", "DEMO_SAMPLERS", "add_demo_parsers", "cmd_demo", "cmd_sampler_demo", "label_grid"]

DEMO_SAMPLERS = ("euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc")
"""Samplers ``sampler-demo`` compares by default."""

DEMO_PROMPTS = (
    "a red circle on a blue background",
    "a large yellow star on a purple background",
    "a small green triangle in the top left",
    "a white ring on a black background",
    "an orange square in the bottom right",
    "a blue circle on the left on a yellow background",
)
"""Prompts of ``demo-grid.png``, one row each."""


def label_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], scale: int, label_width: int = 130) -> Image.Image:
    """Rows of equal-sized images, each row labelled on its left, every tile enlarged ``scale`` times."""
    width, height = rows[0][1][0].size
    cell_w, cell_h = width * scale, height * scale
    columns = max(len(images) for _, images in rows)
    grid = Image.new("RGB", (label_width + cell_w * columns, cell_h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (name, images) in enumerate(rows):
        draw.multiline_text((6, r * cell_h + cell_h // 2 - 12), _wrap(name, 20), fill=(0, 0, 0))
        for c, image in enumerate(images):
            grid.paste(image.resize((cell_w, cell_h), Image.Resampling.NEAREST), (label_width + c * cell_w, r * cell_h))
    return grid


def _wrap(text: str, width: int) -> str:
    lines: list[str] = []
    for word in text.split():
        if lines and len(lines[-1]) + 1 + len(word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    """``latentrt demo``: the built-in model draws one prompt into ``--out`` and a prompt grid into ``--grid``."""
    outputs = [Path(args.out), Path(args.grid)]
    for path in outputs:
        if path.suffix.lower() != ".png":
            raise InvalidRequest(f"demo outputs must end in .png, got {path}")
    start = time.perf_counter()
    pipeline = latentrt.load("demo", device=args.device, progress=False)
    settings: dict[str, Any] = {"steps": args.steps, "sampler": args.sampler, "cfg_scale": args.cfg}
    single = pipeline.generate(GenerationRequest(prompt=args.prompt, seed=args.seed, **settings))
    save_png(single.images[0], outputs[0], single.parameters[0])
    rows = []
    for prompt in tqdm(DEMO_PROMPTS, desc="demo grid", unit="prompt", disable=args.quiet):
        result = pipeline.generate(GenerationRequest(prompt=prompt, seed=args.seed, batch_size=args.images, **settings))
        rows.append((prompt, result.images))
    text = format_parameters(Parameters("\n".join(DEMO_PROMPTS), settings=_grid_settings(args)))
    save_png(label_grid(rows, scale=2), outputs[1], text)
    elapsed = time.perf_counter() - start
    print(f"wrote {outputs[0]} ({args.prompt!r}, seed {args.seed}) and {outputs[1]} "
          f"({len(DEMO_PROMPTS)} prompts x {args.images} seeds) in {elapsed:.1f} s")  # fmt: skip
    return 0


def _grid_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"Steps": args.steps, "Sampler": args.sampler, "CFG scale": args.cfg, "Seed": args.seed,
            "Size": "64x64", "Model": "latentrt-demo", "Version": f"latentrt {latentrt.__version__}"}  # fmt: skip


def _sampler_row(spec: SamplerSpec, schedule: SchedulerSpec, steps: int, seeds: list[int], size: int) -> torch.Tensor:
    """Sample the exact shapes denoiser with one sampler; returns ``[len(seeds), 3, size, size]``."""
    from latentrt.plugins.demo.shapes import ShapesDenoiser

    denoiser = ShapesDenoiser.build(size)
    sigmas = schedule.sigmas(steps + int(spec.discard_penultimate_sigma), denoiser.model_sampling)
    if spec.discard_penultimate_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    generators = make_generators(seeds)
    x = initial_noise((3, size, size), generators) * sigmas[0]
    noise = noise_for_sampler(spec.noise, x, sigmas, seeds, generators=generators)
    return spec.sample(denoiser, x, sigmas, noise=noise)


def cmd_sampler_demo(args: argparse.Namespace) -> int:
    """``latentrt sampler-demo``: several samplers on the exact denoiser of six images, one PNG."""
    from latentrt.plugins.demo.shapes import tensor_to_image

    registry = latentrt.registry()
    schedule = registry.scheduler(args.schedule)
    specs = [registry.sampler(name) for name in args.samplers]
    seeds = batch_seeds(args.seed, args.images)
    rows = []
    for spec in tqdm(specs, desc="sampling", unit="sampler", disable=args.quiet):
        start = time.perf_counter()
        images = _sampler_row(spec, schedule, args.steps, seeds, size=32)
        rows.append((spec.name, [tensor_to_image(image) for image in images]))
        if not args.quiet:
            tqdm.write(
                f"{spec.name:<18} {args.steps} steps x {len(seeds)} images in {time.perf_counter() - start:.2f} s"
            )
    settings = {"Steps": args.steps, "Sampler": ", ".join(args.samplers), "Schedule type": schedule.label}
    settings.update(
        {"Seed": args.seed, "Size": "32x32", "Model": "shapes demo", "Version": f"latentrt {latentrt.__version__}"}
    )
    text = format_parameters(Parameters("latentrt sampler demo", settings=settings))
    save_png(label_grid(rows, scale=3), Path(args.out), text)
    print(f"wrote {args.out}: {len(specs)} samplers x {len(seeds)} seeds, {schedule.name} schedule, {args.steps} steps")
    return 0


def add_demo_parsers(commands: Any, positive_int: Callable[[str], int]) -> None:
    """Add the ``demo`` and ``sampler-demo`` subcommands."""
    demo = commands.add_parser("demo", help="draw a few prompts with the built-in demo model (no download)")
    demo.add_argument("--out", default="demo.png", help="one image of --prompt (default: demo.png)")
    demo.add_argument("--grid", default="demo-grid.png", help="grid of several prompts (default: demo-grid.png)")
    demo.add_argument("--prompt", default=DEMO_PROMPTS[0])
    demo.add_argument("--images", type=positive_int, default=4, help="seeds per grid row")
    demo.add_argument("--steps", type=positive_int, default=20)
    demo.add_argument("--sampler", default="dpmpp_2m")
    demo.add_argument("--cfg", type=float, default=7.0)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(run=cmd_demo)
    sampler = commands.add_parser("sampler-demo", help="compare samplers on an exact denoiser (no model at all)")
    sampler.add_argument("--out", default="sampler-demo.png", help="output PNG (default: sampler-demo.png)")
    sampler.add_argument("--samplers", nargs="+", default=list(DEMO_SAMPLERS), help="sampler names or labels")
    sampler.add_argument("--schedule", default="karras", help="sigma schedule (default: karras)")
    sampler.add_argument("--steps", type=positive_int, default=20)
    sampler.add_argument("--images", type=positive_int, default=6, help="seeds per sampler")
    sampler.add_argument("--seed", type=int, default=0)
    sampler.add_argument("--quiet", action="store_true")
    sampler.set_defaults(run=cmd_sampler_demo)
