"""Seconds per UNet step, torch eager vs ONNX Runtime (CPU), full-size SD 1.5 UNet with random weights.

Batch 2 (one image with classifier-free guidance), 256x256 and 512x512 pixels, 77 context tokens,
float32, every core for both (``torch.get_num_threads()`` threads). The UNet is exported once with
latentrt's ONNX exporter (opset 18; over 2 GB, so its weights sit in ``model.onnx.data``), then run
in the same process at several graph-optimization settings, so what they add is visible:

* ``ort none``: ``model.onnx``, session optimizations disabled;
* ``ort basic`` / ``ort extended`` / ``ort all``: ``model.onnx`` optimized when the session loads;
* ``ort offline+all``: ``model.optimized.onnx`` (extended, optimized offline at export) with the
  session at ``all`` on top: what ``latentrt generate --runtime onnxruntime`` runs.

Each setting is timed against torch eager in alternation (one eager step, one ONNX Runtime step,
``--repeats`` times, after one warm-up step of each), so a busy machine slows both sides alike; the
ratio is median(ONNX Runtime) / median(eager) over those pairs (below 1: ONNX Runtime is faster). Results go to
``benchmarks/results/onnx_vs_torch.{json,md}``. Needs about 20 GB of memory and a few GB of disk
(``benchmarks/.cache/onnx_vs_torch``); the export takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import charts
import torch

from latentrt.core.protocols import ExportSpec, RuntimeComponent
from latentrt.exporters.onnx import OnnxExporter
from latentrt.exporters.ort import ort_session
from latentrt.plugins.stable_diffusion.export import unet_export_spec
from latentrt.plugins.stable_diffusion.families import UNetBackbone
from latentrt.plugins.stable_diffusion.runtime_components import UNetExport
from latentrt.plugins.stable_diffusion.unet import SD1_UNET, UNet

ROOT = Path(__file__).resolve().parent
BATCH = 2
CACHE = ROOT / ".cache" / "onnx_vs_torch"
RESULTS = ROOT / "results"
ORT_SETTINGS = (  # (label, file, online level)
    ("ort none", "model.onnx", "disabled"),
    ("ort basic", "model.onnx", "basic"),
    ("ort extended", "model.onnx", "extended"),
    ("ort all", "model.onnx", "all"),
    ("ort offline+all", "model.optimized.onnx", "all"),
)


def random_unet(seed: int = 0) -> UNet:
    """The SD 1.5 UNet (859,520,964 parameters) with N(0, 0.02^2) weights, as ``full_size.py`` writes them."""
    with torch.device("meta"):
        unet = UNet(SD1_UNET)
    unet = unet.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)
    return unet.eval()


def full_size_unet_component(sizes: tuple[int, int, int] = (256, 512, 512), max_batch: int = 1) -> RuntimeComponent:
    """The random SD 1.5 UNet as a runtime component for ``sizes`` (pixels) and ``max_batch`` images
    (UNet batch up to ``2 * max_batch``), ready for :class:`OnnxExporter`."""
    unet = random_unet()
    batch = (1, min(2, 2 * max_batch), 2 * max_batch)
    spec = replace(unet_export_spec(SD1_UNET), shape_range={"batch": batch, "height": sizes, "width": sizes})
    return RuntimeComponent("unet", UNetExport(UNetBackbone(unet), unet, spec), spec, lambda compiled: None)


def paired_seconds(first: Callable[[], Any], second: Callable[[], Any], repeats: int) -> tuple[float, float]:
    """Median wall times of ``first`` and ``second`` called in alternation ``repeats`` times, after one
    warm-up call of each (alternating keeps background load from favouring either side)."""
    first()
    second()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for call, bucket in ((first, times[0]), (second, times[1])):
            start = time.perf_counter()
            call()
            bucket.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def ort_step(path: Path, level: str, threads: int, arrays: dict[str, Any]) -> Callable[[], Any]:
    """One UNet step on an ONNX Runtime CPU session over ``path`` at optimization ``level``."""
    session = ort_session(path, ["CPUExecutionProvider"], level=level, threads=threads)
    return lambda: session.run(None, arrays)


def feeds_for(spec: ExportSpec, size: int) -> dict[str, torch.Tensor]:
    """Sample UNet inputs at ``size`` x ``size`` pixels and batch 2."""
    assert spec.sample_inputs is not None
    return spec.sample_inputs({"batch": BATCH, "height": size, "width": size})


def run(sizes: list[int], repeats: int, keep: bool) -> dict[str, Any]:
    """Export, then time torch and every ONNX Runtime setting at each size."""
    threads = torch.get_num_threads()
    component = full_size_unet_component(sizes=(min(sizes), max(sizes), max(sizes)))
    folder = CACHE / "unet"
    started = time.perf_counter()
    artifact = OnnxExporter(threads=threads).export(component.module, component.spec, folder, "fp32")
    export_seconds = time.perf_counter() - started
    rows: list[dict[str, Any]] = []
    for size in sizes:
        feeds = feeds_for(component.spec, size)
        args = [feeds[name] for name in component.spec.input_names]
        arrays = {name: tensor.numpy() for name, tensor in feeds.items()}

        def eager() -> Any:
            with torch.inference_mode():
                return component.module(*args)  # noqa: B023

        for label, file, level in ORT_SETTINGS:
            torch_s, ort_s = paired_seconds(eager, ort_step(folder / file, level, threads, arrays), repeats)
            rows.append({"size": size, "runtime": label, "seconds_per_step": ort_s, "eager_seconds_per_step": torch_s,
                         "ratio": ort_s / torch_s})  # fmt: skip
            print(f"{size}x{size} {label:<16} {ort_s:.3f} s/step vs eager {torch_s:.3f} s: {ort_s / torch_s:.2f}x")
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    worst = max(o["max_abs_diff"] for r in artifact.manifest["validation"]["runs"] for o in r["outputs"].values())
    return {
        "benchmark": "onnx_vs_torch",
        "model": "SD 1.5 UNet, random weights, fp32",
        "batch": BATCH,
        "threads": threads,
        "repeats": repeats,
        "export_seconds": round(export_seconds, 1),
        "export_stage_seconds": artifact.manifest["seconds"],
        "max_abs_diff_vs_torch": worst,
        "external_data": artifact.manifest["external_data"],
        "tool_versions": artifact.manifest["tool_versions"],
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "rows": rows,
    }


def write_results(result: dict[str, Any]) -> None:
    """``results/onnx_vs_torch.json`` and a Markdown table."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "onnx_vs_torch.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = [
        "# ONNX Runtime vs torch eager: SD 1.5 UNet (random weights), fp32, CPU",
        "",
        f"Batch {result['batch']}, {result['threads']} threads, medians of {result['repeats']} alternating "
        f"eager/ONNX Runtime steps after a warm-up; export {result['export_seconds']} s; "
        f"max |onnx - torch| {result['max_abs_diff_vs_torch']:.1e}.",
        "",
        "| size | runtime | s/step | torch eager s/step (same pairs) | ratio to eager |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['size']}x{r['size']} | {r['runtime']} | {r['seconds_per_step']:.3f} | "
        f"{r['eager_seconds_per_step']:.3f} | {r['ratio']:.2f} |"
        for r in result["rows"]
    ]
    (RESULTS / "onnx_vs_torch.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    charts.draw("onnx_vs_torch")


def main() -> None:
    """Parse options, run, write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512", help="square sizes in pixels (default 256,512)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per setting (default 5)")
    parser.add_argument("--keep", action="store_true", help=f"keep the exported UNet in {CACHE}")
    args = parser.parse_args()
    write_results(run([int(s) for s in args.sizes.split(",")], args.repeats, args.keep))


if __name__ == "__main__":
    main()
