"""``latentrt generate`` / ``latentrt info`` end to end on a tiny random SD1 checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from sd_fixtures import TinySD, tiny_sd1

from latentrt.cli import main
from latentrt.core.parameters import parse_parameters, read_png_parameters

FAST = ["--steps", "3", "--width", "64", "--height", "64", "--cfg", "5"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinySD:
    return tiny_sd1(tmp_path_factory)


def test_generate_batch_writes_suffixed_pngs_with_parameters(tiny: TinySD, tmp_path: Path) -> None:
    out = tmp_path / "cat.png"
    argv = ["generate", "a cat", "--checkpoint", str(tiny.single_file), *FAST, "--seed", "7", "--batch", "2"]
    assert main([*argv, "--negative", "blurry", "--sampler", "DPM++ 2M", "--output", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat-1.png", "cat-2.png"]
    second = parse_parameters(read_png_parameters(tmp_path / "cat-2.png"))
    assert second.prompt == "a cat"
    assert second.negative_prompt == "blurry"
    assert second.settings["Seed"] == "8"
    assert second.settings["Sampler"] == "DPM++ 2M"
    assert second.settings["Size"] == "64x64"
    assert second.settings["Model"] == tiny.single_file.stem
    assert len(str(second.settings["Model hash"])) == 10


def test_info_prints_the_parameters(tiny: TinySD, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "one.png"
    assert (
        main(["generate", "a dog", "--checkpoint", str(tiny.single_file), *FAST, "--seed", "1", "--output", str(out)])
        == 0
    )
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert capsys.readouterr().out.strip() == read_png_parameters(out)


def test_from_png_regenerates_the_same_image(tiny: TinySD, tmp_path: Path) -> None:
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    argv = ["generate", "(a red:1.2) ball", "--checkpoint", str(tiny.folder), *FAST, "--seed", "42"]
    assert main([*argv, "--sampler", "Euler a", "--scheduler", "karras", "--output", str(first)]) == 0
    assert main(["generate", "--from-png", str(first), "--checkpoint", str(tiny.folder), "--output", str(again)]) == 0
    with Image.open(first) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()
    assert read_png_parameters(first) == read_png_parameters(again)


def test_img2img_from_the_cli(tiny: TinySD, tmp_path: Path) -> None:
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(init)
    out = tmp_path / "out.png"
    argv = ["generate", "a cat", "--checkpoint", str(tiny.single_file), "--steps", "4", "--seed", "3"]
    assert main([*argv, "--init-image", str(init), "--strength", "0.5", "--output", str(out)]) == 0
    assert parse_parameters(read_png_parameters(out)).settings["Denoising strength"] == "0.5"
    with Image.open(out) as image:
        assert image.size == (64, 64)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--width", "60"], "--width must be a multiple of 8, got 60; try 56"),
        (["--sampler", "eulr"], "unknown sampler 'eulr'"),
        (["--mask", "mask.png"], "--mask mask.png: not a readable image"),
        (["--output", "out.jpg"], "--output must end in .png"),
        (["--dtype", "fp16", "--device", "cuda"], "no CUDA GPU"),
        (["--original-size", "64x64"], "original_size only apply to SDXL models"),
        (["--crop", "8,0"], "crop only apply to SDXL models"),
        (["--prompt-2", "a dog"], "prompt_2 / negative_prompt_2 need a model with two text encoders"),
    ],
)
def test_bad_arguments_are_one_line_and_write_nothing(
    tiny: TinySD, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    extra: list[str], message: str,
) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    if "cuda" in extra:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    code = main(["generate", "a cat", "--checkpoint", str(tiny.single_file), "--steps", "2", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert message in err
    assert list(tmp_path.iterdir()) == []


def test_refiner_must_be_a_refiner(tiny: TinySD, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.png"
    argv = ["generate", "a cat", "--checkpoint", str(tiny.single_file), "--refiner", str(tiny.single_file)]
    assert main([*argv, "--steps", "2", "--output", str(out)]) == 2
    assert "is a sd1 model, not a refiner for the sd1 model" in capsys.readouterr().err
    assert not out.exists()


def test_missing_checkpoint_and_png_without_parameters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "a cat", "--checkpoint", str(tmp_path / "nope.safetensors")]) == 2
    assert "nope.safetensors: no such file" in capsys.readouterr().err
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    assert main(["info", str(plain)]) == 2
    assert "has no 'parameters' text" in capsys.readouterr().err
    assert main(["generate", "--from-png", str(plain)]) == 2
    assert "has no 'parameters' text" in capsys.readouterr().err


def test_vae_tiling_flag(tiny: TinySD, tmp_path: Path) -> None:
    """--vae-tiling switches the VAE to tiles; an image within one tile decodes identically."""
    plain, tiled = tmp_path / "plain.png", tmp_path / "tiled.png"
    argv = ["generate", "a cat", "--checkpoint", str(tiny.single_file), *FAST, "--seed", "5"]
    assert main([*argv, "--output", str(plain)]) == 0
    assert main([*argv, "--vae-tiling", "--output", str(tiled)]) == 0
    with Image.open(plain) as a, Image.open(tiled) as b:
        assert a.tobytes() == b.tobytes()
    import latentrt
    import latentrt.cli_generate as cli_generate

    loaded: list[latentrt.Pipeline] = []

    def spy_load(*args: object, **kwargs: object) -> latentrt.Pipeline:
        loaded.append(latentrt.load(*args, **kwargs))  # type: ignore[arg-type]
        return loaded[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli_generate, "load", spy_load)
        assert main([*argv, "--vae-tiling", "--output", str(tmp_path / "spy.png")]) == 0
        assert main([*argv, "--output", str(tmp_path / "plain-spy.png")]) == 0
    assert loaded[0].model.vae.tiling is not None  # type: ignore[attr-defined]
    assert loaded[1].model.vae.tiling is None  # type: ignore[attr-defined]
