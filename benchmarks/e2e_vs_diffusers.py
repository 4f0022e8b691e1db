"""End-to-end txt2img against diffusers' ``from_single_file`` pipeline: same full-size SD 1.5 file
(random weights), seed, Euler sampler, 20 steps, CFG 7, 256x256; ``--model sdxl --size 512 --steps 10``
does the same for SDXL base (diffusers' ``StableDiffusionXLPipeline``).

Each runner (diffusers; latentrt fp32, with fp16 weight storage, with sequential offload, with both,
bf16, and ``runtime="auto"``; for SDXL diffusers, fp32 and fp16 storage + offload) runs in its own
fresh process (peak RSS never goes down), the file read into the page cache first: wall time of load
+ steps + decode, load-to-first-step time (from the start of loading to the end of the first UNet
step, via each pipeline's step callback), RSS right after loading, and peak RSS (``VmHWM``).
diffusers reads the single file offline, its configs from a local folder written here (``config=``,
``local_files_only``). Results: ``benchmarks/results/e2e_vs_diffusers{,_sdxl}.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import charts
from full_size import CACHE, cached_sd15, cached_sdxl
from gpu_bench import SD15_CONFIG, SDXL_CONFIG

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent / "tests"))

from sd_fixtures import SCHEDULER_CONFIG, write_clip_tokenizer_files  # noqa: E402

RESULTS = ROOT / "results"
CONFIGS: dict[str, dict[str, Any]] = {  # runwayml/stable-diffusion-v1-5 component configs
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        **SD15_CONFIG,
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "sample_size": 512,
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "latent_channels": 4,
        "layers_per_block": 2,
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "projection_dim": 768,
        "vocab_size": 49408,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "scheduler": {"_class_name": "EulerDiscreteScheduler", **SCHEDULER_CONFIG},
}
MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}
PROMPT, NEGATIVE, SEED, STEPS, SIZE, CFG = "a photo of a cat", "", 1, 20, 256, 7.0

PROBE = r"""
import json, sys, time
from latentrt.core.memory import peak_rss_bytes, rss_bytes
kind, path, config, steps, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
options = json.loads(sys.argv[6])
first = []
start = time.perf_counter()
if kind == "diffusers":
    import diffusers, torch
    if options.get("sdxl"):
        pipe = diffusers.StableDiffusionXLPipeline.from_single_file(path, config=config, local_files_only=True)
    else:
        pipe = diffusers.StableDiffusionPipeline.from_single_file(path, config=config, local_files_only=True,
                                                                  safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    loaded = rss_bytes()
    def on_step(p, i, t, kw):
        first.append(time.perf_counter()) if i == 0 else None
        return kw
    pipe("a photo of a cat", num_inference_steps=steps, guidance_scale=7.0, height=size, width=size,
         generator=torch.Generator().manual_seed(1), callback_on_step_end=on_step, output_type="np")
else:
    import latentrt
    options.pop("sdxl", None)
    pipe = latentrt.load(path, progress=False, **options)
    loaded = rss_bytes()
    def on_step(info):
        first.append(time.perf_counter()) if info.i == 0 else None
    from latentrt import GenerationRequest
    pipe.generate(GenerationRequest(prompt="a photo of a cat", steps=steps, cfg_scale=7.0, width=size, height=size,
                                    seed=1, sampler="euler"), callback=on_step)
print(json.dumps({"wall_s": time.perf_counter() - start, "first_step_s": first[0] - start,
                  "loaded_mb": loaded / 2**20, "peak_mb": peak_rss_bytes() / 2**20}))
"""
SDXL_RUNNERS = ("diffusers", "latentrt fp32", "latentrt fp32 + fp16 storage + offload")
"""SDXL (13.9 GB of fp32 weights): bf16 is emulated here and slow, and ONNX Runtime cannot export a
UNet this large in this machine's memory."""
RUNNERS: dict[str, dict[str, Any]] = {  # runner -> latentrt.load options
    "diffusers": {},
    "latentrt fp32": {"dtype": "fp32"},
    "latentrt fp32 + fp16 storage": {"dtype": "fp32", "storage_dtype": "fp16"},
    "latentrt fp32 + offload": {"dtype": "fp32", "offload": "sequential"},
    "latentrt fp32 + fp16 storage + offload": {"dtype": "fp32", "storage_dtype": "fp16", "offload": "sequential"},
    "latentrt bf16": {"dtype": "bf16"},
    "latentrt runtime auto (ONNX Runtime UNet)": {"dtype": "fp32", "runtime": "auto"},
}


def warm_page_cache(path: Path) -> None:
    """Read ``path`` once so every runner starts with the file in the page cache: the ratios then
    compare the libraries, not which runner happened to read the disk first."""
    with path.open("rb") as handle:
        while handle.read(1 << 24):
            pass


BIG_G = {  # stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2/config.json
    **CONFIGS["text_encoder"],
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
SDXL_CONFIGS: dict[str, dict[str, Any]] = {  # stabilityai/stable-diffusion-xl-base-1.0 component configs
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        **SDXL_CONFIG,
    },
    "vae": {**CONFIGS["vae"], "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": False},
    "text_encoder": CONFIGS["text_encoder"],
    "text_encoder_2": BIG_G,
    "scheduler": {
        "_class_name": "EulerDiscreteScheduler",
        **SCHEDULER_CONFIG,
        "timestep_spacing": "leading",
        "steps_offset": 1,
    },
}
SDXL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "force_zeros_for_empty_prompt": True,
}


