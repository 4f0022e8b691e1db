"""``latentrt estimate``: sizes, the activation tracer, architectures read from headers, and the
prediction against the peak resident set of a real generation in a fresh process.

Independent references: FLOPs from ``torch.utils.flop_counter.FlopCounterMode``; parameter counts
from the loaded modules (or, for the SD 1.5 reference shapes, the published counts); live bytes of
a hand-written op sequence; peak memory (``VmHWM``) from ``tools/measure_peak.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sd_fixtures import tiny_sd1
from torch.utils.flop_counter import FlopCounterMode

import latentrt
from latentrt.cli import main
from latentrt.core.errors import InvalidRequest
from latentrt.core.memory import format_bytes, parse_bytes, trace
from latentrt.plugins.stable_diffusion.estimate import REFERENCE_FLOPS, Settings, architecture, estimate
from latentrt.plugins.stable_diffusion.unet import UNet

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


@pytest.mark.parametrize(
    ("text", "size"),
    [("4GB", 4 * 2**30), ("4g", 4 * 2**30), ("512MiB", 512 * MB), ("1.5 GB", 3 * 2**29), ("1000", 1000)],
)
def test_parse_bytes_reads_binary_units(text: str, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize("text", ["", "four GB", "4XB", "-1GB"])
def test_parse_bytes_rejects_what_is_not_a_size(text: str) -> None:
    with pytest.raises(InvalidRequest, match="write it like 4GB"):
        parse_bytes(text)


def test_format_bytes() -> None:
    assert format_bytes(3 * 2**30) == "3.00 GB"
    assert format_bytes(512 * MB) == "512 MB"


def test_trace_counts_each_live_storage_once_and_frees_it_with_its_last_tensor() -> None:
    """Four 1 MiB results, at most three alive at once; a view adds nothing."""
    x = torch.empty(MB // 4, device="meta")

    def chain() -> None:
        a = x * 2  # 1 MiB live
        view = a[: MB // 8]  # a view of a: no new storage
        b = a + view.sum()  # 2 MiB (sum is 4 bytes)
        del a, view
        c = b * 3  # b, c: 2 MiB
        d = c + b  # b, c, d: 3 MiB
        del b, c, d

    result = trace(chain)
    assert MB * 3 <= result.peak_bytes < MB * 3 + 64


def test_trace_flops_match_torch_flop_counter_on_the_demo_unet() -> None:
    """Our count (attention kept fused) equals FlopCounterMode's, which counts attention as the
    math path's two batched matmuls (on CPU tensors it would miss the fused CPU kernel)."""
    config = latentrt.load("demo", progress=False).model.denoiser.backbone.unet.config  # type: ignore[attr-defined]
    with torch.device("meta"):
        unet = UNet(config)
        inputs = (torch.empty(2, 4, 16, 16), torch.empty(2), torch.empty(2, 77, 128))
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        unet(*inputs)
    assert trace(lambda: unet(*inputs)).flops == counter.get_total_flops()


def test_architecture_from_the_header_matches_the_loaded_demo_model() -> None:
    model = latentrt.load("demo", progress=False).model
    arch = architecture("demo")
    assert arch.family == "demo"
    assert arch.unet == model.denoiser.backbone.unet.config  # type: ignore[attr-defined]
    assert arch.vae.ch_mult == model.vae.config.ch_mult  # type: ignore[attr-defined]
    counted = {
        "unet": model.denoiser.backbone.unet,  # type: ignore[attr-defined]
        "vae": model.vae,
        "text": model.text_encoder.model,  # type: ignore[attr-defined]
    }
    for name, module in counted.items():
        assert arch.parameters[name] == sum(p.numel() for p in module.parameters()), name  # type: ignore[attr-defined]


def test_sd1_reference_has_the_published_parameter_counts() -> None:
    """SD 1.5: UNet 859,520,964; VAE 83,653,863; CLIP ViT-L/14 text 123,060,480 (model cards)."""
    arch = architecture("sd1")
    assert dict(arch.parameters) == {"unet": 859_520_964, "vae": 83_653_863, "text": 123_060_480}


def test_reference_flops_is_sd15_at_512_with_cfg_and_20_steps() -> None:
    result = estimate(architecture("sd1"), Settings(512, 512, 1, cfg=True, steps=20))
    assert result.total_flops == pytest.approx(REFERENCE_FLOPS, rel=1e-3)


