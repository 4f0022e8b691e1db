"""ONNX export of the tiny SD1 model: images, components, files and manifests agree with torch.

The tiny model is exported once per session (``onnx_fixtures.tiny_sd1_engines``): sizes 64..128,
two images per request. Tolerances: images within PSNR 40 dB of torch's; component outputs within
1e-4 (fp32) of torch's, relative to ``max(1, max |torch output|)`` as the exporter's validation rule.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx_fixtures import LIMITS, TinyConv, TinyEngines, conv_spec, demo_engines_dir, psnr, tiny_sd1_engines
from PIL import Image
from sd_parity import HEIGHT, SEEDS, WIDTH
from torch import Tensor, nn

import latentrt
from latentrt.core.errors import ExportError, InvalidRequest
from latentrt.core.protocols import ShapeLimits
from latentrt.exporters import MANIFEST, read_artifact
from latentrt.exporters.onnx import OPSET, OnnxExporter
from latentrt.plugins.stable_diffusion.runtime_components import CompiledTextModel, CompiledUNet, CompiledVAE

pytestmark = pytest.mark.usefixtures("one_thread")

PSNR_MIN = 40.0  # dB, the bar for the end-to-end image
FP32_TOL = 1e-4  # max abs difference per component output, relative to max(1, max |torch|)
DOCUMENTED = {  # the names README.md documents
    "unet": (["sample", "timestep", "context"], ["noise_pred"]),
    "vae_decoder": (["latent"], ["images"]),
    "vae_encoder": (["images"], ["moments"]),
    "text_encoder": (["input_ids"], ["hidden_states", "normed_hidden_states", "pooled"]),
}
REQUEST: dict[str, Any] = {
    "prompt": "a photo of a cat",
    "negative_prompt": "blurry",
    "steps": 4,
    "cfg_scale": 7.0,
    "seed": SEEDS[0],
    "batch_size": len(SEEDS),
    "width": WIDTH,
    "height": HEIGHT,
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyEngines:
    return tiny_sd1_engines(tmp_path_factory)


def _pixels(images: list[Image.Image]) -> np.ndarray[Any, Any]:
    return np.stack([np.asarray(image) for image in images])


def _folders(tiny: TinyEngines) -> dict[str, Path]:
    return {read_artifact(folder).manifest["component"]: folder for folder in sorted(tiny.engines.iterdir())}


def test_pipeline_runs_every_component_on_onnxruntime(tiny: TinyEngines) -> None:
    model = tiny.onnx.model
    assert isinstance(model.denoiser.backbone, CompiledUNet)  # type: ignore[attr-defined]
    assert isinstance(model.vae, CompiledVAE) and model.vae.torch_vae is None  # both halves compiled
    assert isinstance(model.text_encoder.model, CompiledTextModel)  # type: ignore[attr-defined]
    assert sorted(_folders(tiny)) == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]


def test_txt2img_matches_torch(tiny: TinyEngines) -> None:
    reference, got = tiny.torch(**REQUEST), tiny.onnx(**REQUEST)
    expected, actual = _pixels(reference.images), _pixels(got.images)
    assert expected.std() > 10 and not np.array_equal(expected[0], expected[1])  # a real, seed-dependent image
    assert psnr(expected, actual) >= PSNR_MIN  # measured: identical pixels (PSNR inf)
    assert float((reference.latents - got.latents).abs().max()) <= 1e-3  # measured 9.9e-5 after 4 steps
    assert got.parameters == reference.parameters


def test_img2img_with_the_compiled_encoder_matches_torch(tiny: TinyEngines) -> None:
    init = tiny.torch(**{**REQUEST, "batch_size": 1}).images[0]
    request = {**REQUEST, "init_image": init, "strength": 0.6}
    expected, actual = _pixels(tiny.torch(**request).images), _pixels(tiny.onnx(**request).images)
    # the posterior sample is drawn in torch with the same generators; measured 90.8 dB
    assert psnr(expected, actual) >= PSNR_MIN


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_clip_skip_reads_the_exported_hidden_states(tiny: TinyEngines, clip_skip: int) -> None:
    prompts = ["a (red:1.3) cube", "a [blue] ball on grass"]
    expected = tiny.torch.model.text_encoder.encode(prompts, clip_skip=clip_skip).context
    got = tiny.onnx.model.text_encoder.encode(prompts, clip_skip=clip_skip).context
    assert float((expected - got).abs().max()) <= FP32_TOL * max(1.0, float(expected.abs().max()))
    with pytest.raises(InvalidRequest, match="clip skip must be between 1 and 2"):
        tiny.onnx.model.text_encoder.encode(prompts, clip_skip=3)


def test_every_component_is_within_1e_4_of_torch(tiny: TinyEngines) -> None:
    """Fresh inputs through a plain InferenceSession of the optimized file against the torch component."""
    components = tiny.torch.model.runtime_components(LIMITS)  # type: ignore[misc]
    for name, folder in _folders(tiny).items():
        manifest = read_artifact(folder).manifest
        assert manifest["status"] == "ok" and manifest["validation"]["passed"]
        assert [run["dims"] for run in manifest["validation"]["runs"]] == (
            [{"batch": 1}, {"batch": 2}] if name == "text_encoder" else
            [{"batch": 1, "height": 64, "width": 64}, {"batch": 2, "height": 128, "width": 64}]
        )  # fmt: skip
        for run in manifest["validation"]["runs"]:
            for output in run["outputs"].values():
                assert output["max_abs_diff"] <= FP32_TOL * max(1.0, output["max_abs_reference"])
        component = components[name]
        assert component.spec.sample_inputs is not None
        feeds = component.spec.sample_inputs({"batch": 2, "height": 96, "width": 128})
        session = onnxruntime.InferenceSession(str(folder / "model.optimized.onnx"), providers=["CPUExecutionProvider"])
        outputs = session.run(None, {k: v.numpy() for k, v in feeds.items()})
        with torch.no_grad():
            expected = component.module(*feeds.values())
        for want, array in zip(expected if isinstance(expected, tuple) else (expected,), outputs, strict=True):
            difference = float((torch.from_numpy(array) - want).abs().max())
            assert difference <= FP32_TOL * max(1.0, float(want.abs().max())), f"{name}: {difference:.2e}"


def test_exported_files_load_in_a_plain_session_with_documented_names(tiny: TinyEngines) -> None:
    for name, folder in _folders(tiny).items():
        for file in ("model.onnx", "model.optimized.onnx"):
            session = onnxruntime.InferenceSession(str(folder / file), providers=["CPUExecutionProvider"])
            inputs, outputs = DOCUMENTED[name]
            assert [i.name for i in session.get_inputs()] == inputs
            assert [o.name for o in session.get_outputs()] == outputs
    unet = onnxruntime.InferenceSession(str(_folders(tiny)["unet"] / "model.onnx"), providers=["CPUExecutionProvider"])
    assert unet.get_inputs()[0].shape == ["batch", 4, "height_div8", "width_div8"]
    assert unet.get_outputs()[0].shape == ["batch", 4, "height_div8", "width_div8"]


def test_manifest_records_the_export(tiny: TinyEngines) -> None:
    checkpoint = hashlib.sha256(tiny.model.single_file.read_bytes()).hexdigest()
    for name, folder in _folders(tiny).items():
        manifest = read_artifact(folder).manifest
        assert [i["name"] for i in manifest["inputs"]] == DOCUMENTED[name][0]
        assert [o["name"] for o in manifest["outputs"]] == DOCUMENTED[name][1]
        assert manifest["precision"] == manifest["requested_precision"] == "fp32"
        assert manifest["opset"] == OPSET >= 17
        assert manifest["metadata"]["checkpoint_sha256"] == checkpoint
        assert {"torch", "onnx", "onnxruntime", "onnxscript", "latentrt"} <= set(manifest["tool_versions"])
        assert manifest["seconds"]["total"] > 0 and manifest["seconds"]["export"] > 0
        assert manifest["external_data"] is False  # the tiny model is far below 2 GB
        expected_batch = [1, 1, 2] if name.startswith("vae") else [1, 2, 4]
        assert manifest["shape_range"]["batch"] == expected_batch
        if name != "text_encoder":
            assert manifest["shape_range"]["height"] == [64, 128, 128]
        onnx_model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        assert onnx_model.opset_import[0].version == OPSET


def test_sizes_outside_the_exported_range_are_refused_before_running(tiny: TinyEngines) -> None:
    with pytest.raises(InvalidRequest, match=r"width 256 is outside .*batch 1\.\.4, height 64\.\.128, width 64\.\.128"):
        tiny.onnx(**{**REQUEST, "width": 256})
    with pytest.raises(InvalidRequest, match=r"batch 6 is outside"):  # 3 images: 6 rows with CFG
        tiny.onnx(**{**REQUEST, "batch_size": 3})


def test_fp16_export_keeps_float32_inputs_and_passes_its_tolerance(tiny: TinyEngines, tmp_path: Path) -> None:
    component = tiny.torch.model.runtime_components(LIMITS)["unet"]  # type: ignore[misc]
    exporter = OnnxExporter(progress=False)
    artifact = exporter.export(component.module, component.spec, tmp_path / "unet-fp16", "fp16")
    manifest = artifact.manifest
    assert manifest["precision"] == "fp16" and manifest["status"] == "ok"
    outputs = [out for run in manifest["validation"]["runs"] for out in run["outputs"].values()]
    for out in outputs:  # fp16 rule: 2e-2 x max(1, max |torch|); measured 2.8e-3 with noise_pred peaking at 1.46
        assert 0 < out["max_abs_diff"] <= 2e-2 * max(1.0, out["max_abs_reference"])
    model = onnx.load(str(tmp_path / "unet-fp16" / "model.onnx"))
    types = {init.data_type for init in model.graph.initializer if len(init.dims) > 1}
    assert types == {onnx.TensorProto.FLOAT16}  # every weight matrix and kernel in fp16
    assert {i["dtype"] for i in manifest["inputs"]} == {"float32"}


class _Loud(nn.Module):
    """Outputs beyond fp16's range (65504): in fp16 they overflow to inf, or, where ONNX Runtime's CPU
    provider computes in fp32 with the constants clamped to 65504, come out far off."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = TinyConv()

    def forward(self, latent: Tensor) -> Tensor:
        return self.conv(latent) * 1e5 + 1e6


