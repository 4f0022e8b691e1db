"""``latentrt export`` and ``latentrt generate --runtime``: engines written once, reused after."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx_fixtures import TinyEngines, psnr, tiny_sd1_engines
from PIL import Image

from latentrt.cli import main
from latentrt.cli_export import parse_runtime
from latentrt.exporters import read_artifact
from latentrt.exporters.onnx import OnnxExporter

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = ["--min-size", "64", "--max-size", "128", "--max-batch", "2"]  # the shared engines' range (LIMITS)
PSNR_MIN = 40.0  # dB, ONNX Runtime image against the torch one


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyEngines:
    return tiny_sd1_engines(tmp_path_factory)


@pytest.fixture
def no_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything is exported."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("nothing should be exported: the engines are cached")

    monkeypatch.setattr(OnnxExporter, "export", refuse)


def _generate(tiny: TinyEngines, output: Path, *extra: str) -> int:
    command = ["generate", "a photo of a cat", "--checkpoint", str(tiny.model.single_file), "--steps", "3"]
    command += ["--seed", "7", "--width", "96", "--height", "64", "--output", str(output), *extra]
    return main(command)


def test_export_writes_one_folder_per_component(
    tiny: TinyEngines, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "engines"
    command = ["export", "--checkpoint", str(tiny.model.single_file), "--to", "onnx", "--out", str(out)]
    assert main([*command, "--components", "vae_decoder", "--max-size", "96", "--min-size", "64", "--quiet"]) == 0
    printed = capsys.readouterr().out
    (folder,) = out.iterdir()
    assert folder.name.startswith("vae_decoder-fp32-")
    assert f"vae_decoder: {folder} (fp32, max |onnx - torch|" in printed and "exported in" in printed
    manifest = read_artifact(folder).manifest
    assert manifest["shape_range"] == {"batch": [1, 1, 4], "height": [64, 96, 96], "width": [64, 96, 96]}
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "model.onnx", "model.optimized.onnx"]
    assert main([*command, "--components", "vae_decoder", "--max-size", "96", "--min-size", "64", "--quiet"]) == 0
    assert "reused" in capsys.readouterr().out
    assert len(list(out.iterdir())) == 1


@pytest.mark.usefixtures("no_export")
def test_export_into_existing_engines_reuses_them(tiny: TinyEngines, capsys: pytest.CaptureFixture[str]) -> None:
    command = ["export", "--checkpoint", str(tiny.model.single_file), "--out", str(tiny.engines), *SIZES, "--quiet"]
    assert main(command) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["unet", "vae_decoder", "vae_encoder", "text_encoder"]
    assert all(line.endswith("reused)") for line in lines)


@pytest.mark.usefixtures("no_export")
def test_generate_on_onnxruntime_reuses_exported_engines(tiny: TinyEngines, tmp_path: Path) -> None:
    onnx_png, torch_png = tmp_path / "onnx.png", tmp_path / "torch.png"
    assert _generate(tiny, onnx_png, "--runtime", "onnxruntime", "--engines", str(tiny.engines), *SIZES) == 0
    assert _generate(tiny, torch_png) == 0
    with Image.open(onnx_png) as a, Image.open(torch_png) as b:
        got, expected = np.asarray(a), np.asarray(b)
        assert a.text["parameters"] == b.text["parameters"]
    assert expected.std() > 10
    assert psnr(expected, got) >= PSNR_MIN  # measured: identical pixels


@pytest.mark.usefixtures("no_export")
def test_generate_per_component_runtime(tiny: TinyEngines, tmp_path: Path) -> None:
    output = tmp_path / "mixed.png"
    runtime = "unet=onnxruntime,vae=torch"
    assert _generate(tiny, output, "--runtime", runtime, "--engines", str(tiny.engines), *SIZES) == 0
    assert output.is_file()


def test_generate_outside_the_range_is_one_line_error(
    tiny: TinyEngines, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = ["--runtime", "onnxruntime", "--engines", str(tiny.engines), *SIZES, "--batch", "3"]
    assert _generate(tiny, tmp_path / "x.png", *command) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("latentrt: error: text_encoder: batch 6 is outside")
    assert "(batch 1..4)" in error  # the first component to see the doubled batch refuses it


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--to", "openvino"], "unknown exporter 'openvino'"),
        (["--components", "unet,vea"], "no component 'vea' to choose a runtime for"),
    ],
)
def test_export_errors_are_one_line(
    tiny: TinyEngines, tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    command = ["export", "--checkpoint", str(tiny.model.single_file), "--out", str(tmp_path / "e"), *arguments]
    assert main(command) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert not (tmp_path / "e").exists()


def test_export_precision_is_fp32_fp16_or_bf16(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["export", "--checkpoint", "x.safetensors", "--out", str(tmp_path), "--precision", "int8"])
    assert info.value.code == 2
    assert "invalid choice: 'int8'" in capsys.readouterr().err


def test_parse_runtime() -> None:
    assert parse_runtime("onnxruntime") == "onnxruntime"
    assert parse_runtime("unet=onnxruntime, vae=torch") == {"unet": "onnxruntime", "vae": "torch"}
    with pytest.raises(Exception, match="COMPONENT=RUNTIME"):
        parse_runtime("unet=onnxruntime,vae")
