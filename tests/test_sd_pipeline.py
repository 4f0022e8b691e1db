"""The full SD1 pipeline against diffusers' pipelines (test-only references) on the same tiny random weights.

Both sides load the same tiny model (``sd_fixtures``): diffusers runs on its in-memory
components, latentrt loads the saved diffusers folder. Seeds follow diffusers' convention:
``generator=[torch.Generator().manual_seed(s) for s in seeds]`` there, ``seed=seeds[0],
batch_size=2`` here. Every case compares the decoded uint8 images (max abs difference
<= 1, i.e. 1/255 per pixel) and the final latents (``LATENT_TOL`` in sd_parity.py, absolute; txt2img
latents have a std of about 16, as the random UNet's eps predictions are not unit-scale noise).

diffusers' ``EulerDiscreteScheduler`` is configured with ``timestep_spacing="linspace"``
(its default). With SD1.5's own ``"leading"`` spacing diffusers scales the initial noise by
``sqrt(sigma_max^2 + 1)`` instead of ``sigma_max``, which no k-diffusion sampler does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from sd_fixtures import TinySD, tiny_sd1
from sd_parity import HEIGHT, SEEDS, WIDTH, Run, assert_same
from torch import Tensor

import latentrt
from latentrt.core.pipeline import GenerationResult, Pipeline

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

STEPS, CFG = 10, 7.0
PROMPT, NEGATIVE = "a photo of a cat, best quality", "blurry, lowres"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinySD:
    return tiny_sd1(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_inpainting(tmp_path_factory: pytest.TempPathFactory) -> TinySD:
    return tiny_sd1(tmp_path_factory, inpainting=True)


@pytest.fixture(scope="module")
def ours(tiny: TinySD) -> Pipeline:
    return latentrt.load(tiny.folder, progress=False)


@pytest.fixture(scope="module")
def ours_inpainting(tiny_inpainting: TinySD) -> Pipeline:
    pipeline = latentrt.load(tiny_inpainting.folder, progress=False)
    assert pipeline.model.inpainting
    return pipeline


@pytest.fixture(scope="module")
def init_image() -> Image.Image:
    """A smooth picture with edges: gradients, a disc and a bar."""
    x = np.linspace(0.0, 1.0, WIDTH)[None, :, None]
    y = np.linspace(0.0, 1.0, HEIGHT)[:, None, None]
    rgb = np.concatenate([x * np.ones_like(y), y * np.ones_like(x), (1 - x) * y], axis=2)
    image = Image.fromarray((rgb * 255).round().astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 10, 58, 48), fill=(230, 200, 40))
    draw.rectangle((60, 30, 90, 40), fill=(20, 40, 160))
    return image


@pytest.fixture(scope="module")
def mask() -> Image.Image:
    """White (repaint) rectangle not aligned to the 8-pixel latent grid."""
    image = Image.new("L", (WIDTH, HEIGHT), 0)
    ImageDraw.Draw(image).rectangle((27, 13, 70, 50), fill=255)
    return image


def generators() -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in SEEDS]


def run_diffusers(pipe: Any, **kwargs: Any) -> Run:
    """Call a diffusers pipeline; the final latents are caught by the step-end callback."""
    caught: dict[str, Tensor] = {}

    def keep_latents(_pipe: Any, _i: int, _t: Any, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        caught["latents"] = tensors["latents"]
        return tensors

    out = pipe(
        num_inference_steps=STEPS,
        guidance_scale=CFG,
        generator=generators(),
        output_type="pil",
        callback_on_step_end=keep_latents,
        **kwargs,
    )
    return Run(np.stack([np.asarray(image) for image in out.images]), caught["latents"])


def run_ours(pipeline: Pipeline, **kwargs: Any) -> Run:
    result: GenerationResult = pipeline(
        PROMPT,
        negative_prompt=NEGATIVE,
        steps=STEPS,
        cfg_scale=CFG,
        seed=SEEDS[0],
        batch_size=len(SEEDS),
        **kwargs,
    )
    assert result.seeds == SEEDS
    return Run(np.stack([np.asarray(image) for image in result.images]), result.latents)


def sigmas_of(scheduler: Any, steps: int = STEPS) -> Tensor:
    scheduler.set_timesteps(steps)
    sigmas: Tensor = scheduler.sigmas.clone()
    return sigmas


@pytest.fixture(autouse=True)
def _no_grad() -> Iterator[None]:
    with torch.no_grad():
        yield


# --- txt2img ----------------------------------------------------------------------------------


def test_txt2img_euler_with_diffusers_sigmas(tiny: TinySD, ours: Pipeline) -> None:
    scheduler = tiny.scheduler()
    reference = run_diffusers(
        tiny.pipeline(scheduler=scheduler),
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_images_per_prompt=2,
        height=HEIGHT,
        width=WIDTH,
    )
    got = run_ours(ours, width=WIDTH, height=HEIGHT, sampler="euler", sigmas=sigmas_of(tiny.scheduler()))
    assert_same(reference, got)


@pytest.mark.parametrize(
    ("schedule", "overrides"),
    [("normal", {}), ("karras", {"use_karras_sigmas": True})],
    ids=["normal-vs-linspace", "karras"],
)
def test_txt2img_euler_with_our_schedule(
    tiny: TinySD, ours: Pipeline, schedule: str, overrides: dict[str, Any]
) -> None:
    """Our schedules where diffusers' agree: "normal" is diffusers' linspace spacing at timesteps that
    land on the table (10 steps over 0..999: every 111th), "karras" is ``use_karras_sigmas``."""
    expected = sigmas_of(tiny.scheduler(**overrides))
    model_sampling = ours.model.denoiser.model_sampling
    # diffusers builds its sigma table in float32 (alphas_cumprod), ours in float64: 1.3e-5 relative at sigma_min
    assert torch.allclose(ours.registry.scheduler(schedule).sigmas(STEPS, model_sampling), expected, rtol=1e-4)
    reference = run_diffusers(
        tiny.pipeline(scheduler=tiny.scheduler(**overrides)),
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_images_per_prompt=2,
        height=HEIGHT,
        width=WIDTH,
    )
    assert_same(reference, run_ours(ours, width=WIDTH, height=HEIGHT, sampler="euler", scheduler=schedule))


def test_txt2img_euler_ancestral_continues_the_generators(tiny: TinySD, ours: Pipeline) -> None:
    reference = run_diffusers(
        tiny.pipeline(scheduler=tiny.scheduler("euler_ancestral")),
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_images_per_prompt=2,
        height=HEIGHT,
        width=WIDTH,
    )
    sigmas = sigmas_of(tiny.scheduler("euler_ancestral"))
    assert_same(reference, run_ours(ours, width=WIDTH, height=HEIGHT, sampler="euler_ancestral", sigmas=sigmas))


def _penultimate_embeds(tiny: TinySD, prompt: str) -> Tensor:
    """transformers' CLIP at the penultimate layer, final norm applied (diffusers' ``clip_skip=1``).

    Computed here because diffusers 0.42's own ``clip_skip`` reads ``text_encoder.text_model``,
    which transformers 5's ``CLIPTextModel`` no longer has.
    """
    ids = tiny.tokenizer([prompt] * 2, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    hidden = tiny.text_encoder(ids.input_ids, output_hidden_states=True).hidden_states[-2]
    embeds: Tensor = tiny.text_encoder.final_layer_norm(hidden)
    return embeds


def test_txt2img_guidance_rescale_and_clip_skip(tiny: TinySD, ours: Pipeline) -> None:
    """Guidance rescale 0.7 (Lin et al. 2023) and A1111's clip skip 2 (the penultimate layer)."""
    reference = run_diffusers(
        tiny.pipeline(),
        prompt_embeds=_penultimate_embeds(tiny, PROMPT),
        negative_prompt_embeds=_penultimate_embeds(tiny, NEGATIVE),
        height=HEIGHT,
        width=WIDTH,
        guidance_rescale=0.7,
    )
    got = run_ours(ours, width=WIDTH, height=HEIGHT, scheduler="normal", guidance_rescale=0.7, clip_skip=2)
    assert_same(reference, got)


