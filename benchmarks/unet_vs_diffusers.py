"""Seconds per UNet step: latentrt (torch eager fp32, channels-last, bf16, ONNX Runtime) against
diffusers' UNet2DConditionModel with the same weights, in the same process, batch 2 (one image with CFG).

Models (``--models``, comma-separated):

* ``sd15``: full-size SD 1.5, random weights (``full_size.cached_sd15``), 256 and 512 px. Variants:
  diffusers eager fp32, latentrt eager fp32, latentrt eager fp32 with the UNet in channels-last
  memory format (inputs as they come), latentrt bf16, latentrt with its UNet on ONNX Runtime (fp32;
  engine exported once by ``latentrt.load(runtime=...)`` into ``benchmarks/.cache/engines``).
* ``sdxl``: full-size SDXL base, random weights written once in fp32 (``full_size.cached_sdxl``, so
  both libraries read the same memory-mapped tensors), 512 and 768 px, with SDXL's added
  conditioning (pooled text embeds 1280, six time ids). bf16 only when memory allows it (it
  copies 5 GB); no ONNX Runtime: exporting a 2.6B-parameter UNet needs more memory than this
  machine has (the 0.86B SD 1.5 export already peaks at 13.8 GB).
* ``demo``: the built-in demo model (``latentrt.load("demo")``), 64 and 128 px (latents 4x
  smaller); diffusers' UNet gets a config mapped from ``DEMO_UNET`` (:func:`diffusers_config`) and
  must match ours to 1e-4 on a random input before anything is timed.

diffusers' UNets take the file's UNet through diffusers' own ``convert_ldm_unet_checkpoint``.
Variants alternate step by step, so background load slows each alike; each figure is the median
of ``--repeats`` steps after one warm-up round, whose outputs give each variant's max abs
difference from diffusers. Results: ``benchmarks/results/unet_vs_diffusers.{json,md,png}`` (one
table and one chart panel per model; a run replaces only the models it ran) with the machine's CPU,
cores, library versions and each run's peak RSS (memory-mapped weights count once they are read).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import charts
import torch
from full_size import CACHE, cached_sd15, cached_sdxl
from gpu_bench import SD15_CONFIG, SDXL_CONFIG  # the published unet/config.json files
from torch import Tensor

import latentrt
from latentrt.core.autotune import cpu_flags
from latentrt.core.checkpoint import open_tensors
from latentrt.core.protocols import ShapeLimits
from latentrt.plugins.demo.model import DEMO_UNET
from latentrt.plugins.stable_diffusion.unet import UNetConfig

RESULTS = Path(__file__).resolve().parent / "results"
ENGINES = CACHE / "engines"
LDM_UNET = "model.diffusion_model."
DEMO_FILE = Path(latentrt.__file__).parent / "plugins" / "demo" / "latentrt-demo.safetensors"
REFERENCE = "diffusers eager fp32"
SDXL_BF16_NEEDS_GB = 17.0  # fp32 UNet pages (10.3 GB) + the bf16 copy (5.1 GB) + headroom
Call = Callable[..., Tensor]


@dataclasses.dataclass(frozen=True)
class Bench:
    """One model to time: label, default sizes (px), latent downscale, context width, SDXL extras."""

    label: str
    sizes: tuple[int, ...]
    downscale: int
    context: int
    sdxl: bool = False


BENCHES = {
    "sd15": Bench("SD 1.5 UNet (0.86B, random weights)", (256, 512), 8, 768),
    "sdxl": Bench("SDXL base UNet (2.6B, random weights)", (512, 768), 8, 2048, sdxl=True),
    "demo": Bench("demo model UNet (latentrt.load('demo'))", (64, 128), 4, DEMO_UNET.context_dim),
}


def machine() -> dict[str, Any]:
    """CPU model, cores, threads, bf16 support and library versions."""
    import diffusers
    import onnxruntime

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), platform.processor())
    return {
        "cpu": model,
        "cores": torch.get_num_threads(),
        "avx512_bf16": "avx512_bf16" in cpu_flags(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "onnxruntime": onnxruntime.__version__,
        "latentrt": latentrt.__version__,
        "python": platform.python_version(),
    }


def diffusers_config(config: UNetConfig) -> dict[str, Any]:
    """diffusers' ``UNet2DConditionModel`` config for our :class:`UNetConfig`. diffusers'
    ``attention_head_dim`` is (despite its name) the number of heads per level. For ``SDXL_UNET`` this
    gives the published SDXL base config (bar ``sample_size``), which cross-checks the mapping."""
    if len(set(config.num_res_blocks)) != 1 or config.transformer_depth_middle != max(config.transformer_depth[-1], 1):
        raise ValueError("diffusers needs equal res blocks per level and a middle block as deep as the last level")
    widths = [config.model_channels * m for m in config.channel_mult]
    attention = [depth > 0 for depth in config.transformer_depth]
    mapped: dict[str, Any] = {
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "block_out_channels": widths,
        "layers_per_block": config.num_res_blocks[0],
        "transformer_layers_per_block": [max(depth, 1) for depth in config.transformer_depth],
        "attention_head_dim": [max(config.heads(width)[0], 1) for width in widths],
        "cross_attention_dim": config.context_dim,
        "use_linear_projection": config.use_linear_in_transformer,
        "norm_num_groups": config.num_groups,
    }
    if config.adm_in_channels is not None:
        mapped |= {
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256,
            "projection_class_embeddings_input_dim": config.adm_in_channels,
        }
    return mapped


def diffusers_unet(path: Path, config: dict[str, Any]) -> Any:
    """diffusers' UNet for ``config`` with the file's UNet weights in fp32, converted by diffusers."""
    import diffusers
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    tensors = open_tensors(path)
    ldm = {k: tensors[k].float() for k in tensors if k.startswith(LDM_UNET)}  # a no-op (no copy) on fp32 files
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ldm, unet.config), strict=True, assign=True)
    return unet.eval().requires_grad_(False)


def backbone(pipe: Any) -> Call:
    """The pipeline's UNet backbone (a torch module wrapper, or the compiled drop-in)."""
    return pipe.model.denoiser.backbone  # type: ignore[no-any-return]


