"""Stable Diffusion 1.x / 2.x / XL: networks, tokenizer, checkpoint keys and model families.

The networks use the LDM (CompVis) state-dict names, so a single-file checkpoint loads
by stripping its prefixes; diffusers folders are converted to those names in ``keys``.
"""

from __future__ import annotations

from latentrt.core.hookspecs import hookimpl
from latentrt.core.registry import Registry


@hookimpl
def latentrt_register(registry: Registry) -> None:
    """Register the SD 1.x, 2.x and XL (base and refiner) model families."""
    from latentrt.plugins.stable_diffusion.families import SD1, SD2
    from latentrt.plugins.stable_diffusion.families_xl import SDXL, SDXL_REFINER

    registry.add_model_family("sd1", SD1, label=SD1.label, aliases=("sd15", "stable-diffusion-1"))
    registry.add_model_family("sd2", SD2, label=SD2.label, aliases=("sd21", "stable-diffusion-2"))
    registry.add_model_family("sdxl", SDXL, label=SDXL.label, aliases=("stable-diffusion-xl",))
    registry.add_model_family("sdxl_refiner", SDXL_REFINER, label=SDXL_REFINER.label, aliases=("sdxl-refiner",))
