"""GPU it/s: latentrt against diffusers' UNet loop, full-size SD 1.5 (512x512) and SDXL (1024x1024).

Random weights are written once in the real single-file layouts (``full_size.py``, fp16), then:

* latentrt: ``load(path, device="cuda", dtype=fp16)``, txt2img with CFG 7, euler; it/s is
  ``(steps - 2) / (t(steps) - t(2))`` so text encoding and the VAE decode cancel out;
* diffusers (when installed): ``UNet2DConditionModel`` from the published config with the same
  file's UNet (``convert_ldm_unet_checkpoint``), fp16, the same CFG Euler loop, timed the same way.

Peak GPU memory is ``torch.cuda.max_memory_allocated`` of each run. Writes JSON and markdown to
``--out``. Run by ``benchmarks/gpu.sh``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from full_size import write_random_sd15, write_random_sdxl

import latentrt

SD15_CONFIG: dict[str, Any] = {  # runwayml/stable-diffusion-v1-5 unet/config.json
    "sample_size": 64,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}
SDXL_CONFIG: dict[str, Any] = {  # stabilityai/stable-diffusion-xl-base-1.0 unet/config.json
    "sample_size": 128,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
MODELS = {  # name -> (writer, image side, diffusers config, context width)
    "sd15": (write_random_sd15, 512, SD15_CONFIG, 768),
    "sdxl": (write_random_sdxl, 1024, SDXL_CONFIG, 2048),
}


def synced(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds ``fn`` takes, the device synchronized before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def its_per_second(run: Callable[[int], object], steps: int, device: torch.device) -> float:
    """Steps per second from two runs (2 and ``steps`` steps): fixed costs cancel out."""
    run(2)  # warm-up
    short = synced(lambda: run(2), device)
    long = synced(lambda: run(steps), device)
    if long <= short:  # fixed costs swamped the steps (tiny smoke-test sizes): no meaningful rate
        print(f"warning: {steps} steps took no longer than 2 ({long:.3f} s vs {short:.3f} s)", flush=True)
        return float("nan")
    return (steps - 2) / (long - short)


def latentrt_run(path: Path, side: int, steps: int, device: torch.device) -> dict[str, Any]:
    """latentrt's txt2img it/s and peak GPU memory."""
    pipe = latentrt.load(path, device=device, dtype="fp16", progress=False)

    def run(n: int) -> object:
        return pipe("a photo of a cat", width=side, height=side, steps=n, cfg_scale=7.0, seed=1)

    _reset_peak(device)
    rate = its_per_second(run, steps, device)
    return {"it_s": rate, "peak_gb": _peak_gb(device)}


def diffusers_run(path: Path, config: dict[str, Any], side: int, context: int, steps: int, device: torch.device) -> Any:
    """diffusers' UNet in a CFG Euler loop: it/s and peak GPU memory (None when diffusers is missing)."""
    try:
        import diffusers
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    except ImportError as exc:
        return f"skipped: diffusers is not installed here ({exc})"
    from safetensors.torch import load_file

    ldm = {k: v for k, v in load_file(str(path)).items() if k.startswith("model.diffusion_model.")}
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ldm, unet.config), strict=True, assign=True)
    unet = unet.to(device, torch.float16).eval().requires_grad_(False)
    del ldm
    half = torch.float16
    cond = torch.randn(2, 77, context, device=device, dtype=half)
    extra = {}
    if "addition_embed_type" in config:
        size = torch.tensor([side, side, 0, 0, side, side], device=device, dtype=half)
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 1280, device=device, dtype=half),
                                       "time_ids": size.expand(2, 6)}}  # fmt: skip
    sigmas = torch.linspace(14.6, 0.0, steps + 1).tolist()

    @torch.inference_mode()
    def run(n: int) -> object:
        x = torch.randn(1, 4, side // 8, side // 8, device=device, dtype=half) * sigmas[0]
        for i in range(n):
            s = sigmas[i]
            eps = unet(torch.cat([x, x]) / (s * s + 1) ** 0.5, 500.0, cond, return_dict=False, **extra)[0]
            e_cond, e_uncond = eps.chunk(2)
            x = x + (e_uncond + 7.0 * (e_cond - e_uncond)) * (sigmas[i + 1] - s)
        return x

    _reset_peak(device)
    rate = its_per_second(run, steps, device)
    return {"it_s": rate, "peak_gb": _peak_gb(device)}


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def main() -> None:
    """Write the models, time both libraries, print and save the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/latentrt-gpu-bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--side", type=int, help="override the image side (smoke tests)")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    for name in args.models.split(","):
        write, side, config, context = MODELS[name]
        side = args.side or side
        path = args.cache / f"{name}-random-fp16.safetensors"
        if not path.exists():
            print(f"writing {path} ...", flush=True)
            write(path, torch.float16)
        row: dict[str, Any] = {"model": name, "side": side, "steps": args.steps}
        row["latentrt"] = latentrt_run(path, side, args.steps, device)
        row["diffusers"] = diffusers_run(path, config, side, context, args.steps, device)
        if isinstance(row["diffusers"], dict):
            row["ratio"] = row["latentrt"]["it_s"] / row["diffusers"]["it_s"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
