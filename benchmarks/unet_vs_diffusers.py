"""Seconds per UNet step: latentrt (torch eager fp32, bf16) against diffusers' UNet2DConditionModel,
same full-size SD 1.5 weights (random, ``full_size.py``), same process, batch 2 (one image with CFG).

diffusers' UNet is built from the SD 1.5 config and given the file's UNet through diffusers' own
``convert_ldm_unet_checkpoint``; both read the same memory-mapped file. Variants alternate step by
step, so background load slows each alike; each is the median of ``--repeats`` steps after one
warm-up. Results: ``benchmarks/results/unet_vs_diffusers.{json,md,png}`` with the machine's CPU,
cores and library versions.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from full_size import cached_sd15

import latentrt
from latentrt.core.autotune import cpu_flags
from latentrt.core.checkpoint import open_tensors

RESULTS = Path(__file__).resolve().parent / "results"
SD15_DIFFUSERS_CONFIG: dict[str, Any] = {  # runwayml/stable-diffusion-v1-5 unet/config.json
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
}


def machine() -> dict[str, Any]:
    """CPU model, cores, threads, bf16 support and library versions."""
    import diffusers

    model = next(
        (ln.split(":", 1)[1].strip() for ln in _cpuinfo() if ln.startswith("model name")), platform.processor()
    )
    return {
        "cpu": model,
        "cores": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in cpu_flags(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "latentrt": latentrt.__version__,
        "python": platform.python_version(),
    }


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def diffusers_unet(path: Path) -> Any:
    """diffusers' SD 1.5 UNet with the file's UNet weights, converted by diffusers itself."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    tensors = open_tensors(path)
    ldm = {k: tensors[k] for k in tensors if k.startswith("model.diffusion_model.")}
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SD15_DIFFUSERS_CONFIG)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ldm, unet.config), strict=True, assign=True)
    return unet.eval().requires_grad_(False)


def variants(path: Path) -> dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]]:
    """The UNet calls to time, by label."""
    ours = latentrt.load(path, progress=False).model.denoiser.backbone.unet  # type: ignore[attr-defined]
    ours_bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    theirs = diffusers_unet(path)
    bf16 = torch.bfloat16
    return {
        "diffusers eager fp32": lambda x, t, c: theirs(x, t, c, return_dict=False),
        "latentrt eager fp32": lambda x, t, c: ours(x, t, c),
        "latentrt bf16": lambda x, t, c: ours_bf16(x.to(bf16), t, c.to(bf16)),
    }


def time_steps(calls: dict[str, Callable[..., Any]], size: int, repeats: int) -> dict[str, float]:
    """Median seconds per call at ``size`` pixels, batch 2, calls alternating."""
    x, t, c = torch.randn(2, 4, size // 8, size // 8), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 768)
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for rep in range(repeats + 1):
            for name, call in calls.items():
                start = time.perf_counter()
                call(x, t, c)
                if rep:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def write(rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    """JSON, a markdown table and a bar chart."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "unet_vs_diffusers.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=2) + "\n")
    lines = ["| size | variant | s/step | / diffusers |", "| ---: | --- | ---: | ---: |"]
    lines += [f"| {r['size']} | {r['variant']} | {r['seconds']:.2f} | {r['ratio']:.2f} |" for r in rows]
    header = ", ".join(f"{k} {v}" for k, v in info.items())
    (RESULTS / "unet_vs_diffusers.md").write_text(f"SD 1.5 UNet, batch 2 ({header})\n\n" + "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{r['variant']}\n{r['size']}px" for r in rows]
    ax.bar(
        labels, [r["seconds"] for r in rows], color=["#888" if "diffusers" in r["variant"] else "#37a" for r in rows]
    )
    ax.set_ylabel("seconds per UNet step (batch 2)")
    ax.set_title(f"SD 1.5 UNet on {info['cpu']}, {info['cores']} threads")
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "unet_vs_diffusers.png", dpi=120)


def main() -> None:
    """Time every variant at every size and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256", help="comma-separated image sides (e.g. 256,512)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    calls = variants(cached_sd15())
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        seconds = time_steps(calls, size, args.repeats)
        base = seconds["diffusers eager fp32"]
        rows += [{"size": size, "variant": k, "seconds": v, "ratio": v / base} for k, v in seconds.items()]
        print(json.dumps(rows[-3:]), flush=True)
    write(rows, machine())


if __name__ == "__main__":
    main()
