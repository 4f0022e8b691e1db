"""A1111 API bodies -> :class:`GenerationRequest` objects, and results -> A1111 responses.

``n_iter`` batches become one request each (seeds continue: batch ``i`` starts at
``seed + i * batch_size``, as A1111 numbers them); img2img with several ``init_images``
runs one request per image (image ``k`` uses ``init_images[k % n]``, seed ``seed + k``),
which gives the same images as one batch because every image owns its seed.
"""

from __future__ import annotations

import json
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageFilter, ImageOps

from latentrt._version import __version__
from latentrt.core.errors import PluginError
from latentrt.core.registry import Registry, SamplerSpec
from latentrt.core.request import GenerationRequest
from latentrt.server.images import decode_image, encode_png
from latentrt.server.schemas import GenerationResponse, Img2ImgRequest, Txt2ImgRequest
from latentrt.service import GenerationService, InvalidField, ServiceResult

__all__ = ["Defaults", "Plan", "a1111_field", "build_response", "plan_img2img", "plan_txt2img"]

_FIELD_NAMES = {
    "sampler": "sampler_name",
    "strength": "denoising_strength",
    "init_image": "init_images",
    "clip_skip": "override_settings",
    "model": "override_settings",
    "sampler_options": "sampler_name",
}
_HONOURED_OVERRIDES = ("sd_model_checkpoint", "CLIP_stop_at_last_layers")
_NO_OP_OVERRIDES = {"sd_vae": ("Automatic", "None", None), "eta_noise_seed_delta": (0, None)}


def a1111_field(name: str) -> str:
    """The A1111 body field a :class:`GenerationRequest` field comes from."""
    return _FIELD_NAMES.get(name, name)


@dataclass
class Defaults:
    """Server-wide A1111 options (``/sdapi/v1/options``) that requests inherit."""

    clip_skip: int = 1
    max_n_iter: int = 16
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """What one A1111 call turns into: requests for the service, and what to report back."""

    body: Txt2ImgRequest | Img2ImgRequest
    requests: list[GenerationRequest]
    model: str | None
    sampler: SamplerSpec
    schedule_label: str
    warnings: list[str]
    ignored: list[str]


def plan_txt2img(body: Txt2ImgRequest, service: GenerationService, defaults: Defaults) -> Plan:
    """The requests of a ``/sdapi/v1/txt2img`` call, checked field by field."""
    fields, plan = _common(body, service.registry, defaults)
    if body.enable_hr:
        plan.warnings.append("enable_hr: the hires. fix second pass is not available; images are width x height")
    seed = _seed(body.seed, body.batch_size * body.n_iter)
    plan.requests = [GenerationRequest(**fields, seed=seed + i * body.batch_size) for i in range(body.n_iter)]
    return plan


def plan_img2img(body: Img2ImgRequest, service: GenerationService, defaults: Defaults) -> Plan:
    """The requests of a ``/sdapi/v1/img2img`` call: images decoded and checked, masks prepared."""
    fields, plan = _common(body, service.registry, defaults)
    if not body.init_images:
        raise InvalidField("init_images", "img2img needs init_images: a list of base64-encoded images")
    pixels = service.config.limits.max_input_pixels
    images = [decode_image(data, f"init_images[{i}]", pixels) for i, data in enumerate(body.init_images)]
    mask = None if body.mask is None else _prepare_mask(body, decode_image(body.mask, "mask", pixels))
    plan.warnings += _img2img_warnings(body)
    strength = 0.75 if body.denoising_strength is None else body.denoising_strength
    fields.update(strength=strength, mask=mask)
    seed = _seed(body.seed, body.batch_size * body.n_iter)
    if len(images) == 1:
        plan.requests = [
            GenerationRequest(**fields, init_image=images[0], seed=seed + i * body.batch_size)
            for i in range(body.n_iter)
        ]
        return plan
    fields["batch_size"] = 1
    count = body.batch_size * body.n_iter
    plan.requests = [
        GenerationRequest(**fields, init_image=images[k % len(images)], seed=seed + k) for k in range(count)
    ]
    return plan


