"""``tools/train_demo.py`` end to end at a toy size: reproducible, logged, and loadable as a checkpoint."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import latentrt

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "train_demo.py"
TINY = ["--vae-steps", "3", "--vae-full-steps", "1", "--vae-batch", "2", "--latents", "16", "--unet-steps", "3",
        "--unet-batch", "4", "--warmup", "1", "--threads", "1"]  # fmt: skip


def _script() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("train_demo", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_demo"] = module
    spec.loader.exec_module(module)
    return module


def _train(tmp_path: Path, name: str, seed: int) -> tuple[Path, Path]:
    out, log = tmp_path / f"{name}.safetensors", tmp_path / f"{name}.jsonl"
    assert _script().main([*TINY, "--seed", str(seed), "--out", str(out), "--log", str(log)]) == 0
    return out, log


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    folder = tmp_path_factory.mktemp("train")
    return {name: _train(folder, name, seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))}


def test_same_seed_same_weights(runs: dict[str, tuple[Path, Path]]) -> None:
    first, second, other = (load_file(str(runs[name][0])) for name in "abc")
    assert first.keys() == second.keys() == other.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert not all(torch.equal(first[key], other[key]) for key in first)


def test_output_is_a_demo_checkpoint_in_sd1_layout(runs: dict[str, tuple[Path, Path]]) -> None:
    path = runs["a"][0]
    with safe_open(str(path), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    prefixes = {"model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model."}
    assert keys - {"scale_factor"} == {k for k in keys if k.startswith(tuple(prefixes))}
    assert all(any(k.startswith(p) for k in keys) for p in prefixes)
    assert metadata["latentrt.model"] == "demo" and json.loads(metadata["training"])["seed"] == "0"
    pipeline = latentrt.load(path, progress=False)
    assert pipeline.model.family == "demo"
    image = pipeline.generate(latentrt.GenerationRequest(prompt="a red circle", steps=2, seed=0)).images[0]
    assert image.size == (64, 64)


def test_losses_are_logged(runs: dict[str, tuple[Path, Path]]) -> None:
    records = [json.loads(line) for line in runs["a"][1].read_text().splitlines()]
    stages = [r["stage"] for r in records]
    assert stages.count("vae") == 2 and stages.count("unet") == 2  # steps 0 and the last of each stage
    assert "scale" in stages and "vae_report" in stages
    assert all(r["loss"] > 0 for r in records if r["stage"] == "unet")
    scale = next(r["scale_factor"] for r in records if r["stage"] == "scale")
    assert scale == pytest.approx(load_file(str(runs["a"][0]))["scale_factor"].item())
