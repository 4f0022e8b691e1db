"""The plugin contract of latentrt (pluggy hook specifications).

A plugin is a module or object with functions marked ``@latentrt.hookimpl``. Built-in
plugins and third-party ones are loaded the same way; third-party packages announce
theirs through the ``latentrt`` entry-point group in their ``pyproject.toml``::

    [project.entry-points.latentrt]
    my_samplers = "my_package.plugin"

and implement::

    import latentrt

    @latentrt.hookimpl
    def latentrt_register(registry):
        registry.add_sampler("my_sampler", sample_my_sampler, label="My sampler")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from latentrt.core.registry import Registry

__all__ = ["PROJECT_NAME", "hookimpl", "hookspec", "latentrt_register"]

PROJECT_NAME = "latentrt"
"""pluggy project name; also the entry-point group plugins are found through."""

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def latentrt_register(registry: Registry) -> None:
    """Add samplers, schedulers, model families, exporters and runtimes to ``registry``.

    Called once per plugin while the registry is built. Use ``registry.add_sampler``,
    ``add_scheduler``, ``add_model_family``, ``add_exporter`` and ``add_runtime``. Names
    are global: registering a name another plugin already holds raises
    :class:`~latentrt.core.errors.PluginError` naming both plugins. Any exception raised
    here is reported as a ``PluginError`` naming this plugin.
    """
