"""The built-in demo: models that work with no download.

Registers the ``demo`` model family, which loads the small trained model shipped in this
package (``latentrt.load("demo")``).
"""

from __future__ import annotations

from latentrt.core.hookspecs import hookimpl
from latentrt.core.registry import Registry


@hookimpl
def latentrt_register(registry: Registry) -> None:
    """Register the demo model family."""
    from latentrt.plugins.demo.family import DEMO

    registry.add_model_family("demo", DEMO, label=DEMO.label, aliases=("latentrt-demo",))
