"""Request and response bodies of the A1111 API (``/sdapi/v1``), with A1111's field names and defaults.

Fields latentrt cannot honour are still accepted, so existing clients work unchanged;
what a request asked for and did not get is reported in the response's ``info``
(:mod:`latentrt.server.a1111`). Unknown fields are accepted too and reported as ignored.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from latentrt.service import RequestLimits

__all__ = [
    "GenerationResponse",
    "HealthResponse",
    "Img2ImgRequest",
    "PNGInfoRequest",
    "PNGInfoResponse",
    "ProgressResponse",
    "SDModelItem",
    "SamplerItem",
    "SchedulerItem",
    "Txt2ImgRequest",
    "bounded",
    "find_surrogate",
]


def find_surrogate(value: object, where: str = "") -> str | None:
    """The first place in a JSON value holding a lone surrogate (UTF-8 cannot encode it), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{where or 'the value'} contains U+{ord(value[exc.start]):04X} (a lone surrogate)"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        here = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key)
        found = find_surrogate(key, f"{here} (its name)") or find_surrogate(item, here)
        if found:
            return found
    return None


class _ValidText(BaseModel):
    """A request body whose strings (field names included) are all encodable Unicode, so they can be echoed."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        found = find_surrogate(data)
        if found:
            raise ValueError(f"{found}; send valid Unicode text")
        return data


class _GenerationFields(_ValidText):
    """What txt2img and img2img share (A1111's ``StableDiffusionProcessing`` API fields)."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = Field(-1, ge=-1, le=2**32 - 1, description="-1 draws a random seed; image k of a batch uses seed + k")
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = Field(None, description='A1111 label or name ("DPM++ 2M", "dpmpp_2m", "Euler a")')
    sampler_index: str | None = Field(None, description="deprecated alias of sampler_name")
    scheduler: str | None = Field(None, description='"Automatic" (the default), "Karras", "karras", ...')
    batch_size: int = 1
    n_iter: int = Field(1, description="batches run one after another (seeds continue)")
    steps: int = 50
    cfg_scale: float = Field(7.0, ge=0, le=100)
    width: int | None = Field(None, description="multiple of 8; default: the model's size (img2img: the image's)")
    height: int | None = Field(None, description="multiple of 8; default: the model's size (img2img: the image's)")
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = Field(None, ge=0)
    denoising_strength: float | None = Field(None, ge=0, le=1, description="img2img: 0 < strength <= 1")
    s_min_uncond: float | None = None
    s_churn: float | None = Field(None, ge=0)
    s_tmax: float | None = Field(None, ge=0, description="0 means no upper bound")
    s_tmin: float | None = Field(None, ge=0)
    s_noise: float | None = Field(None, ge=0)
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    comments: dict[str, Any] | None = None
    force_task_id: str | None = Field(None, description="id for /sdapi/v1/progress?id_task= and task cancellation")
    script_name: str | None = None
    script_args: list[Any] = Field(default_factory=list)
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict)
    infotext: str | None = None


class Txt2ImgRequest(_GenerationFields):
    """``POST /sdapi/v1/txt2img``."""

    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""


class Img2ImgRequest(_GenerationFields):
    """``POST /sdapi/v1/img2img``: ``init_images`` (base64), optional ``mask`` (white = repaint)."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = Field(4, ge=0, le=256)
    mask_blur_y: int = Field(4, ge=0, le=256)
    mask_blur: int | None = Field(None, ge=0, le=256, description="overrides mask_blur_x and mask_blur_y")
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class GenerationResponse(BaseModel):
    """Images as base64 PNGs (each with its ``parameters`` text), the request, and ``info`` as a JSON string."""

    images: list[str]
    parameters: dict[str, Any]
    info: str


class SamplerItem(BaseModel):
    """One entry of ``GET /sdapi/v1/samplers``."""

    name: str
    aliases: list[str]
    options: dict[str, str]


class SchedulerItem(BaseModel):
    """One entry of ``GET /sdapi/v1/schedulers``."""

    name: str
    label: str
    aliases: list[str] | None
    default_rho: float
    need_inner_model: bool


class SDModelItem(BaseModel):
    """One entry of ``GET /sdapi/v1/sd-models``."""

    title: str
    model_name: str
    hash: str | None
    sha256: str | None
    filename: str
    config: str | None


class ProgressResponse(BaseModel):
    """``GET /sdapi/v1/progress``: ``current_image`` is the current estimate as a base64 PNG."""

    progress: float
    eta_relative: float
    state: dict[str, Any]
    current_image: str | None
    textinfo: str | None
    current_task: str | None


class PNGInfoRequest(_ValidText):
    """``POST /sdapi/v1/png-info``: a base64 image (a ``data:`` URL prefix is allowed)."""

    image: str


class PNGInfoResponse(BaseModel):
    """The image's parameters text (``info``), its other text chunks, and the parsed parameters."""

    info: str
    items: dict[str, Any]
    parameters: dict[str, Any]


_M = TypeVar("_M", bound=_GenerationFields)


def bounded(model: type[_M], limits: RequestLimits, max_n_iter: int) -> type[_M]:
    """``model`` with a server's limits on its fields, so that they are in the OpenAPI document and checked."""
    size = "multiple of 8, at most {}; default: the model's size (img2img: the image's)"
    fields: dict[str, Any] = {
        "prompt": (str, Field("", max_length=limits.max_prompt_chars)),
        "negative_prompt": (str, Field("", max_length=limits.max_prompt_chars)),
        "steps": (int, Field(min(50, limits.max_steps), ge=1, le=limits.max_steps)),
        "batch_size": (int, Field(1, ge=1, le=limits.max_batch_size)),
        "n_iter": (int, Field(1, ge=1, le=max_n_iter, description="batches run one after another (seeds continue)")),
        "width": (
            int | None,
            Field(None, ge=8, le=limits.max_width, multiple_of=8, description=size.format(limits.max_width)),
        ),
        "height": (
            int | None,
            Field(None, ge=8, le=limits.max_height, multiple_of=8, description=size.format(limits.max_height)),
        ),
    }
    bounded_model: type[_M] = create_model(model.__name__, __base__=model, __doc__=model.__doc__, **fields)
    return bounded_model


class HealthResponse(BaseModel):
    """``GET /health``."""

    status: str
    version: str
    queued: int
    running: int
    models_loaded: list[str]
    metrics: dict[str, float]
