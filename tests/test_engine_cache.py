"""The engine cache: reuse without exporting, rebuild what is damaged or mismatched, keys follow the weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from onnx_fixtures import compile_request, conv_component, conv_spec

from latentrt.core.errors import ExportError
from latentrt.exporters import MANIFEST
from latentrt.exporters.cache import EngineCache, EngineKey, cache_root, content_sha256, engines_dir
from latentrt.exporters.onnx import OnnxExporter
from latentrt.runtimes.onnxruntime import OnnxRuntime, OrtModule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def exports(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the components exported during the test (every call of ``OnnxExporter.export``)."""
    calls: list[str] = []
    real = OnnxExporter.export

    def counting(self: OnnxExporter, backbone: Any, spec: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(spec.name)
        return real(self, backbone, spec, *args, **kwargs)

    monkeypatch.setattr(OnnxExporter, "export", counting)
    return calls


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoint.safetensors"
    path.write_bytes(b"pretend checkpoint bytes " * 100)
    return path


def _compile(weights: Path, engines: Path, **component: Any) -> OrtModule:
    return OnnxRuntime().compile(compile_request(conv_component(**component), weights, engines))


def _model_file(module: OrtModule) -> Path:
    return module.artifact.directory / "model.optimized.onnx"


def _check_runs(module: OrtModule) -> None:
    """The module runs and matches the torch conv it was exported from (float32: within 1e-5)."""
    latent = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = conv_component().module(latent)
    assert float((module({"latent": latent})["images"] - expected).abs().max()) <= 1e-5


def test_second_compile_does_no_export(tmp_path: Path, weights: Path, exports: list[str]) -> None:
    first = _compile(weights, tmp_path / "engines")
    second = _compile(weights, tmp_path / "engines")
    assert exports == ["vae_decoder"]
    assert first.artifact.directory == second.artifact.directory
    assert [p.name for p in (tmp_path / "engines").iterdir()] == [first.artifact.directory.name]
    _check_runs(second)


def test_truncated_file_is_rebuilt(tmp_path: Path, weights: Path, exports: list[str]) -> None:
    module = _compile(weights, tmp_path / "engines")
    path = _model_file(module)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    artifact, reason = EngineCache(tmp_path / "engines").check(_key(module))
    assert artifact is None and "truncated" in reason
    rebuilt = _compile(weights, tmp_path / "engines")
    assert exports == ["vae_decoder", "vae_decoder"]
    assert rebuilt.artifact.directory == module.artifact.directory
    _check_runs(rebuilt)


def test_corrupted_same_size_file_is_rebuilt(tmp_path: Path, weights: Path, exports: list[str]) -> None:
    module = _compile(weights, tmp_path / "engines")
    path = _model_file(module)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights
    path.write_bytes(bytes(data))
    _, reason = EngineCache(tmp_path / "engines").check(_key(module))
    assert "does not match its SHA-256" in reason
    _check_runs(_compile(weights, tmp_path / "engines"))
    assert len(exports) == 2


@pytest.mark.parametrize("damage", ["delete manifest", "garbled manifest", "other key", "failed validation"])
def test_unusable_manifest_is_rebuilt(tmp_path: Path, weights: Path, exports: list[str], damage: str) -> None:
    module = _compile(weights, tmp_path / "engines")
    manifest_path = module.artifact.directory / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    if damage == "delete manifest":
        manifest_path.unlink()
    elif damage == "garbled manifest":
        manifest_path.write_text("{not json")
    elif damage == "other key":
        manifest["metadata"]["cache_key"]["precision"] = "fp16"
        manifest_path.write_text(json.dumps(manifest))
    else:
        manifest.update(status="failed", failure="output images differs from torch")
        manifest_path.write_text(json.dumps(manifest))
    assert EngineCache(tmp_path / "engines").check(_key(module))[0] is None
    _check_runs(_compile(weights, tmp_path / "engines"))
    assert len(exports) == 2


def test_changing_the_checkpoint_changes_the_key(tmp_path: Path, weights: Path, exports: list[str]) -> None:
    first = _compile(weights, tmp_path / "engines")
    changed = tmp_path / "other.safetensors"
    changed.write_bytes(weights.read_bytes()[:-1] + b"!")  # same size, one byte different
    second = _compile(changed, tmp_path / "engines")
    assert first.artifact.directory != second.artifact.directory
    assert first.artifact.manifest["metadata"]["checkpoint_sha256"] == content_sha256(weights)
    assert second.artifact.manifest["metadata"]["checkpoint_sha256"] == content_sha256(changed)
    assert exports == ["vae_decoder", "vae_decoder"]
    weights.write_bytes(weights.read_bytes() + b"edited in place")  # a new size: rehashed, new key
    third = _compile(weights, tmp_path / "engines")
    assert third.artifact.directory not in (first.artifact.directory, second.artifact.directory)
    assert len(exports) == 3


def test_other_precision_and_range_are_other_entries(tmp_path: Path, weights: Path, exports: list[str]) -> None:
    fp32 = _compile(weights, tmp_path / "engines")
    fp16 = OnnxRuntime().compile(compile_request(conv_component(), weights, tmp_path / "engines", "fp16"))
    assert fp16.artifact.directory.name.startswith("vae_decoder-fp16-")
    assert fp16.artifact.manifest["precision"] == "fp16"
    assert fp32.artifact.directory != fp16.artifact.directory
    assert exports == ["vae_decoder", "vae_decoder"]


def test_content_hash_is_remembered_by_size_and_time(tmp_path: Path, weights: Path) -> None:
    memo = tmp_path / "hashes.json"
    first = content_sha256(weights, memo)
    assert json.loads(memo.read_text())[str(weights.resolve())]["sha256"] == first
    remembered = json.loads(memo.read_text())
    remembered[str(weights.resolve())]["sha256"] = "remembered"
    memo.write_text(json.dumps(remembered))
    assert content_sha256(weights, memo) == "remembered"  # unchanged file: not read again
    weights.write_bytes(weights.read_bytes() + b"x")
    assert content_sha256(weights, memo) not in ("remembered", first)


def test_folder_hash_covers_every_file(tmp_path: Path) -> None:
    folder = tmp_path / "diffusers"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "weights.safetensors").write_bytes(b"unet")
    before = content_sha256(folder, tmp_path / "hashes.json")
    (folder / "unet" / "config.json").write_text("{}")
    assert content_sha256(folder, tmp_path / "hashes.json") != before


