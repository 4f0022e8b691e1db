"""GPU it/s: latentrt against diffusers' UNet loop, full-size SD 1.5 (512x512) and SDXL (1024x1024).

Random weights are written once in the real single-file layouts (``full_size.py``, fp16), then:

* latentrt: ``load(path, device="cuda", dtype=fp16)``, txt2img with CFG 7, euler; it/s is
  ``(steps - 2) / (t(steps) - t(2))`` so text encoding and the VAE decode cancel out. Variants of
  the UNet's runtime (``--variants``): ``eager`` (plain torch), ``channels_last``
  (``torch_channels_last``), ``cuda_graphs`` (``torch_cuda_graphs``: one graph per shape, replayed),
  ``cuda_graphs_channels_last``, and ``torch_compile`` (``torch.compile`` with ``--compile-mode``,
  static shapes), run last in a child process and skipped past ``--compile-budget-s``;
* diffusers (when installed): ``UNet2DConditionModel`` from the published config with the same
  file's UNet (``convert_ldm_unet_checkpoint``), fp16, the same CFG Euler loop, timed the same way.

Everything stops before ``--budget-s`` (default 440 s, inside ``gpu.sh``'s 470 s): variants that would
not fit are recorded as skipped. Peak GPU memory is ``torch.cuda.max_memory_allocated`` of each run.
Writes JSON to ``--out`` after every run. Run by ``benchmarks/gpu.sh``.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from full_size import write_random_sd15, write_random_sdxl

import latentrt
from latentrt.core.protocols import ShapeLimits

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


VARIANTS: dict[str, str | None] = {  # variant -> the UNet's runtime (None: loaded as is, eager)
    "eager": None,
    "channels_last": "torch_channels_last",
    "cuda_graphs": "torch_cuda_graphs",
    "cuda_graphs_channels_last": "torch_cuda_graphs_channels_last",
    "torch_compile": "torch",  # a TorchModule whose module is then wrapped in torch.compile
}


def load_variant(path: Path, variant: str, side: int, device: torch.device, dtype: str, compile_mode: str) -> Any:
    """The pipeline in ``dtype`` with its UNet on ``variant``'s runtime, for ``side`` x ``side`` images."""
    runtime = VARIANTS[variant]
    limits = ShapeLimits(min_size=side, max_size=side, max_batch=1)
    options: dict[str, Any] = {} if runtime is None else {"runtime": {"unet": runtime}, "limits": limits}
    pipe = latentrt.load(path, device=device, dtype=dtype, progress=False, **options)
    if variant == "torch_compile":  # static shapes: the benchmark runs one size
        compiled: Any = getattr(pipe.model.denoiser, "backbone").compiled  # noqa: B009  (a CompiledUNet)
        compiled.module = torch.compile(compiled.module, mode=compile_mode, dynamic=False)
    return pipe


def latentrt_run(
    path: Path,
    side: int,
    steps: int,
    device: torch.device,
    variant: str = "eager",
    dtype: str = "fp16",
    compile_mode: str = "default",
) -> dict[str, Any]:
    """latentrt's txt2img it/s and peak GPU memory, with the UNet on ``variant``."""
    started = time.perf_counter()
    pipe = load_variant(path, variant, side, device, dtype, compile_mode)

    def run(n: int) -> object:
        return pipe("a photo of a cat", width=side, height=side, steps=n, cfg_scale=7.0, seed=1)

    _reset_peak(device)
    rate = its_per_second(run, steps, device)
    return {"it_s": rate, "peak_gb": _peak_gb(device), "setup_s": round(time.perf_counter() - started, 1)}