def test_fp16_vae_is_kept_fp32_where_it_overflows(tmp_path: Path) -> None:
    artifact = OnnxExporter(progress=False).export(_Loud(), conv_spec("vae_decoder"), tmp_path / "vae", "fp16")
    manifest = artifact.manifest
    assert (manifest["requested_precision"], manifest["precision"]) == ("fp16", "fp32")
    assert manifest["precision_note"].startswith("kept fp32: in fp16 ") and manifest["status"] == "ok"
    assert not (tmp_path / "vae" / "fp32").exists()
    with pytest.raises(ExportError, match=r"NaN/inf|over its tolerance"):  # not allowed to fall back: fails
        OnnxExporter(progress=False).export(_Loud(), conv_spec("unet_like"), tmp_path / "other", "fp16")
    assert read_artifact(tmp_path / "other").manifest["status"] == "failed"


class _ExportsDifferently(nn.Module):
    """Adds 0.1 only while being exported: the exported graph disagrees with torch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = TinyConv()

    def forward(self, latent: Tensor) -> Tensor:
        out: Tensor = self.conv(latent)
        return out + 0.1 if torch.compiler.is_exporting() else out


def test_a_model_over_its_tolerance_is_reported_failed(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"differs from torch by 0\.1.*over its tolerance 0\.0001"):
        OnnxExporter(progress=False).export(_ExportsDifferently(), conv_spec(), tmp_path / "bad", "fp32")
    manifest = read_artifact(tmp_path / "bad").manifest
    assert manifest["status"] == "failed" and not manifest["validation"]["passed"]
    assert (tmp_path / "bad" / MANIFEST).is_file() and (tmp_path / "bad" / "model.onnx").is_file()


def test_sdxl_on_onnxruntime_matches_torch(tmp_path_factory: pytest.TempPathFactory) -> None:
    """SDXL's UNet takes ``text_embeds`` and ``time_ids``; CLIP-L and bigG export as two text encoders."""
    from sd_fixtures import tiny_sdxl

    single_file = tiny_sdxl(tmp_path_factory).single_file
    engines = tmp_path_factory.mktemp("sdxl-engines")
    limits = ShapeLimits(64, 128, 1)
    onnx = latentrt.load(single_file, runtime="onnxruntime", engines=engines, limits=limits, progress=False)
    folders = {read_artifact(folder).manifest["component"]: folder for folder in engines.iterdir()}
    assert sorted(folders) == ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]
    unet = read_artifact(folders["unet"]).manifest
    assert [i["name"] for i in unet["inputs"]] == ["sample", "timestep", "context", "text_embeds", "time_ids"]
    request = {**REQUEST, "batch_size": 1, "original_size": (512, 384)}
    expected = _pixels(latentrt.load(single_file, progress=False)(**request).images)
    got = _pixels(onnx(**request).images)
    assert expected.std() > 10
    assert psnr(expected, got) >= PSNR_MIN  # measured: identical pixels (latents within 1.5e-4)