def inputs(bench: Bench, size: int, seed: int = 0) -> dict[str, Tensor]:
    """Batch-2 UNet inputs at ``size`` pixels: latents, timesteps, 77 context tokens (SDXL: + extras)."""
    g = torch.Generator().manual_seed(seed)
    side = size // bench.downscale
    feeds = {
        "sample": torch.randn(2, 4, side, side, generator=g),
        "timestep": torch.tensor([500.0, 500.0]),
        "context": torch.randn(2, 77, bench.context, generator=g),
    }
    if bench.sdxl:
        feeds["text_embeds"] = torch.randn(2, 1280, generator=g)
        feeds["time_ids"] = torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32)
    return feeds


def theirs_call(unet: Any) -> Call:
    """diffusers' UNet with latentrt's input names."""

    def call(sample: Tensor, timestep: Tensor, context: Tensor, **added: Tensor) -> Tensor:
        return unet(sample, timestep, context, added_cond_kwargs=added or None, return_dict=False)[0]  # type: ignore[no-any-return]

    return call


def sd15_variants(sizes: tuple[int, ...], notes: list[str]) -> dict[str, Call]:
    """SD 1.5: ONNX Runtime first (its export peaks at 13.8 GB, before anything else is loaded)."""
    path = cached_sd15()
    limits = ShapeLimits(min_size=min(256, *sizes), max_size=max(512, *sizes), max_batch=1)
    started = time.perf_counter()
    ort = latentrt.load(path, runtime={"unet": "onnxruntime"}, engines=ENGINES, limits=limits, progress=False)
    notes.append(
        f"ONNX Runtime UNet: latentrt's engine for {limits.min_size}-{limits.max_size} px, batch 1-2, fp32, graph "
        f"optimized offline + session level all; load {time.perf_counter() - started:.0f} s (export on first run)"
    )
    ours = latentrt.load(path, progress=False)
    channels_last = latentrt.load(path, progress=False)
    backbone(channels_last).unet.to(memory_format=torch.channels_last)  # type: ignore[attr-defined]
    return {
        REFERENCE: theirs_call(diffusers_unet(path, SD15_CONFIG)),
        "latentrt eager fp32": backbone(ours),
        "latentrt eager fp32 channels-last": backbone(channels_last),
        "latentrt bf16": backbone(latentrt.load(path, dtype="bf16", progress=False)),
        "latentrt onnxruntime fp32": backbone(ort),
    }


class AnonPeak:
    """Peak anonymous RSS (MB) of this process, polled every 0.2 s: memory the process holds itself.
    ``ru_maxrss`` also counts memory-mapped weight pages, once per mapping of the same file."""

    def __init__(self) -> None:
        self.peak_mb = 0.0
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        while True:
            status = Path("/proc/self/status").read_text().splitlines()
            kb = next((int(ln.split()[1]) for ln in status if ln.startswith("RssAnon:")), 0)
            self.peak_mb = max(self.peak_mb, kb / 1024)
            time.sleep(0.2)


