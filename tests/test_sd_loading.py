"""Loading SD1 checkpoints: single file vs diffusers folder, separate VAEs, .ckpt, prediction, bad files, memory.

One tiny random model (``sd_fixtures``) is written as a diffusers folder and as an LDM
single file; both must give our networks bit-identical tensors. diffusers'
``from_single_file`` (test-only, offline: every config comes from the local folder) reads
our single file back to the components it was written from.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from sd_fixtures import TinySD, diffusers_to_ldm_vae_reference, tiny_sd1, tiny_vae
from sd_parity import assert_identical, states
from torch import Tensor

import latentrt
from latentrt.core.errors import CheckpointError
from latentrt.core.pipeline import Pipeline
from latentrt.plugins.stable_diffusion.keys.unet import diffusers_to_ldm_unet

diffusers = pytest.importorskip("diffusers")

UNET_KEY = "model.diffusion_model.middle_block.2.out_layers.3.bias"
FLOAT_KEY = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
SDXL_KEY = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinySD:
    return tiny_sd1(tmp_path_factory)


@pytest.fixture(scope="module")
def from_file(tiny: TinySD) -> Pipeline:
    return latentrt.load(tiny.single_file, progress=False)


@pytest.fixture(scope="module")
def from_folder(tiny: TinySD) -> Pipeline:
    return latentrt.load(tiny.folder, progress=False)


@pytest.fixture(scope="module")
def ldm_state(tiny: TinySD) -> dict[str, Tensor]:
    """The single file's tensors (memory-mapped), for writing variants of it."""
    return load_file(str(tiny.single_file))


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


def generate(pipeline: Pipeline) -> Tensor:
    result = pipeline("a red ball", negative_prompt="blurry", steps=3, seed=5, width=64, height=48, batch_size=2)
    return result.latents


# --- the two layouts ---------------------------------------------------------------------------


def test_single_file_and_folder_give_identical_models(from_file: Pipeline, from_folder: Pipeline) -> None:
    assert from_file.model.family == from_folder.model.family == "sd1"
    assert not from_file.model.inpainting
    ours_file, ours_folder = states(from_file), states(from_folder)
    for part in ("unet", "vae", "text"):
        assert_identical(ours_file[part], ours_folder[part], part)
    assert from_file.model.vae.downscale == 8
    assert torch.equal(generate(from_file), generate(from_folder))


def test_single_file_matches_the_diffusers_components(tiny: TinySD, from_file: Pipeline) -> None:
    """Our tensors are the diffusers components' under LDM names (tokenizer: ours vs transformers')."""
    ours = states(from_file)
    assert_identical(ours["unet"], diffusers_to_ldm_unet(tiny.unet.state_dict()), "unet")
    assert_identical(ours["vae"], diffusers_to_ldm_vae_reference(tiny.vae.state_dict(), 4), "vae")
    text = {k.removeprefix("text_model."): v for k, v in tiny.text_encoder.state_dict().items()}
    text.pop("embeddings.position_ids", None)  # a buffer transformers 4 saves and 5 does not
    assert_identical(ours["text"], text, "text")
    tokenizer: Any = from_file.model.text_encoder
    prompt = "a photo of a cat, (masterpiece), 8k"
    assert tokenizer.tokenizer.encode(prompt) == tiny.tokenizer(prompt).input_ids[1:-1]  # without BOS, EOS


def test_diffusers_from_single_file_round_trip(tiny: TinySD, from_file: Pipeline) -> None:
    """diffusers' own single-file loader reads our file back to the components it was written from
    (offline: ``config=`` the local folder, ``local_files_only``)."""
    pipe = diffusers.StableDiffusionPipeline.from_single_file(
        str(tiny.single_file),
        config=str(tiny.folder),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    assert_identical(pipe.unet.state_dict(), tiny.unet.state_dict(), "diffusers unet")
    assert_identical(pipe.vae.state_dict(), tiny.vae.state_dict(), "diffusers vae")
    theirs_text = {k.removeprefix("text_model."): v for k, v in pipe.text_encoder.state_dict().items()}
    ours_text = {k.removeprefix("text_model."): v for k, v in tiny.text_encoder.state_dict().items()}
    assert_identical(theirs_text, ours_text, "diffusers text encoder")
    ours = states(from_file)
    assert_identical(ours["unet"], diffusers_to_ldm_unet(pipe.unet.state_dict()), "unet via diffusers")
    assert_identical(ours["vae"], diffusers_to_ldm_vae_reference(pipe.vae.state_dict(), 4), "vae via diffusers")


# --- a separate VAE ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_vae(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, dict[str, Path]]:
    """A second random VAE, saved as an LDM file, a diffusers-named file and a diffusers ``vae/`` folder."""
    vae = tiny_vae(seed=77)
    root = tmp_path_factory.mktemp("vae")
    paths = {"ldm": root / "other-vae-ldm.safetensors", "diffusers": root / "other-vae-diffusers.safetensors"}
    save_file(diffusers_to_ldm_vae_reference(vae.state_dict(), 4), str(paths["ldm"]))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(paths["diffusers"]))
    vae.save_pretrained(str(root / "other" / "vae"))
    paths["folder"] = root / "other" / "vae"
    return vae, paths