@pytest.mark.slow
def test_full_size_unet_is_saved_with_external_data(tmp_path: Path) -> None:
    """The SD 1.5 UNet (random weights, 3.4 GB in fp32) exceeds the 2 GB protobuf limit: its weights go to
    one ``model.onnx.data`` beside the model, and a plain session loads it. Needs about 16 GB of memory."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from onnx_vs_torch import full_size_unet_component

    component = full_size_unet_component(sizes=(256, 256, 256), max_batch=1)
    artifact = OnnxExporter().export(component.module, component.spec, tmp_path / "unet", "fp32")
    folder = artifact.directory
    assert artifact.manifest["external_data"] is True
    assert (folder / "model.onnx").stat().st_size < 2**31 and (folder / "model.onnx.data").stat().st_size > 2**31
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".data")) == [
        "model.onnx.data",
        "model.optimized.onnx.data",
    ]
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["sample", "timestep", "context"]
    worst = max(
        out["max_abs_diff"] for run in artifact.manifest["validation"]["runs"] for out in run["outputs"].values()
    )
    assert artifact.manifest["validation"]["passed"], worst


def test_sd2_unet_and_text_encoder_on_onnxruntime(tmp_path_factory: pytest.TempPathFactory) -> None:
    """SD2 (heads of 64, linear projections, OpenCLIP gelu text model) with the UNet and text encoder on
    ONNX Runtime and the VAE left on torch: the per-component choice."""
    from sd_fixtures import tiny_sd2

    single_file = tiny_sd2(tmp_path_factory).single_file
    runtime = {"unet": "onnxruntime", "text": "onnxruntime"}
    engines = tmp_path_factory.mktemp("sd2-engines")
    onnx = latentrt.load(single_file, runtime=runtime, engines=engines, limits=LIMITS, progress=False)
    assert not isinstance(onnx.model.vae, CompiledVAE)  # not chosen: still the torch AutoencoderKL
    assert sorted(read_artifact(f).manifest["component"] for f in engines.iterdir()) == ["text_encoder", "unet"]
    expected = _pixels(latentrt.load(single_file, progress=False)(**REQUEST).images)
    got = _pixels(onnx(**REQUEST).images)
    assert expected.std() > 10
    assert psnr(expected, got) >= PSNR_MIN  # measured 93.8 dB (latents within 1.3e-4)


def test_demo_model_on_onnxruntime_draws_what_torch_draws(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The built-in demo model exports over its own sizes (16..128 px) by default and, on ONNX Runtime,
    gives torch's images (same seeds) and the judge reads the same colour and shape from both."""
    from latentrt.plugins.demo.classify import judge

    engines = demo_engines_dir(tmp_path_factory)  # the UNet may already be there (runtime="auto" tests)
    onnx = latentrt.load("demo", runtime="onnxruntime", engines=engines, progress=False)
    unet = read_artifact(next(f for f in engines.iterdir() if read_artifact(f).manifest["component"] == "unet"))
    assert unet.spec.shape_range["height"] == (16, 64, 128)
    request = {"prompt": "a red circle", "steps": 12, "cfg_scale": 7.0, "seed": 3, "batch_size": 2}
    torch_images, onnx_images = latentrt.load("demo", progress=False)(**request).images, onnx(**request).images
    expected, got = _pixels(torch_images), _pixels(onnx_images)
    assert expected.shape == (2, 64, 64, 3) and expected.std() > 10
    assert psnr(expected, got) >= PSNR_MIN
    for want, have in zip(map(judge, torch_images), map(judge, onnx_images), strict=True):
        assert (want.colour, want.shape) == (have.colour, have.shape)


