"""The A1111 endpoints around generation: samplers, schedulers, models, options, progress, interrupt, png-info."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Body, HTTPException

from latentrt.core.parameters import parse_parameters
from latentrt.server.images import decode_image, encode_png
from latentrt.server.schemas import (
    PNGInfoRequest,
    PNGInfoResponse,
    ProgressResponse,
    SamplerItem,
    SchedulerItem,
    SDModelItem,
    find_surrogate,
)
from latentrt.server.state import State
from latentrt.service import InvalidField, Progress

__all__ = ["info_router"]

_RHO = {"karras": 7.0, "polyexponential": 1.0}  # the rho A1111 reports; -1 where a schedule has none


def info_router() -> APIRouter:
    """The router with every endpoint of this module."""
    router = APIRouter(tags=["sdapi"])
    router.add_api_route("/sdapi/v1/samplers", samplers, methods=["GET"], response_model=list[SamplerItem])
    router.add_api_route("/sdapi/v1/schedulers", schedulers, methods=["GET"], response_model=list[SchedulerItem])
    router.add_api_route("/sdapi/v1/sd-models", sd_models, methods=["GET"], response_model=list[SDModelItem])
    router.add_api_route("/sdapi/v1/options", get_options, methods=["GET"], response_model=dict[str, Any])
    router.add_api_route("/sdapi/v1/options", set_options, methods=["POST"], response_model=None)
    router.add_api_route("/sdapi/v1/progress", progress, methods=["GET"], response_model=ProgressResponse)
    router.add_api_route("/sdapi/v1/interrupt", interrupt, methods=["POST"], response_model=dict[str, int])
    router.add_api_route("/sdapi/v1/png-info", png_info, methods=["POST"], response_model=PNGInfoResponse)
    router.add_api_route("/sdapi/v1/scripts", scripts, methods=["GET"], response_model=dict[str, list[str]])
    router.add_api_route(
        "/latentrt/v1/tasks/{task_id}/cancel",
        cancel_task,
        methods=["POST"],
        response_model=dict[str, int],
        responses={404: {"description": "no such task in flight"}},
        tags=["latentrt"],
    )
    return router


def samplers(state: State) -> list[SamplerItem]:
    """Every sampler under its A1111 label, with its other names and options."""
    return [
        SamplerItem(name=s.label, aliases=[s.name, *s.aliases], options={k: str(v) for k, v in s.options.items()})
        for s in state.service.registry.samplers.values()
    ]


def schedulers(state: State) -> list[SchedulerItem]:
    """``automatic`` (the sampler's own), then every sigma schedule."""
    items = [SchedulerItem(name="automatic", label="Automatic", aliases=None, default_rho=-1.0, need_inner_model=False)]
    for spec in state.service.registry.schedulers.values():
        aliases = list(spec.aliases) or None
        rho = _RHO.get(spec.name, -1.0)
        items.append(
            SchedulerItem(name=spec.name, label=spec.label, aliases=aliases, default_rho=rho, need_inner_model=False)
        )
    return items


def sd_models(state: State) -> list[SDModelItem]:
    """The models this server can run, named as A1111 names them."""
    return [
        SDModelItem(
            title=e.title, model_name=e.name, hash=e.short_hash, sha256=e.sha256, filename=e.filename, config=None
        )
        for e in state.service.models.entries
    ]


def scripts() -> dict[str, list[str]]:
    """No scripts or extensions are available (clients such as ``webuiapi`` ask)."""
    return {"txt2img": [], "img2img": []}


def get_options(state: State) -> dict[str, Any]:
    """The A1111 options: the current model (``sd_model_checkpoint``), clip skip, and any stored by clients."""
    entry = state.service.models.default
    with state.lock:
        stored = dict(state.defaults.extra)
    return {
        **stored,
        "sd_model_checkpoint": entry.title,
        "sd_checkpoint_hash": entry.sha256,
        "CLIP_stop_at_last_layers": state.defaults.clip_skip,
        "sd_vae": "Automatic",
        "samples_format": "png",
    }


def set_options(options: Annotated[dict[str, Any], Body()], state: State) -> None:
    """Switch the default model (loading it now) and clip skip; other options are stored and have no effect."""
    found = find_surrogate(options)
    if found:
        raise InvalidField("options", f"{found}; send valid Unicode text")
    with state.lock:
        if "sd_model_checkpoint" in options:
            name = options["sd_model_checkpoint"]
            if not isinstance(name, str):
                raise InvalidField("sd_model_checkpoint", f"sd_model_checkpoint must be a model title, got {name!r}")
            try:
                entry = state.service.models.find(name)
            except InvalidField as exc:
                raise InvalidField("sd_model_checkpoint", str(exc)) from None
            with state.service.models.lease(entry):
                state.service.models.default = entry
        if "CLIP_stop_at_last_layers" in options:
            clip_skip = options["CLIP_stop_at_last_layers"]
            if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= 12:
                raise InvalidField("CLIP_stop_at_last_layers", f"must be an integer in 1..12, got {clip_skip!r}")
            state.defaults.clip_skip = clip_skip
        known = ("sd_model_checkpoint", "CLIP_stop_at_last_layers")
        state.defaults.extra.update({k: v for k, v in options.items() if k not in known})


def progress(state: State, skip_current_image: bool = False, id_task: str | None = None) -> ProgressResponse:
    """Progress of a task (``id_task``, a latentrt extension) or of the latest running one, with its preview."""
    service = state.service
    metrics = service.metrics()
    event: Progress | None = service.progress(id_task)
    job_count = int(metrics["queued"] + metrics["running"])
    if event is None:
        return ProgressResponse(
            progress=0.0, eta_relative=0.0, state=_state_dict(None, job_count), current_image=None, textinfo=None,
            current_task=None,
        )  # fmt: skip
    image = None
    if not skip_current_image and event.preview is not None:
        previews = service.preview_images(event)
        image = encode_png(previews[0], None) if previews else None
    return ProgressResponse(
        progress=event.fraction,
        eta_relative=event.eta_s() or 0.0,
        state=_state_dict(event, job_count),
        current_image=image,
        textinfo=f"step {event.step} of {event.steps}",
        current_task=event.task_id,
    )


def _state_dict(event: Progress | None, job_count: int) -> dict[str, Any]:
    started = time.strftime("%Y%m%d%H%M%S") if event is not None else 0
    return {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": event.task_id if event is not None else "",
        "job_count": job_count,
        "job_timestamp": started,
        "job_no": 0,
        "sampling_step": event.step if event is not None else 0,
        "sampling_steps": event.steps if event is not None else 0,
    }


def interrupt(state: State) -> dict[str, int]:
    """Stop the running requests; they return their images as they stand (A1111's interrupt)."""
    return {"interrupted": state.service.interrupt()}


def cancel_task(task_id: str, state: State) -> dict[str, int]:
    """Cancel a task's queued and running requests; they answer 409 (a latentrt extension)."""
    count = state.service.cancel(task_id)
    if not count:
        raise HTTPException(404, f"no task {task_id!r} is queued or running")
    return {"cancelled": count}


def png_info(body: PNGInfoRequest, state: State) -> PNGInfoResponse:
    """The parameters text of a PNG (empty when it has none), its other text chunks, and the parsed settings."""
    image = decode_image(body.image, "image", state.service.config.limits.max_input_pixels)
    items: dict[str, Any] = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    text = items.pop("parameters", "")
    if not text.strip():
        return PNGInfoResponse(info="", items=items, parameters={})
    parsed = parse_parameters(text)
    parameters = {"Prompt": parsed.prompt, "Negative prompt": parsed.negative_prompt, **parsed.settings}
    return PNGInfoResponse(info=text, items=items, parameters=parameters)
