"""``latentrt generate`` and ``latentrt info``: images from a checkpoint, and their parameters.

``generate --from-png IMAGE.png`` reads the A1111 parameters text of an earlier image
and regenerates it; options given on the command line override what the PNG says.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from latentrt.cli_export import add_runtime_options, check_runtimes, engine_limits
from latentrt.core.autotune import auto_choice, auto_runtime
from latentrt.core.errors import InvalidRequest
from latentrt.core.loader import load, resolve_device
from latentrt.core.parameters import parse_parameters, read_png_parameters, save_png
from latentrt.core.registry import registry
from latentrt.core.request import GenerationRequest
from latentrt.plugins.demo.family import DEMO_MODEL_NAME

__all__ = ["add_generate_parser", "add_info_parser", "output_paths"]

logger = logging.getLogger(__name__)

# command-line option -> (request field, A1111 key, converter from the PNG's text)
_FROM_PNG: dict[str, tuple[str, str, Any]] = {
    "steps": ("steps", "Steps", int),
    "cfg": ("cfg_scale", "CFG scale", float),
    "seed": ("seed", "Seed", int),
    "clip_skip": ("clip_skip", "Clip skip", int),
    "strength": ("strength", "Denoising strength", float),
}


def output_paths(output: Path, count: int) -> list[Path]:
    """``out.png`` for one image; ``out-1.png``, ``out-2.png``, ... for several."""
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{k}{output.suffix}") for k in range(1, count + 1)]


def _open_image(path: str | None, what: str) -> Image.Image | None:
    if path is None:
        return None
    try:
        with Image.open(path) as image:
            loaded: Image.Image = image.copy()
            return loaded
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{what} {path}: not a readable image ({exc})") from exc


def _png_settings(path: str) -> tuple[dict[str, Any], str]:
    """Request fields from an earlier image's parameters text, and the model name it names."""
    params = parse_parameters(read_png_parameters(path))
    fields: dict[str, Any] = {"prompt": params.prompt, "negative_prompt": params.negative_prompt}
    for field, key, convert in _FROM_PNG.values():
        if key in params.settings:
            try:
                fields[field] = convert(str(params.settings[key]))
            except ValueError as exc:
                raise InvalidRequest(f"{path}: cannot read {key}={params.settings[key]!r}") from exc
    fields.update(
        _sampler_fields(str(params.settings.get("Sampler", "")), str(params.settings.get("Schedule type", "")))
    )
    if "Size" in params.settings:
        width, _, height = str(params.settings["Size"]).partition("x")
        fields["width"], fields["height"] = int(width), int(height)
    return fields, str(params.settings.get("Model", "?"))


def _sampler_fields(sampler_label: str, schedule_label: str) -> dict[str, str]:
    """Sampler and schedule names from A1111 labels, old combined ones ("DPM++ 2M Karras") included."""
    if not sampler_label:
        return {}
    sampler, implied = registry().sampler_and_scheduler(sampler_label)
    fields = {"sampler": sampler.name}
    if schedule_label and schedule_label != "Automatic":
        fields["scheduler"] = registry().scheduler(schedule_label).name
    elif implied is not None:
        fields["scheduler"] = implied.name
    return fields


def _request_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    if args.from_png:
        fields, model_name = _png_settings(args.from_png)
        if args.checkpoint is None and model_name != DEMO_MODEL_NAME:
            raise InvalidRequest(f"{args.from_png} was made with model {model_name!r}: pass --checkpoint PATH to it")
        if "strength" in fields and args.init_image is None:
            logger.warning("%s is an img2img result: pass --init-image to regenerate it exactly", args.from_png)
    if args.prompt is not None:
        fields["prompt"] = args.prompt
    if "prompt" not in fields:
        raise InvalidRequest("give a PROMPT (or --from-png IMAGE.png)")
    overrides = {
        "negative_prompt": args.negative,
        "prompt_2": args.prompt_2,
        "negative_prompt_2": args.negative_2,
        "original_size": args.original_size,
        "target_size": args.target_size,
        "crop": args.crop,
        "aesthetic_score": args.aesthetic_score,
        "negative_aesthetic_score": args.negative_aesthetic_score,
        "refiner_switch_at": args.refiner_switch_at if args.refiner else None,
        "sampler": args.sampler,
        "scheduler": args.scheduler,
        **{field: getattr(args, option) for option, (field, _, _) in _FROM_PNG.items()},
        "width": args.width,
        "height": args.height,
        "batch_size": args.batch,
    }
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return fields


def cmd_generate(args: argparse.Namespace) -> int:
    """``latentrt generate``: load, generate, save PNGs with their parameters text."""
    if args.runtime is not None:  # a runtime that cannot run here stops us before the model loads
        check_runtimes(registry(), args.runtime, args.device)
    fields = _request_fields(args)
    for name in ("width", "height"):
        if fields.get(name) is not None and fields[name] % 8:
            value = fields[name]
            raise InvalidRequest(f"--{name} must be a multiple of 8, got {value}; try {max(8, value - value % 8)}")
    checkpoint = args.checkpoint
    if checkpoint is None:
        print("no --checkpoint given: using the built-in demo model (64x64 coloured shapes; see README)")
        checkpoint = "demo"
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        raise InvalidRequest(f"--output must end in .png, got {output}")
    if not output.parent.is_dir():
        raise InvalidRequest(f"--output folder {output.parent} does not exist")
    init = _open_image(args.init_image, "--init-image")
    mask = _open_image(args.mask, "--mask")
    request = GenerationRequest(**fields, init_image=init, mask=mask)
    request.validate()
    if args.dtype == "auto":  # say what auto picked (the loader logs it too)
        print(auto_choice(resolve_device(args.device)).describe())
    if args.runtime == "auto":
        memory = args.storage_dtype is not None or args.offload != "none"
        print(auto_runtime(resolve_device(args.device), compilable=True, memory_options=memory).describe())
    pipeline = load(
        checkpoint,
        vae=args.vae,
        device=args.device,
        dtype=args.dtype,
        prediction=args.prediction,
        vae_tiling=args.vae_tiling,
        refiner=args.refiner,
        runtime=args.runtime,
        engines=args.engines,
        limits=engine_limits(args),
        storage_dtype=args.storage_dtype,
        offload=args.offload,
    )
    result = pipeline.generate(request)
    for path, image, text in zip(
        output_paths(output, len(result.images)), result.images, result.parameters, strict=True
    ):
        save_png(image, path, text)
        print(f"wrote {path} (seed {parse_parameters(text).settings.get('Seed')})")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """``latentrt info IMAGE.png``: print the A1111 parameters text an image carries."""
    print(read_png_parameters(args.image))
    return 0