@pytest.mark.parametrize("layout", ["ldm", "diffusers", "folder"])
@pytest.mark.parametrize("source", ["single_file", "folder"])
def test_vae_override(
    tiny: TinySD, from_file: Pipeline, other_vae: tuple[Any, dict[str, Path]], layout: str, source: str
) -> None:
    vae, paths = other_vae
    pipeline = latentrt.load(getattr(tiny, source), vae=paths[layout], progress=False)
    loaded = states(pipeline)
    assert_identical(loaded["vae"], diffusers_to_ldm_vae_reference(vae.state_dict(), 4), f"{layout} VAE")
    assert_identical(loaded["unet"], states(from_file)["unet"], "unet")  # the rest is the checkpoint's
    assert pipeline.model.vae_name == paths[layout].stem
    hash_ = pipeline.model.vae_hash()
    assert (hash_ is None) if layout == "folder" else (isinstance(hash_, str) and len(hash_) == 10)
    z = torch.randn(1, 4, 6, 8, generator=torch.Generator().manual_seed(0))
    expected = vae.decode(z / vae.config.scaling_factor).sample
    assert float((pipeline.model.vae.decode(z) - expected).abs().max()) < 1e-4


# --- .ckpt -------------------------------------------------------------------------------------


def test_ckpt_with_nested_state_dict_loads_with_a_warning(
    tmp_path: Path, ldm_state: dict[str, Tensor], from_file: Pipeline
) -> None:
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": ldm_state, "global_step": 470000, "epoch": 3}, path)
    with pytest.warns(UserWarning, match=r"tiny\.ckpt.*safetensors"):
        pipeline = latentrt.load(path, progress=False)
    ours, reference = states(pipeline), states(from_file)
    for part in ("unet", "vae", "text"):
        assert_identical(ours[part], reference[part], part)


# --- prediction type ---------------------------------------------------------------------------


def prediction_of(pipeline: Pipeline) -> str:
    denoiser: Any = pipeline.model.denoiser
    return str(denoiser.prediction)


def test_prediction_defaults_to_eps(from_file: Pipeline, from_folder: Pipeline) -> None:
    assert prediction_of(from_file) == prediction_of(from_folder) == "eps"


@pytest.mark.parametrize(
    ("yaml", "expected"),
    [
        ('model:\n  params:\n    parameterization: "v"\n', "v"),
        ("model:\n  params:\n    linear_start: 0.00085\n", "eps"),
    ],
    ids=["v", "no-parameterization"],
)
def test_sidecar_yaml_sets_the_prediction(tiny: TinySD, tmp_path: Path, yaml: str, expected: str) -> None:
    path = tmp_path / "model-768-v.safetensors"
    os.link(tiny.single_file, path)
    path.with_suffix(".yaml").write_text(yaml, encoding="utf-8")
    assert prediction_of(latentrt.load(path, progress=False)) == expected
    other = "eps" if expected == "v" else "v"
    assert prediction_of(latentrt.load(path, prediction=other, progress=False)) == other  # the caller wins


def _folder_copy(tiny: TinySD, target: Path, *, skip: str = "") -> Path:
    """``tiny.folder`` seen through symlinks (no copying), leaving out ``skip``."""
    target.mkdir()
    for entry in tiny.folder.iterdir():
        if entry.name not in (skip, "scheduler"):
            (target / entry.name).symlink_to(entry)
    return target