def diffusers_config_folder(sdxl: bool = False) -> Path:
    """A local SD 1.5 (or SDXL base) diffusers folder with configs and tokenizers only, for
    ``from_single_file(config=)``; SDXL's second tokenizer pads with ``!`` as the published one does."""
    folder = CACHE / ("sdxl-diffusers-config" if sdxl else "sd15-diffusers-config")
    for name, config in (SDXL_CONFIGS if sdxl else CONFIGS).items():
        target = folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(config, indent=2))
    (folder / "model_index.json").write_text(json.dumps(SDXL_INDEX if sdxl else MODEL_INDEX, indent=2))
    for tokenizer, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!"))[: 2 if sdxl else 1]:
        write_clip_tokenizer_files(folder / tokenizer)
        tokens = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": pad}
        tokenizer_config = {"model_max_length": 77, "unk_token": "<|endoftext|>", **tokens}
        (folder / tokenizer / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def run(kind: str, path: Path, config: Path, steps: int, size: int, sdxl: bool = False) -> dict[str, Any]:
    """One runner in a fresh process, the file in the page cache: wall time, load-to-first-step, RSS
    after loading and peak RSS. A runner that exports on first use (``runtime auto``) runs once before,
    so the measured run loads its cached engine, as every later run would."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    options = {**RUNNERS[kind], **({"sdxl": True} if sdxl else {})}
    args = [sys.executable, "-c", PROBE, kind, str(path), str(config), str(steps), str(size), json.dumps(options)]
    for attempt in range(2 if "runtime" in options else 1):
        warm_page_cache(path)
        out = subprocess.run(args if attempt or "runtime" not in options else [*args[:6], "1", *args[7:]],
                             capture_output=True, text=True, env=env)  # fmt: skip
        if out.returncode:
            raise SystemExit(f"{kind} failed:\n{out.stderr[-3000:]}")
    return {"runner": kind, **json.loads(out.stdout.strip().splitlines()[-1])}


def main() -> None:
    """Run diffusers and the latentrt runners and write the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--model", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument("--runners", help="comma-separated, from: " + ", ".join(RUNNERS))
    args = parser.parse_args()
    sdxl = args.model == "sdxl"
    chosen = args.runners.split(",") if args.runners else list(SDXL_RUNNERS if sdxl else RUNNERS)
    kinds = ["diffusers", *(k for k in chosen if k != "diffusers")]
    unknown = [k for k in kinds if k not in RUNNERS]
    if unknown:
        raise SystemExit(f"unknown runners {unknown}; choose from {list(RUNNERS)}")
    path, config = (cached_sdxl() if sdxl else cached_sd15()), diffusers_config_folder(sdxl)
    rows = []
    for kind in kinds:
        rows.append(run(kind, path, config, args.steps, args.size, sdxl))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for row in rows:
        row.update({f"{k}_ratio": row[k] / base[k] for k in ("wall_s", "first_step_s", "loaded_mb", "peak_mb")})
    name = "e2e_vs_diffusers_sdxl" if sdxl else "e2e_vs_diffusers"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [
        "| runner | wall s (ratio) | load to first step s (ratio) | RSS after load MB (ratio) | peak RSS MB (ratio) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['runner']} | {r['wall_s']:.1f} ({r['wall_s_ratio']:.2f}) | {r['first_step_s']:.1f} "
        f"({r['first_step_s_ratio']:.2f}) | {r['loaded_mb']:.0f} ({r['loaded_mb_ratio']:.2f}) "
        f"| {r['peak_mb']:.0f} ({r['peak_mb_ratio']:.2f}) |"
        for r in rows
    ]
    title = f"{'SDXL' if sdxl else 'SD 1.5'} txt2img, {args.size}x{args.size}, {args.steps} steps, euler, CFG 7, seed 1"
    (RESULTS / f"{name}.md").write_text(f"{title}\n\n" + "\n".join(lines) + "\n")
    charts.draw(name)


if __name__ == "__main__":
    main()
