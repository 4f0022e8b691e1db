"""Built-in samplers, one module per family; each module's ``register`` adds its samplers.

Names follow ComfyUI; A1111 labels and the old ``k_*`` names are aliases.
"""

from __future__ import annotations

from latentrt.core.hookspecs import hookimpl
from latentrt.core.registry import Registry
from latentrt.plugins.samplers import euler

SAMPLER_MODULES = (euler,)


@hookimpl
def latentrt_register(registry: Registry) -> None:
    """Register every built-in sampler."""
    for module in SAMPLER_MODULES:
        module.register(registry)
