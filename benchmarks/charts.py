"""Bar charts of the benchmark results: one PNG per ``results/<name>.json``, drawn from the JSON alone.

Every benchmark script writes its JSON, then calls :func:`draw` with its name; how a result becomes
panels of bars lives here, one small function per benchmark (:data:`PANELS`), so the slow runs never
need repeating to redraw. ``python benchmarks/charts.py [name ...]`` redraws every chart (or those
named) from ``benchmarks/results/*.json``.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
REFERENCE_COLOR, BAR_COLOR = "#999999", "#3377aa"


@dataclass(frozen=True)
class Panel:
    """One axes of bars: ``labels[i]`` has height ``values[i]``; reference bars (the baseline a
    ratio divides by) are grey, and ``lines`` draws dashed horizontal lines (1.0 for ratios)."""

    title: str
    ylabel: str
    labels: Sequence[str]
    values: Sequence[float]
    reference: Sequence[bool] = ()
    lines: Sequence[float] = ()
    fmt: str = "{:.2f}"
    log: bool = False
    notes: Sequence[str] = field(default_factory=list)


def bar_chart(path: Path, title: str, panels: Sequence[Panel]) -> Path:
    """Draw ``panels`` stacked top to bottom into ``path`` (PNG), each bar labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widest = max(len(p.values) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7.0, 0.9 * widest + 2), 3.4 * len(panels)), squeeze=False)
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        reference = list(panel.reference) or [False] * len(panel.values)
        colors = [REFERENCE_COLOR if r else BAR_COLOR for r in reference]
        bars = ax.bar(range(len(panel.values)), panel.values, color=colors)
        ax.bar_label(bars, labels=[panel.fmt.format(v) for v in panel.values], fontsize=7)
        for y in panel.lines:
            ax.axhline(y, color="#444444", linestyle="--", linewidth=0.8)
        crowded = len(panel.labels) > 10
        labels = panel.labels if crowded else [wrap(label) for label in panel.labels]
        ax.set_xticks(
            range(len(labels)), labels, fontsize=7, rotation=35 if crowded else 0, ha="right" if crowded else "center"
        )
        ax.set_ylabel(panel.ylabel, fontsize=8)
        ax.set_title(panel.title, fontsize=9)
        if panel.log:
            ax.set_yscale("log")
        ax.margins(y=0.15)
        if panel.notes:
            ax.text(0.01, 0.97, "\n".join(panel.notes), transform=ax.transAxes, va="top", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def wrap(label: str, width: int = 18) -> str:
    """``label`` with each of its lines wrapped at ``width`` characters, so neighbours do not overlap."""
    return "\n".join(textwrap.fill(line, width) for line in label.split("\n"))


# --- one function per benchmark: its JSON -> (title, panels) -------------------------------------


def unet_vs_diffusers(result: dict[str, Any]) -> tuple[str, list[Panel]]:
    """One panel per model: each variant's seconds per step as a ratio to diffusers at that size."""
    info = result["machine"]
    panels = []
    for model, meta in result["models"].items():
        rows = [r for r in result["rows"] if r["model"] == model]
        panels.append(
            Panel(
                title=meta["label"],
                ylabel="s/step / diffusers (lower: faster)",
                labels=[f"{r['variant'].removeprefix('latentrt ')}\n{r['size']}px, {r['seconds']:.3g} s" for r in rows],
                values=[r["ratio"] for r in rows],
                reference=[r["variant"].startswith("diffusers") for r in rows],
                lines=[1.0],
            )
        )
    title = f"UNet step, batch 2, {info['cpu']}, {info['cores']} threads\ngrey: diffusers eager fp32, blue: latentrt"
    return title, panels


def onnx_vs_torch(result: dict[str, Any]) -> tuple[str, list[Panel]]:
    """ONNX Runtime settings as ratios to torch eager, per size."""
    rows = result["rows"]
    panel = Panel(
        title="ONNX Runtime s/step ratio to torch eager (same pairs; lower is faster)",
        ylabel="ratio to eager",
        labels=[f"{r['runtime'].removeprefix('ort ')}\n{r['size']}px" for r in rows],
        values=[r["ratio"] for r in rows],
        lines=[1.0],
    )
    return f"{result['model']}, batch {result['batch']}, {result['threads']} threads", [panel]


def e2e_vs_diffusers_sdxl(rows: list[dict[str, Any]]) -> tuple[str, list[Panel]]:
    """The SDXL end-to-end run: the same panels as SD 1.5's."""
    return "SDXL txt2img 512x512, 10 steps, CFG 7 (random weights)", e2e_vs_diffusers(rows)[1]


def e2e_vs_diffusers(rows: list[dict[str, Any]]) -> tuple[str, list[Panel]]:
    """Wall time, time to first step and peak RSS per runner."""
    labels = [r["runner"] for r in rows]
    reference = [r["runner"] == "diffusers" for r in rows]
    metrics = (
        ("wall_s", "wall s", "{:.0f}"),
        ("first_step_s", "load to first step s", "{:.1f}"),
        ("loaded_mb", "RSS after load MB", "{:.0f}"),
        ("peak_mb", "peak RSS MB", "{:.0f}"),
    )
    panels = [
        Panel(name, name, labels, [r.get(key, 0.0) for r in rows], reference, fmt=fmt) for key, name, fmt in metrics
    ]
    return "SD 1.5 txt2img 256x256, 20 steps, CFG 7 (random weights)", panels


def estimate_accuracy(rows: list[dict[str, Any]]) -> tuple[str, list[Panel]]:
    """Estimate error per case, with the +-15% target."""
    labels = [
        f"{Path(r['model']).stem[:12]}\n{r['dtype']} {r['size']}px b{r['batch']}"
        + (f"\n{r['options'].replace('--', '')}" if r.get("options") else "")
        for r in rows
    ]
    panel = Panel(
        "(predicted - measured) / measured peak RSS",
        "error %",
        labels,
        [100 * r["error"] for r in rows],
        lines=[-15.0, 15.0],
        fmt="{:+.1f}",
    )
    return "latentrt estimate vs measured peak RSS", [panel]


def load_memory(rows: list[dict[str, Any]]) -> tuple[str, list[Panel]]:
    """Peak RSS growth and load seconds per load dtype."""
    labels = [r["dtype"] for r in rows]
    return "SD 1.5 single-file load (fp32 file)", [
        Panel("peak RSS growth while loading", "MB", labels, [r["peak_mb"] - r["base_mb"] for r in rows], fmt="{:.0f}"),
        Panel("load time", "s", labels, [r["load_s"] for r in rows], fmt="{:.1f}"),
    ]


def sampler_overhead(result: dict[str, Any]) -> tuple[str, list[Panel]]:
    """ms/step of every sampler (log scale), and the ratio to k-diffusion where it has the sampler."""
    rows = result["rows"]
    paired = [r for r in rows if r.get("ratio_vs_kdiffusion") is not None]
    return "Sampler overhead per step, zero-cost denoiser", [
        Panel(
            "latentrt ms/step",
            "ms/step",
            [r["sampler"] for r in rows],
            [r["ms_per_step"] for r in rows],
            fmt="{:.2f}",
            log=True,
        ),
        Panel(
            "ratio to k-diffusion (lower is faster)",
            "ratio",
            [r["sampler"] for r in paired],
            [r["ratio_vs_kdiffusion"] for r in paired],
            lines=[1.0],
        ),
    ]


def service_throughput(result: dict[str, Any]) -> tuple[str, list[Panel]]:
    """Images per second with batching off and on, per concurrency."""
    rows = result["rows"]
    labels = [f"batching {'on' if r['batching'] else 'off'}\nconcurrency {r['concurrency']}" for r in rows]
    panel = Panel(
        "throughput", "images/s", labels, [r["images_per_s"] for r in rows], [not r["batching"] for r in rows]
    )
    return f"GenerationService, demo model {result['setup']['size']}px, {result['setup']['steps']} steps", [panel]


def ray_throughput(result: dict[str, Any]) -> tuple[str, list[Panel]]:
    """Throughput per setup and path, and per-request latency per path."""
    rows, overhead = result["throughput"], result["overhead"]
    return "Ray Serve scale-out, demo model", [
        Panel(
            "throughput (median run)",
            "images/s",
            [f"{r['setup']}\n{r['path']}" for r in rows],
            [r["images_per_s"] for r in rows],
            ["Ray" not in r["setup"] for r in rows],
        ),
        Panel(
            "one 1-step request at a time",
            "median ms",
            [r["path"] for r in overhead],
            [r["median_ms"] for r in overhead],
            fmt="{:.0f}",
        ),
    ]


PANELS: dict[str, Callable[[Any], tuple[str, list[Panel]]]] = {
    "unet_vs_diffusers": unet_vs_diffusers,
    "onnx_vs_torch": onnx_vs_torch,
    "e2e_vs_diffusers": e2e_vs_diffusers,
    "e2e_vs_diffusers_sdxl": e2e_vs_diffusers_sdxl,
    "estimate_accuracy": estimate_accuracy,
    "load_memory": load_memory,
    "sampler_overhead": sampler_overhead,
    "service_throughput": service_throughput,
    "ray_throughput": ray_throughput,
}


def draw(name: str, results: Path = RESULTS) -> Path:
    """Redraw ``results/<name>.png`` from ``results/<name>.json``."""
    title, panels = PANELS[name](json.loads((results / f"{name}.json").read_text(encoding="utf-8")))
    return bar_chart(results / f"{name}.png", title, panels)


def main() -> None:
    """Redraw the charts of the named results (default: every result with a chart function)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"results to redraw (default: all of {', '.join(PANELS)})")
    args = parser.parse_args()
    for name in args.names or [n for n in PANELS if (RESULTS / f"{n}.json").exists()]:
        print(draw(name))


if __name__ == "__main__":
    main()
