"""latentrt: a plugin-based runtime for latent-diffusion image generation.

Public API only; see README.md for usage.
"""

from __future__ import annotations

from latentrt._version import __version__
from latentrt.core.errors import (
    CheckpointError,
    ExportError,
    InvalidRequest,
    LatentRTError,
    PluginError,
    RuntimeUnavailable,
)
from latentrt.core.hookspecs import hookimpl
from latentrt.core.loader import load
from latentrt.core.pipeline import GenerationResult, Pipeline
from latentrt.core.protocols import Conditioning, StepInfo
from latentrt.core.registry import Registry, registry
from latentrt.core.request import GenerationRequest

__all__ = [
    "CheckpointError",
    "Conditioning",
    "GenerationRequest",
    "GenerationResult",
    "ExportError",
    "InvalidRequest",
    "LatentRTError",
    "Pipeline",
    "PluginError",
    "Registry",
    "RuntimeUnavailable",
    "StepInfo",
    "__version__",
    "hookimpl",
    "load",
    "registry",
]