def memory_available_gb() -> float:
    """MemAvailable from /proc/meminfo, in GB."""
    line = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemAvailable"))
    return int(line.split()[1]) / 2**20


def bf16_twin(fp32: Any) -> Any:
    """The torch backbone ``fp32`` again with a bf16 copy of its UNet (5.1 GB for SDXL), nothing else
    copied: ``load(dtype="bf16")`` would also copy the text encoders, and a second load re-splits bigG."""
    unet = fp32.unet
    with torch.device("meta"):
        twin = type(unet)(unet.config)
    state = {name: tensor.to(torch.bfloat16) for name, tensor in unet.state_dict().items()}
    twin.load_state_dict(state, strict=True, assign=True)  # the UNet has no buffers outside its state dict
    return dataclasses.replace(fp32, unet=twin.eval().requires_grad_(False))


def sdxl_variants(sizes: tuple[int, ...], notes: list[str], bf16: str) -> dict[str, Call]:
    """SDXL: diffusers and latentrt on one fp32 file; bf16 when asked or when memory allows."""
    path = cached_sdxl()
    available = memory_available_gb()
    calls = {
        REFERENCE: theirs_call(diffusers_unet(path, SDXL_CONFIG)),
        "latentrt eager fp32": backbone(latentrt.load(path, progress=False)),
    }
    if bf16 == "on" or (bf16 == "auto" and available >= SDXL_BF16_NEEDS_GB):
        calls["latentrt bf16"] = bf16_twin(calls["latentrt eager fp32"])
        notes.append(f"bf16: the fp32 UNet copied to bf16 (5.1 GB), {available:.1f} GB available at the start")
    else:
        notes.append(
            f"bf16 not run: {available:.1f} GB available, it needs about {SDXL_BF16_NEEDS_GB:.0f} GB "
            "(fp32 UNet pages plus a 5.1 GB bf16 copy)"
        )
    notes.append(
        "ONNX Runtime not run: the export of the 0.86B-parameter SD 1.5 UNet already peaks at 13.8 GB; the "
        "2.6B-parameter SDXL UNet is 3x larger (about 40 GB by scaling), beyond this machine's 23 GB"
    )
    return calls


def check_parity(ours: Call, theirs: Call, bench: Bench, size: int, tolerance: float = 1e-4) -> float:
    """Max abs difference of the two UNets on one random input; raises when above ``tolerance``."""
    with torch.inference_mode():
        feeds = inputs(bench, size, seed=1)
        diff = (ours(**feeds) - theirs(**feeds)).abs().max().item()
    if not diff < tolerance:
        raise SystemExit(
            f"{bench.label}: latentrt and diffusers differ by {diff:.2e} (> {tolerance:.0e}); "
            "the config mapping or weight conversion is wrong, so timing them proves nothing"
        )
    return diff