def test_scheduler_config_sets_the_prediction(tiny: TinySD, tmp_path: Path) -> None:
    folder = _folder_copy(tiny, tmp_path / "v-model")
    (folder / "scheduler").mkdir()
    config = (tiny.folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8")
    assert '"prediction_type": "epsilon"' in config
    (folder / "scheduler" / "scheduler_config.json").write_text(
        config.replace('"epsilon"', '"v_prediction"'), encoding="utf-8"
    )
    assert prediction_of(latentrt.load(folder, progress=False)) == "v"
    assert prediction_of(latentrt.load(folder, prediction="eps", progress=False)) == "eps"
    assert prediction_of(latentrt.load(tiny.folder, prediction="v", progress=False)) == "v"


# --- bad files ---------------------------------------------------------------------------------


def _expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        latentrt.load(path, progress=False)
    message = str(info.value)
    assert str(path) in message or path.name in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_truncated_file(tiny: TinySD, tmp_path: Path) -> None:
    data = tiny.single_file.read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: header + (len(data) - header) // 2])
    _expect_error(path, "truncated")


def test_corrupt_header(tiny: TinySD, tmp_path: Path) -> None:
    """The JSON header garbled (same length), the data region intact in size (a sparse file)."""
    with tiny.single_file.open("rb") as handle:
        length = struct.unpack("<Q", handle.read(8))[0]
        header = bytearray(handle.read(length))
    header[:16] = b"#not a json hdr#"
    path = tmp_path / "corrupt.safetensors"
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", length) + bytes(header))
        handle.truncate(tiny.single_file.stat().st_size)
    _expect_error(path, "corrupt")


def _variant(tmp_path: Path, name: str, state: dict[str, Tensor]) -> Path:
    path = tmp_path / name
    save_file(state, str(path))
    return path


def test_integer_weights(tmp_path: Path, ldm_state: dict[str, Tensor]) -> None:
    state = {**ldm_state, FLOAT_KEY: ldm_state[FLOAT_KEY].to(torch.int32)}
    message = _expect_error(
        _variant(tmp_path, "int.safetensors", state), FLOAT_KEY.removeprefix("model.diffusion_model.")
    )
    assert "int32" in message


def test_missing_unet_key(tmp_path: Path, ldm_state: dict[str, Tensor]) -> None:
    state = {k: v for k, v in ldm_state.items() if k != UNET_KEY}
    _expect_error(
        _variant(tmp_path, "missing.safetensors", state), "missing", UNET_KEY.removeprefix("model.diffusion_model.")
    )


def test_unexpected_unet_key(tmp_path: Path, ldm_state: dict[str, Tensor]) -> None:
    state = {**ldm_state, "model.diffusion_model.input_blocks.1.1.extra.weight": torch.zeros(3)}
    _expect_error(_variant(tmp_path, "extra.safetensors", state), "unexpected", "input_blocks.1.1.extra.weight")


def test_misshapen_unet_key(tmp_path: Path, ldm_state: dict[str, Tensor]) -> None:
    state = {**ldm_state, UNET_KEY: torch.zeros(ldm_state[UNET_KEY].numel() + 1)}
    message = _expect_error(_variant(tmp_path, "misshapen.safetensors", state), "misshapen")
    assert UNET_KEY.removeprefix("model.diffusion_model.") in message


def test_sdxl_file_is_refused(tmp_path: Path, ldm_state: dict[str, Tensor]) -> None:
    state = {**ldm_state, SDXL_KEY: torch.zeros(1280)}
    _expect_error(_variant(tmp_path, "sdxl.safetensors", state), "SDXL")


def test_folder_without_model_index(tiny: TinySD, tmp_path: Path) -> None:
    folder = _folder_copy(tiny, tmp_path / "no-index", skip="model_index.json")
    _expect_error(folder, "model_index.json")


# --- memory ------------------------------------------------------------------------------------


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges where this process maps ``path`` (Linux ``/proc/self/maps``)."""
    ranges = []
    target = str(path.resolve())
    with open("/proc/self/maps", encoding="utf-8") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc/self/maps")
def test_fp32_single_file_weights_stay_in_the_memory_map(tiny: TinySD, from_file: Pipeline) -> None:
    """No second copy: every UNet, VAE and text-encoder tensor of an fp32 single file loaded on the
    CPU in fp32 lives inside the file's memory map (its data pointer falls in a mapped range of the
    file), so loading allocates no tensor memory of its own."""
    ranges = _mapped_ranges(tiny.single_file)
    assert ranges, "the checkpoint is not memory-mapped"
    for part, state in states(from_file).items():
        outside = [k for k, t in state.items() if not any(a <= t.data_ptr() < b for a, b in ranges)]
        assert not outside, f"{part}: {len(outside)} of {len(state)} tensors were copied, first {outside[:5]}"
