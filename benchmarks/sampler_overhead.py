"""Sampler overhead per step, with a zero-cost denoiser, against k-diffusion in the same run.

The denoiser returns a precomputed tensor, so what is timed is the sampler's own
arithmetic and noise generation on an SD latent (1 x 4 x 64 x 64, i.e. 512x512 pixels),
20 Karras steps. Reported as milliseconds per step and as the ratio to k-diffusion's
implementation of the same method where it has one (ratio < 1: latentrt is faster).
Results go to ``benchmarks/results/sampler_overhead.{json,md}``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import charts
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import latentrt
from latentrt.core.model_sampling import sd_model_sampling
from latentrt.core.noise import GaussianNoise, noise_for_sampler
from latentrt.core.registry import SamplerSpec

STEPS, REPEATS = 20, 5
SHAPE = (1, 4, 64, 64)
KDIFF_NAMES = {
    "euler": "sample_euler",
    "euler_ancestral": "sample_euler_ancestral",
    "heun": "sample_heun",
    "dpm_2": "sample_dpm_2",
    "dpm_2_ancestral": "sample_dpm_2_ancestral",
    "lms": "sample_lms",
    "dpmpp_2s_ancestral": "sample_dpmpp_2s_ancestral",
    "dpmpp_2m": "sample_dpmpp_2m",
    "dpmpp_sde": "sample_dpmpp_sde",
    "dpmpp_2m_sde": "sample_dpmpp_2m_sde",
    "dpmpp_3m_sde": "sample_dpmpp_3m_sde",
}


class ZeroCostDenoiser:
    """Returns the same tensor every call: isolates the sampler's own cost."""

    def __init__(self, like: torch.Tensor) -> None:
        self.out = torch.zeros_like(like)
        self.model_sampling = sd_model_sampling()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None, **_: Any) -> torch.Tensor:
        return self.out


def run_ours(spec: SamplerSpec, denoiser: ZeroCostDenoiser, x: torch.Tensor, sigmas: torch.Tensor) -> None:
    spec.sample(denoiser, x, sigmas, noise=noise_for_sampler(spec.noise, x, sigmas, [0]))


def best_of(fn: Any) -> float:
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    registry = latentrt.registry()
    sigmas = registry.scheduler("karras").sigmas(STEPS, sd_model_sampling())
    x = torch.randn(SHAPE) * sigmas[0]
    denoiser = ZeroCostDenoiser(x)
    try:
        from kdiffusion_ref import load_kdiffusion_sampling

        kdiff = load_kdiffusion_sampling()
    except Exception:  # the reference is optional for the benchmark
        kdiff = None
    rows = []
    for name, spec in registry.samplers.items():
        ours = best_of(partial(run_ours, spec, denoiser, x, sigmas))
        ref = None
        if kdiff is not None and name in KDIFF_NAMES:
            kwargs: dict[str, Any] = {"disable": True}
            if spec.noise == "gaussian":
                kwargs["noise_sampler"] = GaussianNoise.from_seeds(x, [0])
            ref = best_of(partial(getattr(kdiff, KDIFF_NAMES[name]), denoiser, x, sigmas, **kwargs))
        rows.append(
            {
                "sampler": name,
                "ms_per_step": 1000 * ours / STEPS,
                "kdiffusion_ms_per_step": None if ref is None else 1000 * ref / STEPS,
                "ratio_vs_kdiffusion": None if ref is None else ours / ref,
            }
        )
        print(f"{name:<24} {rows[-1]['ms_per_step']:8.3f} ms/step", flush=True)
    write_results(rows)


def write_results(rows: list[dict[str, Any]]) -> None:
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "latentrt": latentrt.__version__,
    }
    (out / "sampler_overhead.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    lines = [
        f"Sampler overhead, latent {SHAPE}, {STEPS} steps, zero-cost denoiser, best of {REPEATS}; {machine}",
        "",
        "| sampler | ms/step | k-diffusion ms/step | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        ref = "" if r["kdiffusion_ms_per_step"] is None else f"{r['kdiffusion_ms_per_step']:.3f}"
        ratio = "" if r["ratio_vs_kdiffusion"] is None else f"{r['ratio_vs_kdiffusion']:.2f}"
        lines.append(f"| {r['sampler']} | {r['ms_per_step']:.3f} | {ref} | {ratio} |")
    (out / "sampler_overhead.md").write_text("\n".join(lines) + "\n")
    charts.draw("sampler_overhead")
    print(f"wrote {out / 'sampler_overhead.md'}")


if __name__ == "__main__":
    main()
