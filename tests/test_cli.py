"""The latentrt command line: plugins listing, demo, version, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from latentrt.cli import main


def test_plugins_json_lists_builtins_with_their_plugin(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert {"latentrt.samplers", "latentrt.schedules"} <= set(listing["plugins"])
    by_name = {(row["kind"], row["name"]): row for row in listing["components"]}
    assert by_name[("sampler", "euler_ancestral")]["label"] == "Euler a"
    assert by_name[("sampler", "euler_ancestral")]["plugin"] == "latentrt.samplers"
    assert by_name[("sampler", "euler")]["options"]["s_churn"] == 0.0
    assert by_name[("scheduler", "karras")]["plugin"] == "latentrt.schedules"


def test_plugins_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "euler_ancestral" in out and '"Euler a"' in out and "[latentrt.samplers]" in out
    assert "model families" in out


def test_demo_writes_a_png(tmp_path: Path) -> None:
    out = tmp_path / "demo.png"
    assert main(["sampler-demo", "--out", str(out), "--samplers", "euler", "Euler a", "--images", "2", "--quiet"]) == 0
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (130 + 2 * 96, 2 * 96)
        assert image.info["parameters"].startswith('latentrt sampler demo\nSteps: 20, Sampler: "euler, Euler a"')
    assert not list(tmp_path.glob(".*.tmp"))


def test_unknown_sampler_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo.png"
    assert main(["sampler-demo", "--out", str(out), "--samplers", "eulr", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("latentrt: error: unknown sampler 'eulr'") and "\n" not in err
    assert "did you mean 'euler'" in err
    assert not out.exists()


def test_non_png_output_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(["sampler-demo", "--out", str(tmp_path / "demo.jpg"), "--samplers", "euler", "--quiet", "--images", "1"])
        == 2
    )
    assert "must be a .png" in capsys.readouterr().err


def test_version_from_a_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "latentrt.cli", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip().startswith("latentrt 0.")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sampler-demo", "--steps", "0"], "argument --steps: must be an integer >= 1, got '0'"),
        (["sampler-demo", "--images", "two"], "argument --images: must be an integer >= 1, got 'two'"),
        (["frob"], "invalid choice: 'frob'"),
        (["generate", "x", "--crop", "8"], "argument --crop: expected two integers like 0,0, got '8'"),
        (["generate", "x", "--original-size", "64"], "argument --original-size: expected two integers"),
    ],
)
def test_usage_errors_are_one_line(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("latentrt: error: ")
    assert message in err