def test_txt2img_v_prediction(tiny: TinySD) -> None:
    pipeline = latentrt.load(tiny.folder, prediction="v", progress=False)
    scheduler = tiny.scheduler(prediction_type="v_prediction")
    reference = run_diffusers(
        tiny.pipeline(scheduler=scheduler),
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        num_images_per_prompt=2,
        height=HEIGHT,
        width=WIDTH,
    )
    assert_same(reference, run_ours(pipeline, width=WIDTH, height=HEIGHT, scheduler="normal"))


# --- img2img and inpainting ------------------------------------------------------------------


def test_img2img(tiny: TinySD, ours: Pipeline, init_image: Image.Image) -> None:
    """strength 0.6 of 10 steps: the last 6 sigmas, the posterior sample drawn before the noise."""
    reference = run_diffusers(
        tiny.pipeline("img2img"),
        prompt=[PROMPT] * 2,
        negative_prompt=[NEGATIVE] * 2,
        image=init_image,
        strength=0.6,
    )
    got = run_ours(ours, init_image=init_image, strength=0.6, scheduler="normal")
    assert_same(reference, got)


def _inpaint_reference(model: TinySD, image: Image.Image, mask: Image.Image, strength: float) -> Run:
    """diffusers encodes one init image with the first generator only and repeats it; one image per
    generator (as latentrt draws) needs the image and mask given once per prompt."""
    return run_diffusers(
        model.pipeline("inpaint"),
        prompt=[PROMPT] * 2,
        negative_prompt=[NEGATIVE] * 2,
        image=[image] * 2,
        mask_image=[mask] * 2,
        strength=strength,
        height=HEIGHT,
        width=WIDTH,
    )


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_by_latent_blending(
    tiny: TinySD, ours: Pipeline, init_image: Image.Image, mask: Image.Image, strength: float
) -> None:
    """A 4-channel model: diffusers blends the noised init latent in after every step; at strength 1
    it starts from pure noise and the first step sees it unblended."""
    reference = _inpaint_reference(tiny, init_image, mask, strength)
    got = run_ours(ours, init_image=init_image, mask=mask, strength=strength, scheduler="normal")
    assert_same(reference, got)