def add_generate_parser(commands: Any, positive_int: Any) -> None:
    """The ``generate`` subcommand and its options (names as in the README)."""
    gen = commands.add_parser("generate", help="generate images from a checkpoint")
    gen.add_argument("prompt", nargs="?", help="the prompt (A1111 syntax: (word:1.2), [word], BREAK)")
    gen.add_argument("--checkpoint", help=".safetensors/.ckpt file or diffusers folder")
    gen.add_argument("--negative", help="negative prompt")
    gen.add_argument("--steps", type=positive_int)
    gen.add_argument("--cfg", type=float, help="CFG scale (default 7)")
    gen.add_argument("--sampler", help="sampler name or A1111 label (default euler)")
    gen.add_argument("--scheduler", help="sigma schedule (default normal)")
    gen.add_argument("--seed", type=int, help="seed; -1 or unset: random")
    gen.add_argument("--width", type=positive_int)
    gen.add_argument("--height", type=positive_int)
    gen.add_argument("--batch", type=positive_int, help="images per run, seeds seed, seed+1, ...")
    gen.add_argument("--vae", help="separate VAE file or diffusers vae folder")
    gen.add_argument("--vae-tiling", dest="vae_tiling", action="store_true", help="tiled VAE for large images")
    gen.add_argument("--clip-skip", dest="clip_skip", type=positive_int)
    gen.add_argument("--init-image", dest="init_image", help="img2img: the starting image")
    gen.add_argument("--strength", type=float, help="img2img denoising strength (default 0.75)")
    gen.add_argument("--mask", help="inpainting: white = repaint (needs --init-image)")
    gen.add_argument("--prediction", choices=("eps", "v"), help="model prediction type (weights cannot tell)")
    gen.add_argument(
        "--dtype", choices=("fp32", "fp16", "bf16", "auto"), default="fp32", help="auto: fastest for the device"
    )
    gen.add_argument("--device", default="cpu", help="cpu or cuda")
    add_memory_options(gen)
    add_runtime_options(gen, positive_int)
    xl = gen.add_argument_group("SDXL")
    xl.add_argument("--prompt-2", dest="prompt_2", help="prompt for the second text encoder (default: PROMPT)")
    xl.add_argument("--negative-2", dest="negative_2", help="negative prompt for the second text encoder")
    xl.add_argument("--original-size", dest="original_size", type=_size, help="WxH size conditioning")
    xl.add_argument("--target-size", dest="target_size", type=_size, help="WxH size conditioning")
    xl.add_argument("--crop", type=_pair, help="TOP,LEFT crop conditioning (default 0,0)")
    xl.add_argument("--aesthetic-score", dest="aesthetic_score", type=float, help="refiner's (default 6.0)")
    xl.add_argument("--negative-aesthetic-score", dest="negative_aesthetic_score", type=float, help="default 2.5")
    xl.add_argument("--refiner", help="SDXL refiner checkpoint to hand the latent to")
    xl.add_argument("--refiner-switch-at", dest="refiner_switch_at", type=float, default=0.8,
                    help="fraction of the steps after which the refiner takes over (default 0.8)")  # fmt: skip
    gen.add_argument("--output", default="output.png", help="PNG path; batches get -1, -2, ... suffixes")
    gen.add_argument("--from-png", dest="from_png", help="regenerate an image from its parameters text")
    gen.set_defaults(run=cmd_generate)


def add_memory_options(parser: Any) -> None:
    """``--storage-dtype`` and ``--offload`` (README "Memory")."""
    memory = parser.add_argument_group("memory")
    memory.add_argument(
        "--storage-dtype", dest="storage_dtype", choices=("fp16", "bf16"),
        help="keep layer weights in 16 bits, upcast one layer at a time to --dtype as it runs",
    )  # fmt: skip
    memory.add_argument(
        "--offload", choices=("none", "sequential"), default="none",
        help="sequential: one network resident at a time (text encoder -> UNet -> VAE)",
    )  # fmt: skip


def _pair(text: str, separator: str = ",") -> tuple[int, int]:
    first, _, second = text.partition(separator)
    try:
        pair = int(first), int(second)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected two integers like 0{separator}0, got {text!r}") from None
    if min(pair) < 0:
        raise argparse.ArgumentTypeError(f"expected integers >= 0, got {text!r}")
    return pair


def _size(text: str) -> tuple[int, int]:
    return _pair(text.lower(), "x")


def add_info_parser(commands: Any) -> None:
    """The ``info`` subcommand."""
    info = commands.add_parser("info", help="print the generation parameters stored in a PNG")
    info.add_argument("image")
    info.set_defaults(run=cmd_info)