def compile_in_child(args: argparse.Namespace, name: str, side: int, timeout: float) -> Any:
    """The ``torch_compile`` variant in a child process killed after ``timeout`` seconds."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--side", str(side)]
    command += ["--steps", str(args.steps), "--cache", str(args.cache), "--device", args.device]
    command += ["--compile-mode", args.compile_mode, "--dtype", args.dtype]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return f"skipped: compiling and timing took over {timeout:.0f} s"
    results = [line.removeprefix("RESULT ") for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not results:
        return f"failed (exit {done.returncode}): {done.stderr.strip()[-400:]}"
    return json.loads(results[-1])


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
    gc.collect()  # the previous variant's pipeline (and its CUDA graph pools)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def parse_args() -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/latentrt-gpu-bench"))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--side", type=int, help="override the image side (smoke tests)")
    parser.add_argument("--dtype", default="fp16", help="latentrt's dtype (fp32 for CPU smoke tests)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"latentrt variants: {', '.join(VARIANTS)}")
    parser.add_argument(
        "--compile-mode", default="default", help="torch.compile mode (max-autotune-no-cudagraphs: slow)"
    )
    parser.add_argument("--compile-budget-s", type=float, default=150.0, help="per model; skipped past it")
    parser.add_argument("--budget-s", type=float, default=440.0, help="stop starting runs past this")
    parser.add_argument("--no-diffusers", action="store_true", help="skip diffusers' loop")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one torch_compile run
    return parser.parse_args()


def model_file(args: argparse.Namespace, name: str) -> Path:
    """The model's random fp16 single file, written on first use."""
    path: Path = args.cache / f"{name}-random-fp16.safetensors"
    if not path.exists():
        print(f"writing {path} ...", flush=True)
        MODELS[name][0](path, torch.float16)
    return path


def main() -> None:
    """Write the models, time diffusers and every variant, print and save the results.

    Order, so that what matters most fits the time budget: eager latentrt and diffusers for every
    model, then the other variants, then ``torch_compile`` (the slowest to set up) in child processes.
    """
    args = parse_args()
    device, started = torch.device(args.device), time.perf_counter()
    if args.child:  # one torch_compile run, reported on stdout to the parent
        side = args.side or MODELS[args.child][1]
        path = model_file(args, args.child)
        row = latentrt_run(path, side, args.steps, device, "torch_compile", args.dtype, args.compile_mode)
        print("RESULT " + json.dumps(row), flush=True)
        return
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    names = args.models.split(",")
    rows = {name: new_row(args, name) for name in names}
    firsts = ["eager"] if "eager" in variants else []
    plan = [(n, v) for n in names for v in [*firsts, *([] if args.no_diffusers else ["diffusers"])]]
    plan += [(n, v) for n in names for v in variants if v not in ("eager", "torch_compile")]
    plan += [(n, "torch_compile") for n in names if "torch_compile" in variants]
    for name, what in plan:
        left = args.budget_s - (time.perf_counter() - started)
        rows[name][what] = run_one(args, rows[name], what, device, left)
        print(json.dumps({"model": name, what: rows[name][what]}), flush=True)
        save(args.out, list(rows.values()))
    for row in rows.values():
        if isinstance(row.get("diffusers"), dict) and isinstance(row.get("eager"), dict):
            row["ratio"] = row["eager"]["it_s"] / row["diffusers"]["it_s"]
        print(json.dumps(row), flush=True)
    save(args.out, list(rows.values()))


def new_row(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """A model's result row, its weights file written on first use."""
    side = args.side or MODELS[name][1]
    return {"model": name, "side": side, "steps": args.steps, "path": str(model_file(args, name))}


def run_one(args: argparse.Namespace, row: dict[str, Any], what: str, device: torch.device, left: float) -> Any:
    """One latentrt variant or diffusers' loop for ``row``'s model, or why it was skipped."""
    path, side = Path(row["path"]), row["side"]
    if what == "torch_compile":
        budget = min(args.compile_budget_s, left)
        if budget < 60:
            return f"skipped: {left:.0f} s of the {args.budget_s:.0f} s budget left"
        return compile_in_child(args, row["model"], side, budget)
    if left < 45:
        return f"skipped: {left:.0f} s of the {args.budget_s:.0f} s budget left"
    if what == "diffusers":
        _, _, config, context = MODELS[row["model"]]
        return diffusers_run(path, config, side, context, args.steps, device)
    return latentrt_run(path, side, args.steps, device, what, args.dtype)


def save(out: Path, rows: list[dict[str, Any]]) -> None:
    """Write the rows so far to ``out/gpu_bench.json``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