def _common(
    body: Txt2ImgRequest | Img2ImgRequest, plugins: Registry, defaults: Defaults
) -> tuple[dict[str, Any], Plan]:
    """Request fields both endpoints share, and the plan with the notes so far."""
    if not 1 <= body.n_iter <= defaults.max_n_iter:
        raise InvalidField("n_iter", f"n_iter must be in 1..{defaults.max_n_iter}, got {body.n_iter}")
    sampler, schedule = _sampler_and_schedule(body, plugins)
    overrides = body.override_settings or {}
    model = overrides.get("sd_model_checkpoint")
    if model is not None and not isinstance(model, str):
        raise InvalidField("override_settings", f"sd_model_checkpoint must be a model title or name, got {model!r}")
    fields: dict[str, Any] = {
        "prompt": body.prompt,
        "negative_prompt": body.negative_prompt,
        "steps": body.steps,
        "cfg_scale": body.cfg_scale,
        "sampler": sampler.name,
        "scheduler": schedule,
        "batch_size": body.batch_size,
        "width": body.width,
        "height": body.height,
        "clip_skip": overrides.get("CLIP_stop_at_last_layers", defaults.clip_skip),
        "sampler_options": _sampler_options(body, sampler),
    }
    label = plugins.scheduler(schedule).label
    ignored = sorted(body.model_extra or {})
    warnings = _unhonoured(body, overrides)
    if ignored:
        warnings.append(f"ignored unknown fields: {', '.join(ignored)}")
    return fields, Plan(body, [], model, sampler, label, warnings, ignored)


def _seed(seed: int, images: int) -> int:
    """The first image's seed (-1: random); image k gets seed + k, which must stay below 2**32."""
    if not -1 <= seed < 2**32:
        raise InvalidField("seed", f"seed must be -1 (random) or an integer in 0..2**32-1, got {seed}")
    if seed + images > 2**32:
        raise InvalidField("seed", f"seed {seed} + {images} images passes 2**32-1; use a smaller seed")
    return seed if seed != -1 else secrets.randbelow(2**32 - images + 1)


def _sampler_and_schedule(body: Txt2ImgRequest | Img2ImgRequest, plugins: Registry) -> tuple[SamplerSpec, str]:
    """The sampler (label, name or old "DPM++ 2M Karras" form) and the schedule (Automatic: the label's, or normal)."""
    label = body.sampler_name or body.sampler_index or "Euler"
    try:
        sampler, implied = plugins.sampler_and_scheduler(label)
    except PluginError as exc:
        raise InvalidField("sampler_name", str(exc)) from None
    if body.scheduler is None or body.scheduler.strip().casefold() in ("", "automatic"):
        return sampler, implied.name if implied is not None else "normal"
    try:
        return sampler, plugins.scheduler(body.scheduler).name
    except PluginError as exc:
        raise InvalidField("scheduler", str(exc)) from None


def _sampler_options(body: Txt2ImgRequest | Img2ImgRequest, sampler: SamplerSpec) -> dict[str, float]:
    """A1111's eta / s_* values for the samplers that take them (``s_tmax`` 0 means no upper bound)."""
    given = {"eta": body.eta, "s_churn": body.s_churn, "s_tmin": body.s_tmin, "s_noise": body.s_noise}
    given["s_tmax"] = body.s_tmax or None
    options = {}
    for name, value in given.items():
        if value is None or name not in sampler.options:
            continue
        if not math.isfinite(value) or value < 0:
            raise InvalidField(name, f"{name} must be a finite number >= 0, got {value}")
        options[name] = float(value)
    return options


def _unhonoured(body: Txt2ImgRequest | Img2ImgRequest, overrides: dict[str, Any]) -> list[str]:
    """What the request asked for that latentrt does not do, one sentence each."""
    checks = [
        (body.restore_faces, "restore_faces: face restoration is not available; faces were not restored"),
        (body.tiling, "tiling: seamless tiling is not available"),
        (body.subseed_strength, "subseed_strength: variation seeds are not available; only seed was used"),
        (max(body.seed_resize_from_w, body.seed_resize_from_h) > 0, "seed_resize_from_w/h: not available"),
        (body.styles, f"styles: saved prompt styles are not available ({', '.join(body.styles or [])} not applied)"),
        (body.script_name, f"script_name: scripts are not available ({body.script_name} did not run)"),
        (body.alwayson_scripts, f"alwayson_scripts: extensions are not available ({', '.join(body.alwayson_scripts)})"),
        (body.save_images, "save_images: the server saves no files; the images are only in this response"),
        (body.refiner_checkpoint, "refiner_checkpoint: refiners are not available over the API; the model ran alone"),
        (body.s_min_uncond, "s_min_uncond: skipping the negative prompt at low sigma is not available"),
    ]
    notes = [text for wanted, text in checks if wanted]
    for key, value in overrides.items():
        if key not in _HONOURED_OVERRIDES and value not in _NO_OP_OVERRIDES.get(key, ()):
            notes.append(f"override_settings.{key}: not available; ignored")
    return notes