def demo_variants(sizes: tuple[int, ...], notes: list[str]) -> dict[str, Call]:
    """Demo: our UNet vs diffusers' with a mapped config, checked for parity first."""
    config = diffusers_config(DEMO_UNET)
    ours = backbone(latentrt.load("demo", progress=False))
    theirs = theirs_call(diffusers_unet(DEMO_FILE, {"sample_size": min(sizes) // 4, **config}))
    diff = check_parity(ours, theirs, BENCHES["demo"], min(sizes))
    notes.append(f"diffusers config mapped from DEMO_UNET: {json.dumps(config)}; parity max abs diff {diff:.1e}")
    return {REFERENCE: theirs, "latentrt eager fp32": ours}


def time_steps(
    calls: dict[str, Call], feeds: dict[str, Tensor], repeats: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per call (calls alternating, after a warm-up round) and each call's max abs
    difference from the reference on the warm-up round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    warm_up: dict[str, Tensor] = {}
    with torch.inference_mode():
        for rep in range(repeats + 1):
            for name, call in calls.items():
                start = time.perf_counter()
                out = call(**feeds)
                elapsed = time.perf_counter() - start
                if rep:  # the first round warms up
                    times[name].append(elapsed)
                else:
                    warm_up[name] = out.float()
                print(f"  {size_of(feeds)} {name}: {elapsed:.2f} s", flush=True)
    diffs = {name: (out - warm_up[REFERENCE]).abs().max().item() for name, out in warm_up.items()}
    return {name: statistics.median(v) for name, v in times.items()}, diffs


def size_of(feeds: dict[str, Tensor]) -> str:
    """``HxW`` of the latents."""
    return "x".join(map(str, feeds["sample"].shape[2:]))


def run_model(
    name: str, sizes: tuple[int, ...], repeats: int, sdxl_bf16: str
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Build one model's variants, time them at every size; returns its metadata and rows."""
    bench, notes, anon = BENCHES[name], [], AnonPeak()
    started = time.perf_counter()
    if name == "sd15":
        calls = sd15_variants(sizes, notes)
    elif name == "sdxl":
        calls = sdxl_variants(sizes, notes, sdxl_bf16)
    else:
        calls = demo_variants(sizes, notes)
    print(f"{name}: built {len(calls)} variants in {time.perf_counter() - started:.0f} s", flush=True)
    rows = []
    for size in sizes:
        seconds, diffs = time_steps(calls, inputs(bench, size), repeats)
        base = seconds[REFERENCE]
        rows += [
            {
                "model": name,
                "size": size,
                "variant": k,
                "seconds": v,
                "ratio": v / base,
                "max_abs_diff_vs_diffusers": diffs[k],
            }
            for k, v in seconds.items()
        ]
        print(json.dumps(rows[-len(seconds) :]), flush=True)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    load = [round(x, 1) for x in os.getloadavg()]  # above the core count: other work shared the CPU
    meta = {
        "label": bench.label,
        "repeats": repeats,
        "batch": 2,
        "peak_rss_mb": round(peak_mb),
        "peak_anon_rss_mb": round(anon.peak_mb),
        "load_avg": load,
        "notes": notes,
    }
    return meta, rows


def write(result: dict[str, Any]) -> None:
    """JSON, markdown (one table per model) and the chart, keeping models this run did not time."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "unet_vs_diffusers.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if "models" in old:  # replace only what ran
        ran = set(result["models"])
        result["models"] = {**{k: v for k, v in old["models"].items() if k not in ran}, **result["models"]}
        result["rows"] = [r for r in old["rows"] if r["model"] not in ran] + result["rows"]
    order = [m for m in BENCHES if m in result["models"]]
    result["models"] = {m: result["models"][m] for m in order}
    result["rows"].sort(key=lambda r: order.index(r["model"]))
    path.write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "unet_vs_diffusers.md").write_text(markdown(result))
    charts.draw("unet_vs_diffusers")


def seconds(value: float) -> str:
    """Seconds with three decimals under a second, two above."""
    return f"{value:.3f}" if value < 1 else f"{value:.2f}"


def markdown(result: dict[str, Any]) -> str:
    """One table per model, then its notes."""
    header = ", ".join(f"{k} {v}" for k, v in result["machine"].items())
    lines = [f"# UNet seconds per step vs diffusers, batch 2 (CFG)\n\n{header}\n"]
    for model, meta in result["models"].items():
        lines += [
            f"## {meta['label']}\n",
            f"Median of {meta['repeats']} alternating steps after a warm-up; "
            f"peak RSS of the run {meta['peak_rss_mb']} MB (mapped file pages count once per mapping), "
            f"of it anonymous (the process's own memory) {meta.get('peak_anon_rss_mb', '?')} MB; "
            f"load average at the end {meta.get('load_avg', '?')} on {result['machine']['cores']} cores.\n",
            "| size | variant | s/step | / diffusers | max abs diff vs diffusers |",
            "| ---: | --- | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r['size']} | {r['variant']} | {seconds(r['seconds'])} | {r['ratio']:.2f} | "
            f"{r['max_abs_diff_vs_diffusers']:.1e} |"
            for r in result["rows"]
            if r["model"] == model
        ]
        lines += [""] + [f"- {note}" for note in meta["notes"]] + [""]
    return "\n".join(lines)


def main() -> None:
    """Time every variant of every model at its sizes and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15", help="comma-separated: sd15, sdxl, demo (default sd15)")
    parser.add_argument("--sizes", help="comma-separated image sides for every model (default: each model's own)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per variant and size (SDXL: use 2)")
    parser.add_argument(
        "--sdxl-bf16",
        choices=("auto", "on", "off"),
        default="auto",
        help=f"time SDXL in bf16 (auto: when {SDXL_BF16_NEEDS_GB:.0f} GB are available)",
    )
    parser.add_argument("--chart-only", action="store_true", help="redraw the chart from the JSON, time nothing")
    args = parser.parse_args()
    if args.chart_only:
        print(charts.draw("unet_vs_diffusers"))
        return
    result: dict[str, Any] = {"machine": machine(), "models": {}, "rows": []}
    for name in args.models.split(","):
        sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else BENCHES[name].sizes
        result["models"][name], rows = run_model(name, sizes, args.repeats, args.sdxl_bf16)
        result["rows"] += rows
    write(result)


if __name__ == "__main__":
    main()
