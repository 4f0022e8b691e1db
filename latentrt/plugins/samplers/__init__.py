"""Built-in samplers, one module per family; each module's ``register`` adds its samplers.

Names follow ComfyUI; A1111 labels and the old ``k_*`` names are aliases.
"""

from __future__ import annotations

from latentrt.core.hookspecs import hookimpl
from latentrt.core.registry import Registry
from latentrt.plugins.samplers import (
    ddim,
    deis,
    dpm2,
    dpm_solver,
    dpmpp,
    euler,
    heun,
    ipndm,
    lcm,
    lms,
    res_multistep,
    restart,
    unipc,
)

SAMPLER_MODULES = (
    euler,
    heun,
    dpm2,
    lms,
    dpm_solver,
    dpmpp,
    ddim,
    lcm,
    ipndm,
    deis,
    unipc,
    res_multistep,
    restart,
)


@hookimpl
def latentrt_register(registry: Registry) -> None:
    """Register every built-in sampler, in the order ComfyUI lists them."""
    for module in SAMPLER_MODULES:
        module.register(registry)
