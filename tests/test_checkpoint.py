"""Reading model files: lazy safetensors, tensors-only pickles, diffusers folders, bad files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from latentrt.core.checkpoint import (
    SafetensorsFile,
    check_tensors,
    diffusers_component,
    model_hash,
    open_tensors,
    read_json,
)
from latentrt.core.errors import CheckpointError

TENSORS = {
    "model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 4, 3, 3),
    "model.diffusion_model.input_blocks.0.0.bias": torch.randn(8),
    "first_stage_model.decoder.conv_in.weight": torch.randn(8, 4, 3, 3).to(torch.float16),
}


@pytest.fixture
def single_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.safetensors"
    save_file(TENSORS, str(path), metadata={"format": "pt"})
    return path


def test_safetensors_is_read_lazily_with_shapes_and_dtypes(single_file: Path) -> None:
    source = open_tensors(single_file)
    assert isinstance(source, SafetensorsFile)
    assert set(source) == set(TENSORS)
    assert source.shape("first_stage_model.decoder.conv_in.weight") == (8, 4, 3, 3)
    assert source.dtype("first_stage_model.decoder.conv_in.weight") == torch.float16
    assert torch.equal(
        source["model.diffusion_model.input_blocks.0.0.bias"], TENSORS["model.diffusion_model.input_blocks.0.0.bias"]
    )
    assert source.metadata() == {"format": "pt"}


def test_prefix_views_strip_and_stay_lazy(single_file: Path) -> None:
    unet = open_tensors(single_file).with_prefix("model.diffusion_model.")
    assert sorted(unet) == ["input_blocks.0.0.bias", "input_blocks.0.0.weight"]
    assert unet.shape("input_blocks.0.0.weight") == (8, 4, 3, 3)
    assert "input_blocks.0.0.bias" in unet
    assert "first_stage_model.decoder.conv_in.weight" not in unet
    with pytest.raises(KeyError):
        unet["decoder.conv_in.weight"]


def test_nested_state_dict_prefix_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "nested.safetensors"
    save_file({f"state_dict.{k}": v for k, v in TENSORS.items()}, str(path))
    assert set(open_tensors(path)) == set(TENSORS)


def test_ckpt_is_read_tensors_only_and_warns(tmp_path: Path) -> None:
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": TENSORS, "global_step": 470000}, str(path))
    with pytest.warns(UserWarning, match="prefer .safetensors"):
        source = open_tensors(path)
    assert set(source) == set(TENSORS)


def test_ckpt_with_pickled_objects_is_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("code ran",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": TENSORS, "evil": Payload()}, str(path))
    with pytest.warns(UserWarning, match="weights_only"), pytest.raises(CheckpointError, match="refuses to unpickle"):
        open_tensors(path)


def test_truncated_file_is_a_checkpoint_error(single_file: Path, tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(single_file.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match=r"truncated\.safetensors: not a readable safetensors file"):
        open_tensors(truncated)


def test_corrupt_header_is_a_checkpoint_error(single_file: Path, tmp_path: Path) -> None:
    data = bytearray(single_file.read_bytes())
    data[8:20] = b"{not json!!!"
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        open_tensors(corrupt)


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing.safetensors", "no such file"), ("model.onnx", "unknown file type .onnx")],
)
def test_missing_or_unknown_files(tmp_path: Path, name: str, message: str) -> None:
    if name.endswith(".onnx"):
        (tmp_path / name).write_bytes(b"x")
    with pytest.raises(CheckpointError, match=message):
        open_tensors(tmp_path / name)


def test_check_tensors_names_missing_unexpected_and_misshapen(single_file: Path) -> None:
    unet = open_tensors(single_file).with_prefix("model.diffusion_model.")
    expected = {"input_blocks.0.0.weight": (8, 9, 3, 3), "out.2.weight": (4, 8, 3, 3)}
    with pytest.raises(CheckpointError) as info:
        check_tensors(unet, expected, "SD1 UNet")
    message = str(info.value)
    assert "tiny.safetensors" in message and "not a valid SD1 UNet" in message
    assert "1 missing: out.2.weight" in message
    assert "1 unexpected: input_blocks.0.0.bias" in message
    assert "1 misshapen: input_blocks.0.0.weight (8, 4, 3, 3) (expected (8, 9, 3, 3))" in message
    check_tensors(unet, {"input_blocks.0.0.weight": (8, 4, 3, 3)}, "x", allow_unexpected=["input_blocks.0.0.b"])


def test_check_tensors_refuses_integer_weights(tmp_path: Path) -> None:
    path = tmp_path / "ints.safetensors"
    save_file({"w": torch.zeros(2, 2, dtype=torch.int32)}, str(path))
    with pytest.raises(CheckpointError, match=r"'w' is torch\.int32, not a float"):
        check_tensors(open_tensors(path), {"w": (2, 2)}, "thing")


def _diffusers_folder(root: Path, *, sharded: bool) -> Path:
    unet = root / "unet"
    unet.mkdir(parents=True)
    (unet / "config.json").write_text(json.dumps({"in_channels": 4}))
    if sharded:
        save_file({"a": torch.ones(2)}, str(unet / "part1.safetensors"))
        save_file({"b": torch.zeros(3)}, str(unet / "part2.safetensors"))
        index = {"weight_map": {"a": "part1.safetensors", "b": "part2.safetensors"}}
        (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    else:
        save_file({"a": torch.ones(2), "b": torch.zeros(3)}, str(unet / "diffusion_pytorch_model.safetensors"))
    return root


@pytest.mark.parametrize("sharded", [False, True])
def test_diffusers_component_reads_weights_and_config(tmp_path: Path, sharded: bool) -> None:
    tensors, config = diffusers_component(_diffusers_folder(tmp_path, sharded=sharded), "unet")
    assert config == {"in_channels": 4}
    assert sorted(tensors) == ["a", "b"]
    assert tensors.shape("b") == (3,)
    assert torch.equal(tensors["a"], torch.ones(2))


def test_diffusers_component_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="has no vae/ component"):
        diffusers_component(tmp_path, "vae")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        diffusers_component(tmp_path, "vae")
    (tmp_path / "vae" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights"):
        diffusers_component(tmp_path, "vae")


def test_read_json_refuses_non_objects(tmp_path: Path) -> None:
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        read_json(tmp_path / "list.json")


def test_model_hash_is_a1111_short_sha256(single_file: Path) -> None:
    assert model_hash(single_file) == hashlib.sha256(single_file.read_bytes()).hexdigest()[:10]