def test_inpainting_unet_takes_c_concat_on_onnxruntime(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A 9-channel inpainting UNet exports with its ``c_concat`` input (masked-image latents and the
    mask) and inpaints on ONNX Runtime as on torch, the VAE and text encoder on ONNX Runtime too."""
    from PIL import ImageDraw
    from sd_fixtures import tiny_sd1

    folder = tiny_sd1(tmp_path_factory, inpainting=True).folder
    engines = tmp_path_factory.mktemp("inpainting-engines")
    onnx = latentrt.load(folder, runtime="onnxruntime", engines=engines, limits=LIMITS, progress=False)
    assert isinstance(onnx.model.denoiser.backbone, CompiledUNet)  # type: ignore[attr-defined]
    unet = next(read_artifact(f) for f in engines.iterdir() if read_artifact(f).manifest["component"] == "unet")
    assert unet.spec.input_names == ("sample", "timestep", "context", "c_concat")
    session = onnxruntime.InferenceSession(str(unet.directory / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[3].name == "c_concat" and session.get_inputs()[3].shape[1] == 5
    image = Image.new("RGB", (WIDTH, HEIGHT), (40, 90, 200))
    ImageDraw.Draw(image).ellipse((10, 10, 50, 50), fill=(230, 200, 40))
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(mask).rectangle((27, 13, 70, 50), fill=255)
    request = {**REQUEST, "init_image": image, "mask": mask, "strength": 1.0}
    expected = _pixels(latentrt.load(folder, progress=False)(**request).images)
    got = _pixels(onnx(**request).images)
    assert expected.std() > 10
    assert psnr(expected, got) >= PSNR_MIN