def test_latentrt_cache_sets_the_location(
    tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch, exports: list[str]
) -> None:
    monkeypatch.setenv("LATENTRT_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    assert engines_dir() == tmp_path / "cache" / "engines"
    assert engines_dir(tmp_path / "mine") == tmp_path / "mine"
    request = compile_request(conv_component(), weights, tmp_path)
    request = type(request)(request.component, weights, "fp32", torch.device("cpu"), None, progress=False)
    module = OnnxRuntime().compile(request)
    assert module.artifact.directory.parent == tmp_path / "cache" / "engines"
    assert (tmp_path / "cache" / "hashes.json").is_file()


def test_failed_export_is_not_kept_as_usable(tmp_path: Path, weights: Path) -> None:
    """A component whose export breaks its tolerance raises, and its entry is never reused."""
    cache = EngineCache(tmp_path / "engines")
    module = _compile(weights, tmp_path / "engines")
    key = _key(module)
    shutil.rmtree(module.artifact.directory)
    strict = OnnxExporter(tolerance={"fp32": -1.0, "fp16": -1.0}, progress=False)  # every difference fails
    with pytest.raises(ExportError, match="differs from torch"):
        cache.get_or_build(
            key,
            lambda out: strict.export(
                conv_component().module, conv_spec(), out, "fp32", metadata={"cache_key": key.fields()}
            ),
        )
    artifact, reason = cache.check(key)
    assert artifact is None and "validation failed" in reason
    failed = json.loads((cache.entry(key) / MANIFEST).read_text())
    assert failed["status"] == "failed" and "over its tolerance" in failed["failure"]


def _key(module: OrtModule) -> EngineKey:
    fields = dict(module.artifact.manifest["metadata"]["cache_key"])
    fields["shape_range"] = tuple(tuple(entry) for entry in fields["shape_range"])
    return EngineKey(**fields)