def test_options_that_save_memory_lower_the_estimate() -> None:
    arch = architecture("sd1")
    plain = estimate(arch, Settings(1024, 1024))
    assert estimate(arch, Settings(1024, 1024, dtype=torch.bfloat16)).peak < plain.peak
    assert estimate(arch, Settings(1024, 1024, vae_tiling=True)).stages["decode"] < plain.stages["decode"]
    assert estimate(arch, Settings(1024, 1024, batch=2)).peak > plain.peak


def test_storage_dtype_holds_the_weights_in_16_bits_plus_one_upcast_layer() -> None:
    arch = architecture("sd1")
    plain, stored = estimate(arch, Settings(512, 512)), estimate(arch, Settings(512, 512, storage=torch.float16))
    assert stored.weights["unet"] == 2 * 859_520_964 == plain.weights["unet"] // 2
    # the largest layer upcast while it runs: SD 1.5's up-block 3x3 convolution from the 2560 concatenated
    # channels to 1280 (larger than the 1280 -> 2 x 5120 GEGLU projection)
    upcast = (stored.stages["unet"] - stored.weights["text"] - stored.weights["unet"] - stored.weights["vae"]) - (
        plain.stages["unet"] - sum(plain.weights.values())
    )
    assert upcast == 2560 * 1280 * 3 * 3 * 4


def test_offload_holds_one_network_per_stage() -> None:
    arch = architecture("sd1")
    plain, offloaded = estimate(arch, Settings(512, 512)), estimate(arch, Settings(512, 512, offload=True))
    weights = plain.weights
    assert offloaded.stages["load"] == max(weights.values())
    for stage, own in (("text", "text"), ("unet", "unet"), ("decode", "vae")):
        others = sum(size for name, size in weights.items() if name != own)
        assert offloaded.stages[stage] == plain.stages[stage] - others
    assert offloaded.peak < plain.peak


def test_cli_estimates_the_memory_options(capsys: pytest.CaptureFixture[str]) -> None:
    common = ["estimate", "sd1", "--width", "256", "--height", "256", "--json"]
    assert main(common) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*common, "--storage-dtype", "fp16", "--offload", "sequential"]) == 0
    both = json.loads(capsys.readouterr().out)
    assert both["weights"]["unet"] * 2 == plain["weights"]["unet"] and both["peak_bytes"] < plain["peak_bytes"] / 1.8


def test_size_not_a_multiple_of_the_latent_grid_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="multiple of 64"):
        estimate(architecture("sd1"), Settings(500, 512))


def test_cli_budget_sets_the_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "demo", "--width", "64", "--height", "64", "--budget", "64GB"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("fits: predicted peak")
    assert main(["estimate", "demo", "--width", "64", "--height", "64", "--budget", "100MB"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].startswith("does not fit: predicted peak")
    assert main(["estimate", "demo", "--budget", "lots"]) == 2
    assert "write it like 4GB" in capsys.readouterr().err


def _fresh(args: list[str]) -> dict[str, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    reading: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return reading


def check_against_a_real_run(model: str, width: int, batch: int, dtype: str = "fp32", *options: str) -> None:
    """Estimate (``latentrt estimate`` in a fresh process, its own baseline) within 15% of the measured peak."""
    common = ["--width", str(width), "--height", str(width), "--batch", str(batch), "--dtype", dtype, *options]
    predicted = _fresh([sys.executable, "-m", "latentrt.cli", "estimate", model, *common, "--json"])
    measured = _fresh([sys.executable, "tools/measure_peak.py", model, *common])
    assert predicted["peak_bytes"] == pytest.approx(measured["peak"], rel=0.15), (predicted, measured)


def test_estimate_is_within_15_percent_of_a_real_demo_run_at_512() -> None:
    """512x512 makes the VAE decode (about 300 MB) stand out over the ~380 MB interpreter baseline."""
    check_against_a_real_run("demo", 512, 1)


@pytest.mark.slow
@pytest.mark.parametrize(("width", "batch", "dtype"), [(64, 1, "fp32"), (256, 2, "fp32"), (512, 2, "bf16")])
def test_estimate_is_within_15_percent_of_real_demo_runs(width: int, batch: int, dtype: str) -> None:
    check_against_a_real_run("demo", width, batch, dtype)


@pytest.mark.slow
def test_estimate_is_within_15_percent_of_a_real_demo_run_with_the_memory_options() -> None:
    check_against_a_real_run("demo", 512, 2, "fp32", "--storage-dtype", "fp16", "--offload", "sequential")


@pytest.mark.slow
def test_estimate_is_within_15_percent_of_a_real_tiny_sd1_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The tiny fixture's weights are mostly its 150 MB CLIP token table: the load stage dominates."""
    check_against_a_real_run(str(tiny_sd1(tmp_path_factory).single_file), 128, 1)