@pytest.mark.parametrize("strength", [1.0, 0.75])
def test_inpainting_with_a_9_channel_unet(
    tiny_inpainting: TinySD,
    ours_inpainting: Pipeline,
    init_image: Image.Image,
    mask: Image.Image,
    strength: float,
) -> None:
    reference = _inpaint_reference(tiny_inpainting, init_image, mask, strength)
    got = run_ours(ours_inpainting, init_image=init_image, mask=mask, strength=strength, scheduler="normal")
    assert_same(reference, got)


def test_inpainting_resizes_like_diffusers(
    tiny_inpainting: TinySD, ours_inpainting: Pipeline, init_image: Image.Image, mask: Image.Image
) -> None:
    """A larger init image and mask are resized (Lanczos) to the requested size on both sides."""
    big_image = init_image.resize((WIDTH * 5 // 4, HEIGHT * 5 // 4), Image.Resampling.BICUBIC)
    big_mask = mask.resize(big_image.size, Image.Resampling.BILINEAR)
    reference = _inpaint_reference(tiny_inpainting, big_image, big_mask, 1.0)
    got = run_ours(
        ours_inpainting,
        init_image=big_image,
        mask=big_mask,
        strength=1.0,
        width=WIDTH,
        height=HEIGHT,
        scheduler="normal",
    )
    assert_same(reference, got)