def _img2img_warnings(body: Img2ImgRequest) -> list[str]:
    notes = []
    if body.resize_mode != 0:
        notes.append(f"resize_mode {body.resize_mode}: only 0 (just resize) is available; the image was resized")
    if body.initial_noise_multiplier not in (None, 1.0):
        notes.append("initial_noise_multiplier: not available; 1 was used")
    if body.latent_mask is not None:
        notes.append("latent_mask: not available; mask was used")
    if body.mask is not None and body.inpainting_fill != 1:
        notes.append(f"inpainting_fill {body.inpainting_fill}: masked content starts from the original image (1)")
    if body.mask is not None and body.inpaint_full_res:
        notes.append("inpaint_full_res: 'only masked' is not available; the whole picture was inpainted")
    return notes


def _prepare_mask(body: Img2ImgRequest, mask: Image.Image) -> Image.Image:
    """The mask as the pipeline wants it: grayscale, inverted on request, blurred by ``mask_blur`` (A1111's)."""
    mask = mask.convert("L")
    if body.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    blur_x, blur_y = (
        (body.mask_blur, body.mask_blur) if body.mask_blur is not None else (body.mask_blur_x, body.mask_blur_y)
    )
    if not (0 <= blur_x <= 256 and 0 <= blur_y <= 256):
        raise InvalidField("mask_blur", f"mask_blur must be in 0..256 pixels, got {blur_x}, {blur_y}")
    if blur_x or blur_y:
        mask = mask.filter(ImageFilter.GaussianBlur((blur_x, blur_y)))
    return mask


def build_response(
    plan: Plan, results: list[ServiceResult], service: GenerationService, task_id: str
) -> GenerationResponse:
    """The A1111 response: base64 PNGs with their parameters text, the request, and ``info``."""
    texts = [text for r in results for text in r.parameters]
    images = [encode_png(image, text) for r in results for image, text in zip(r.images, r.parameters, strict=True)]
    seeds = [seed for r in results for seed in r.seeds]
    parameters = plan.body.model_dump()
    if isinstance(plan.body, Img2ImgRequest) and not plan.body.include_init_images:
        parameters.update(init_images=None, mask=None)
    info = _info(plan, results, service, seeds, texts)
    info.update(id_task=task_id, interrupted=any(r.interrupted for r in results) or len(results) < len(plan.requests))
    return GenerationResponse(
        images=images if plan.body.send_images else [], parameters=parameters, info=json.dumps(info)
    )


def _info(
    plan: Plan, results: list[ServiceResult], service: GenerationService, seeds: list[int], texts: list[str]
) -> dict[str, Any]:
    """A1111's ``info`` JSON (``Processed.js()``), plus latentrt's ``warnings`` and ``ignored_fields``."""
    body, first = plan.body, plan.requests[0]
    entry = service.models.find(results[0].model if results else plan.model or service.models.default.name)
    width, height = results[0].images[0].size if results and results[0].images else (body.width, body.height)
    count = len(seeds)
    return {
        "prompt": body.prompt,
        "all_prompts": [body.prompt] * count,
        "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * count,
        "seed": seeds[0] if seeds else first.seed,
        "all_seeds": seeds,
        "subseed": body.subseed,
        "all_subseeds": [body.subseed] * count,
        "subseed_strength": body.subseed_strength,
        "width": width,
        "height": height,
        "sampler_name": plan.sampler.label,
        "cfg_scale": body.cfg_scale,
        "steps": body.steps,
        "batch_size": body.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": entry.name,
        "sd_model_hash": entry.short_hash,
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": first.strength if first.init_image is not None else None,
        "extra_generation_params": {"Schedule type": plan.schedule_label},
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": first.clip_skip,
        "version": f"latentrt {__version__}",
        "warnings": plan.warnings,
        "ignored_fields": plan.ignored,
    }
